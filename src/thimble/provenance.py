"""What an output was computed from, written by the stages and checked by ``open_run``.

A recording's identity is the sha256 of the attributes that determine its bits:
the training settings' hash, the resume key (those settings and the sha256 of
the tokens and masks), the update rule, the storage dtype, the device, the CPU
kernels and the torch build; for a recording made by a loop of the user's (thimble.Recorder), which has no
training settings, the sha256 of its tensors' bits, which rechunk writes (``source_tensors_sha256``). The
stream, the rechunked ``recording.h5`` and
``delta_w_lattice.h5`` carry these attributes (each copies its source's), so the
identity is the same in all of them; a retrain with another seed, other inputs
or on another CPU kernel set changes it.

The stages that write tables record in their JSON summary (``summary.json`` for
the freeze stage, ``replay.json`` for the replay) a ``provenance`` block: the
identity of the recording they read, the hash of their settings and the sha256
of every table they wrote. ``stale_results`` compares those with the recording
beside them, so that a table of another training, or a table replaced by hand,
is named with the target that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from thimble.errors import ThimbleError
from thimble.outputs import (
    DELTA_W_FILE,
    EXPERIMENT_FILES,
    FREEZE_OUTPUTS,
    RECORDING_FILE,
    REPLAY_OUTPUTS,
    RESUME_DIR,
    STREAM_DIR,
    STREAM_FILE,
)
from thimble.util.files import sha256_file

#: the recording attributes that determine its bits (thimble.training.train writes them; the stages copy them on)
IDENTITY_ATTRS = ("config_hash", "resume_key", "update_rule", "storage_dtype", "device", "cpu_capability",
                  "torch_version")
#: what else determines the bits of a recording made by a loop of the user's (thimble.Recorder), which has no
#: training settings: its tensors' sha256, written by rechunk
RECORDER_IDENTITY_ATTRS = ("source_tensors_sha256",)
#: attributes quoted in messages, so that a user sees which training a table came from
SHOWN_ATTRS = ("seed", "num_steps", "learning_rate", "update_rule", "cpu_capability")
#: the stage whose JSON summary carries the provenance of its tables
MANIFESTS = {"freeze": FREEZE_OUTPUTS["summary"], "replay": REPLAY_OUTPUTS["summary"]}
PROVENANCE_KEY = "provenance"


class StaleResultError(ThimbleError):
    """A table, summary or ΔW′ file was not computed from the recording beside it."""


class StaleResultWarning(UserWarning):
    """Served anyway (``open_run(..., allow_stale=True)``), or not known to belong: see the message."""


def plain(value):
    """An HDF5 attribute as JSON-able Python (bytes decoded, numpy scalars unwrapped)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def recording_identity(attrs) -> str:
    """The sha256 of a recording's bit-determining attributes (``IDENTITY_ATTRS``, ``RECORDER_IDENTITY_ATTRS``)."""
    chosen = {name: plain(attrs[name]) for name in IDENTITY_ATTRS + RECORDER_IDENTITY_ATTRS if name in attrs}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()


def shown(attrs) -> dict:
    return {name: plain(attrs[name]) for name in SHOWN_ATTRS if name in attrs}


def computed_from(source: str | Path, attrs) -> dict:
    """The provenance of what was read: the file, its recording's identity and the quoted attributes."""
    return {"file": Path(source).name, "recording_identity": recording_identity(attrs), **shown(attrs)}


def stage_provenance(source: str | Path, attrs, settings_hash: str | None, outputs: list[str]) -> dict:
    """A stage's ``provenance`` block: what it read, the hash of its settings (None for a stage that reads no
    settings: the replay takes its hyperparameters from the recording), and each written table's sha256."""
    return {"computed_from": computed_from(source, attrs), "settings_hash": settings_hash,
            "outputs_sha256": {Path(path).name: sha256_file(path) for path in outputs}}


@dataclass(frozen=True)
class Stale:
    """One output that does not (or may not) belong to the recording beside it."""

    file: str
    why: str
    #: the experiment file whose Snakemake target rebuilds it
    target: str
    #: False when it cannot be told (no provenance recorded): warned about, not refused
    certain: bool = True


def _read_attrs(path: Path) -> dict:
    from thimble.record.format import open_h5

    with open_h5(path) as handle:
        return dict(handle.attrs)


def _difference(found: dict, recording: dict, recording_name: str) -> str:
    changed = [f"{name} {found.get(name)!r} there, {plain(recording.get(name))!r} in {recording_name}"
               for name in SHOWN_ATTRS if found.get(name) != plain(recording.get(name))]
    return "; ".join(changed) if changed else "its recording identity differs (settings, inputs or CPU kernels)"


def stale_results(directory: str | Path, recording_attrs, recording_name: str) -> list[Stale]:
    """Every output in ``directory`` (results/{experiment}) that was not computed from the recording whose
    attributes are ``recording_attrs`` (the file ``recording_name``), each with why and what rebuilds it."""
    directory = Path(directory)
    identity = recording_identity(recording_attrs)
    stale = [*_training_under_way(directory, recording_name),
             *_stale_recording(directory, identity, recording_attrs, recording_name),
             *_stale_delta_w(directory, identity, recording_attrs, recording_name)]
    for stage, manifest in MANIFESTS.items():
        stale += _stale_tables(directory, stage, manifest, identity, recording_attrs, recording_name)
    return stale


def _training_under_way(directory: Path, recording_name: str) -> list[Stale]:
    """The recording, while training's resume state says a new one is being made."""
    resume = directory / RESUME_DIR
    if not resume.exists():
        return []
    return [Stale(recording_name, "a training of this experiment is under way or was interrupted "
                  f"({resume} exists): the recording and everything computed from it are the previous training's",
                  RECORDING_FILE)]


def _stale_recording(directory: Path, identity: str, recording_attrs, recording_name: str) -> list[Stale]:
    """recording.h5, when the stream beside it is another training's."""
    stream = directory / STREAM_DIR / STREAM_FILE
    if recording_name != RECORDING_FILE or not stream.exists():
        return []
    if "source_stream_sha256" in recording_attrs:
        # an outside recording that the loop wrote into the experiment's folder: its stream carries no tensor
        # digest, rechunk wrote the sha256 of the stream.h5 it read
        if sha256_file(stream) == plain(recording_attrs["source_stream_sha256"]):
            return []
        return [Stale(RECORDING_FILE, f"it was rechunked from another recording than {STREAM_DIR}/ (its "
                      f"{STREAM_FILE} has changed since)", RECORDING_FILE)]
    stream_attrs = _read_attrs(stream)
    if recording_identity(stream_attrs) == identity:
        return []
    return [Stale(RECORDING_FILE, f"it was rechunked from another training than {STREAM_DIR}/ ("
                  f"{_difference(shown(recording_attrs), stream_attrs, STREAM_DIR + '/')})", RECORDING_FILE)]


def _stale_delta_w(directory: Path, identity: str, recording_attrs, recording_name: str) -> list[Stale]:
    """ΔW′, when the attributes it copied are another recording's."""
    delta = directory / DELTA_W_FILE
    if not delta.exists():
        return []
    delta_attrs = _read_attrs(delta)
    if recording_identity(delta_attrs) == identity:
        return []
    return [Stale(DELTA_W_FILE, "computed from another recording ("
                  f"{_difference(shown(delta_attrs), recording_attrs, recording_name)})", DELTA_W_FILE)]


def _stale_tables(directory: Path, stage: str, manifest: str, identity: str, recording_attrs,
                  recording_name: str) -> list[Stale]:
    tables = [name for name, writer in EXPERIMENT_FILES.items()
              if writer == stage and name.endswith(".csv") and (directory / name).exists()]
    path = directory / manifest
    if not path.exists():
        return [Stale(name, f"{manifest}, which records what its stage computed from, is missing", manifest,
                      certain=False) for name in tables]
    provenance = json.loads(path.read_text()).get(PROVENANCE_KEY)
    if provenance is None:
        return [Stale(name, f"{manifest} records no provenance (written by an older thimble): which recording "
                      "it was computed from cannot be told", manifest, certain=False) for name in [manifest, *tables]]
    source = provenance["computed_from"]
    if source["recording_identity"] != identity:
        why = f"computed from another recording ({_difference(source, recording_attrs, recording_name)})"
        return [Stale(name, why, manifest) for name in [manifest, *tables]]
    stale = []
    for name, digest in provenance["outputs_sha256"].items():
        if (directory / name).exists() and sha256_file(directory / name) != digest:
            stale.append(Stale(name, f"its bytes are not those its stage wrote beside {manifest} (replaced or "
                               "edited since)", manifest))
    return stale


def rebuild_targets(stale: list[Stale]) -> list[str]:
    """The experiment files whose Snakemake targets rebuild every stale output."""
    return sorted({item.target for item in stale})


def describe(directory: str | Path, stale: list[Stale]) -> str:
    """One message naming every stale file and why (the caller adds the command that rebuilds them)."""
    by_reason: dict[str, list[str]] = {}
    for item in stale:
        by_reason.setdefault(item.why, []).append(item.file)
    reasons = "; ".join(f"{', '.join(files)}: {why}" for why, files in by_reason.items())
    verb = "do not belong" if all(item.certain for item in stale) else "may not belong"
    return f"{directory}: {len(stale)} file(s) {verb} to the recording beside them. {reasons}"
