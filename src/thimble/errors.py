"""The package's error base class: a problem the user can fix, as one line naming the file and the fix.

The CLI prints a ``ThimbleError`` as ``thimble <stage>: error: <message>`` and exits 1; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class ThimbleError(Exception):
    """A problem with the inputs, the data on disk or the machine; the message says what to do."""


class DataError(ThimbleError):
    """A stored file is missing, truncated, corrupt or not what the stage expects.

    The message names the file, the dataset and the steps concerned.
    """


class TrainingError(ThimbleError):
    """Training cannot start or go on; the message says why and what to do."""


class PlanError(ThimbleError):
    """`thimble plan` cannot make the plan; the message says why and what to do."""
