"""What a stage used: its peak RSS and its wall time, written where ``THIMBLE_PEAK_RSS_DIR`` says.

`thimble plan` sets the variable for the workflow it runs as a probe and reads the files back; set it
on a real run to compare the run with the plan. A module of its own (no thimble imports) so that the
CLI, which writes the files, and the plan, which reads them, both import it and not each other.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

#: a directory: each stage writes <dir>/<stage>.peak_rss (its peak RSS in bytes) and <dir>/<stage>.seconds
#: (its wall time from the process's start, interpreter and imports included)
PEAK_RSS_ENV = "THIMBLE_PEAK_RSS_DIR"


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started (exec'd).

    Linux's VmHWM belongs to the process image alone; ``ru_maxrss`` would also
    count the memory of the parent it was forked from. Elsewhere ru_maxrss is
    the best there is (kB on Linux, bytes on macOS).
    """
    import resource

    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def process_seconds() -> float:
    """Wall seconds since this process started (the interpreter's start-up and imports included)."""
    import psutil

    return time.time() - psutil.Process().create_time()


def write_usage(stage: str) -> None:
    """Write the stage's peak RSS and wall time into ``$THIMBLE_PEAK_RSS_DIR``, if it is set."""
    directory = os.environ.get(PEAK_RSS_ENV)
    if not directory:
        return
    (Path(directory) / f"{stage}.peak_rss").write_text(f"{peak_rss_bytes()}\n")
    (Path(directory) / f"{stage}.seconds").write_text(f"{process_seconds()!r}\n")


def read_usage(directory: Path, stage: str) -> dict:
    """What ``write_usage`` wrote for ``stage``: {"peak_rss_bytes", "seconds"}."""
    return {"peak_rss_bytes": int((directory / f"{stage}.peak_rss").read_text()),
            "seconds": float((directory / f"{stage}.seconds").read_text())}
