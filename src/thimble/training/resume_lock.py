"""The lock on a run's resume state, torch-free: the trainer holds it while it trains, and the workflow asks
it, before a training job replaces anything, whether another trainer holds it."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from thimble.errors import TrainingError


class PartialLock:
    """An exclusive lock on a run's resume state: ``<partial_dir>.lock``, holding the owner's PID.

    ``flock`` locks die with their process (even on SIGKILL), so a stale lock never blocks a rerun.
    """

    def __init__(self, partial_dir: Path):
        self.path = lock_path(Path(partial_dir))
        self.handle = None

    def __enter__(self) -> PartialLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            holder = _held_by_another(handle)
        except OSError:
            handle.close()
            raise
        if holder is not None:
            handle.close()
            raise TrainingError(held_message(holder, self.path.with_suffix("")))
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()  # releases the lock


def lock_path(partial_dir: Path) -> Path:
    return partial_dir.with_name(partial_dir.name + ".lock")


def held_message(holder: str, partial_dir: Path) -> str:
    return (f"another trainer (PID {holder}) is using {partial_dir}: wait for it to finish, or stop it "
            f"(kill {holder}) and run again")


def lock_holder(partial_dir: Path) -> str | None:
    """The PID (as written, or "unknown") of another process holding ``partial_dir``'s lock, or None when
    none does. Takes and releases the lock when it is free; creates nothing."""
    path = lock_path(Path(partial_dir))
    if not path.exists():
        return None
    with open(path) as handle:
        return _held_by_another(handle)


def _held_by_another(handle) -> str | None:
    """Locks ``handle``'s file, or returns the PID written in it when another process holds it."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        handle.seek(0)
        return handle.read().strip() or "unknown"
    return None
