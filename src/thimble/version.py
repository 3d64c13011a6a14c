"""The package's version, in a leaf module: recorded by training (``train.environment_attrs``), which must not
import the package's ``__init__`` (it opens runs for the notebook, a layer above training)."""

__version__ = "0.1.0"
