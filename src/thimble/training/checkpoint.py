"""The resume state: what a checkpoint holds, saving it crash-safe beside its checksums, and finding the one
to resume from.

A checkpoint is resumed only when it is provably the same run: its resume key (the settings that shape the
trajectory, ``training.math_threads`` among them, and the sha256 of the tokens and masks) must equal this
run's; otherwise ``partial_dir`` is discarded with one log line naming what changed.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch

from thimble.config import trajectory_settings
from thimble.errors import TrainingError
from thimble.record.format import list_segments
from thimble.training.adamw import UpdateRule
from thimble.training.data_order import BatchStream
from thimble.util.files import fsync_directory, fsync_path, sha256_file

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
#: the checkpoint before the newest: what a resume falls back to when the newest fails its checksum
PREVIOUS_CHECKPOINT = "checkpoint.previous.pt"
#: the sha256 of each checkpoint, written once the checkpoint is durable, verified before it is loaded
CHECKPOINT_SHA256 = "checkpoint.sha256"
#: the checkpoints, newest first
CHECKPOINTS = (CHECKPOINT, PREVIOUS_CHECKPOINT)


def state_copy(model: torch.nn.Module, optimizer: UpdateRule) -> dict:
    """Copies of every parameter and all the optimizer's state (the originals keep training)."""
    return {"model": {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()},
            "optimizer": copy.deepcopy(optimizer.state_dict())}


def resume_state(step: int, model: torch.nn.Module, optimizer: UpdateRule, batches: BatchStream, key: dict) -> dict:
    """A copy of everything needed to resume after ``step``: what a checkpoint saves."""
    return {"step": step, "resume_key": key, **state_copy(model, optimizer), "data": batches.state()}


def restore_state(state: dict, model: torch.nn.Module, optimizer: UpdateRule, batches: BatchStream) -> None:
    """Put the model, the optimizer and the data order back as ``state`` holds them (its ``model``,
    ``optimizer`` and ``data``, as ``resume_state`` copies them)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    batches.restore(state["data"])


def resume_key(settings: dict, tokens_path: str, masks_path: str) -> dict:
    """What a checkpoint must match to be resumed: the trajectory's settings and its inputs' content."""
    return {"settings": trajectory_settings(settings),
            "inputs": {"tokens_sha256": sha256_file(tokens_path), "masks_sha256": sha256_file(masks_path)}}


def key_differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """The leaves where two resume keys differ, as 'key: recorded -> current'."""
    changes = []
    for name in sorted(set(recorded) | set(current)):
        old, new = recorded.get(name), current.get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += key_differences(old, new, f"{prefix}{name}.")
        elif old != new:
            changes.append(f"{prefix}{name}: {old!r} -> {new!r}")
    return changes


def _write_synced(directory: Path, name: str, write) -> Path:
    """Write a file under a unique temporary name (``write(handle)``), its bytes on disk; return its path."""
    handle, tmp = tempfile.mkstemp(prefix=f"{name}.", suffix=".tmp", dir=directory)
    with os.fdopen(handle, "wb") as out:
        write(out)
    fsync_path(tmp)
    return Path(tmp)


def save_checkpoint(partial_dir: Path, state: dict) -> None:
    """Save the resume state after ``state["step"]``, keeping the one it replaces as ``PREVIOUS_CHECKPOINT``.

    The new file is written under a unique temporary name and synced, the current one becomes the
    previous, the new one is renamed into place, and only once those renames are durable does
    ``CHECKPOINT_SHA256`` list the sha256 of both files: a resume uses a checkpoint only when its bytes
    match a listed checksum, so a crash at any point, or damage after the fact, never resumes wrong bits.
    """
    checkpoint, previous = partial_dir / CHECKPOINT, partial_dir / PREVIOUS_CHECKPOINT
    tmp = _write_synced(partial_dir, CHECKPOINT, lambda out: torch.save(state, out))
    try:
        digest = sha256_file(tmp)
        # by content, not name: after a crash mid-save a listed sum can sit under the other file's name
        listed = set(read_checkpoint_checksums(partial_dir).values())
        kept = {}
        if checkpoint.exists() and (current := sha256_file(checkpoint)) in listed:
            os.replace(checkpoint, previous)  # its sum stays listed until the new list replaces the old
            kept = {PREVIOUS_CHECKPOINT: current}
        elif previous.exists() and (earlier := sha256_file(previous)) in listed:
            kept = {PREVIOUS_CHECKPOINT: earlier}
        os.replace(tmp, checkpoint)
        fsync_directory(partial_dir)
        checksums = json.dumps({"sha256": {CHECKPOINT: digest, **kept}, "step": state.get("step")}, sort_keys=True)
        listing = _write_synced(partial_dir, CHECKPOINT_SHA256, lambda out: out.write(checksums.encode()))
        os.replace(listing, partial_dir / CHECKPOINT_SHA256)
        fsync_directory(partial_dir)
    finally:
        tmp.unlink(missing_ok=True)


def read_checkpoint_checksums(partial_dir: Path) -> dict[str, str]:
    """``{file name: sha256}`` of the checkpoints ``CHECKPOINT_SHA256`` vouches for; {} if it is missing or
    unreadable."""
    try:
        listed = json.loads((partial_dir / CHECKPOINT_SHA256).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {str(name): str(digest) for name, digest in listed.items()} if isinstance(listed, dict) else {}


def remove_checkpoints(partial_dir: Path) -> None:
    """Delete the checkpoints and their checksums (the run is complete)."""
    for name in (*CHECKPOINTS, CHECKPOINT_SHA256):
        (partial_dir / name).unlink(missing_ok=True)


def verified_checkpoint(partial_dir: Path) -> dict | None:
    """The newest checkpoint in ``partial_dir`` whose bytes match a checksum of ``CHECKPOINT_SHA256`` and
    that loads; None if there is none. Each one that fails is deleted, with a log line saying why."""
    listed = set(read_checkpoint_checksums(partial_dir).values())
    states = []
    for path in (partial_dir / name for name in CHECKPOINTS):
        if not path.exists():
            continue
        if sha256_file(path) not in listed:
            why = (f"its sha256 matches no checksum in {CHECKPOINT_SHA256} (damaged after it was written, or "
                   "cut short before its checksum was)" if listed else
                   f"{CHECKPOINT_SHA256} is missing or unreadable (no checksum vouches for it)")
            log.warning("discarding the checkpoint %s: %s", path, why)
            path.unlink()
            continue
        try:
            # tensors and plain data only: a checkpoint handed over with a pickle that calls code is refused
            # unread, whatever checksum vouches for it (the checksum guards against damage, not intent)
            state = torch.load(path, weights_only=True)
        except pickle.UnpicklingError as error:
            raise TrainingError(f"{path} holds more than tensors and plain data, which thimble never loads "
                                f"({refused_global(error)}); nothing in it was run. If you did not write it, do not "
                                f"trust {partial_dir}; delete it to train from step 0") from None
        except Exception as error:  # noqa: BLE001  (any unreadable checkpoint: torch raises many kinds)
            log.warning("discarding the checkpoint %s: it cannot be read (%s: %s)", path, type(error).__name__,
                        str(error)[:200])
            path.unlink()
            continue
        if not isinstance(state, dict) or "resume_key" not in state:
            log.warning("discarding the checkpoint %s: it has no resume key (written by an older thimble)", path)
            path.unlink()
            continue
        states.append(state)
    return max(states, key=lambda state: state["step"], default=None)


def refused_global(error: Exception) -> str:
    """What torch's weights-only loader refused to load, from its message (which goes on to suggest loading
    the file unsafely: not repeated here)."""
    for line in str(error).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip()[:300]
    return "torch's weights-only loader refused it"


def _discard(partial_dir: Path, why: str) -> None:
    log.warning("discarding %s and training from step 0: %s", partial_dir, why)
    shutil.rmtree(partial_dir)


def load_resume_state(partial_dir: Path, key: dict) -> dict | None:
    """The checkpoint to resume from (the newest that passes its checksum), after removing whatever came
    after it; None to start afresh (``partial_dir`` removed).

    The caller holds the lock on ``partial_dir``.
    """
    for stale in partial_dir.glob("*.tmp"):
        stale.unlink()
    if not partial_dir.exists():
        return None
    had_checkpoint = any((partial_dir / name).exists() for name in CHECKPOINTS)
    state = verified_checkpoint(partial_dir)
    if state is None:
        if had_checkpoint:
            _discard(partial_dir, "none of its checkpoints passes its checksum and loads (each is named above)")
        else:
            shutil.rmtree(partial_dir)  # killed before its first checkpoint: nothing to resume from
        return None
    changes = key_differences(state["resume_key"], key)
    if changes:
        _discard(partial_dir, f"it is not the same run ({'; '.join(changes)})")
        return None
    for first, last, path in list_segments(partial_dir):
        if last > state["step"]:
            path.unlink()  # written after the checkpoint; will be recorded again
    covered = sum(last - first + 1 for first, last, _ in list_segments(partial_dir))
    if covered != state["step"] + 1:
        _discard(partial_dir, f"its segments do not cover steps 0..{state['step']}")
        return None
    return state
