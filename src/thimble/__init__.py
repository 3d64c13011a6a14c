"""Thimble: bit-faithful recording and lattice analysis of bfloat16 embedding training.

``thimble.open_run("results/thimble_mini")`` opens an experiment's results in a
notebook (``thimble.notebook.run``); ``thimble.Recorder(path, model, optimizer)`` records any
PyTorch loop's optimizer steps (``thimble.record.recorder``). Both are imported on first use, so
``import thimble`` stays cheap.
"""

from thimble.version import __version__

__all__ = ["open_run", "Run", "Recorder", "__version__"]


def __getattr__(name: str):
    if name in ("open_run", "Run"):
        from thimble.notebook import run

        return getattr(run, name)
    if name == "Recorder":
        from thimble.record.recorder import Recorder

        return Recorder
    if name in ("hf", "lightning"):  # the integrations, each behind its extra: imported when first named
        import importlib

        return importlib.import_module(f"thimble.{name}")
    raise AttributeError(f"module 'thimble' has no attribute {name!r}")
