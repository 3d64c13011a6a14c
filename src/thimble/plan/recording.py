"""An outside recording, as the workflow plans the experiment that analyses it (``source: {recording: <path>}``).

While Snakemake builds the DAG (``snakemake -n`` included) nothing may import h5py or torch, so what the rules ask
of a recording is read from its stream folder without opening an HDF5 file: the names of its segments (which
steps each holds), whether ``stream.h5`` exists (the recorder writes it when it closes), and ``recorder.json``,
the JSON the recorder writes beside its segments (the run's attributes: ``recorded_by``, ``experiment``,
``param_names``, ``recorded_params``: each parameter's shape and the dtype of each tensor kept of it).
``folder_problem`` says what keeps a recording from being analysed as the config says, naming the file and the
fix; ``recorded_run`` gives the sizes the jobs' resources are computed from (``thimble.plan.costs.RecordedRun``).
``thimble plan`` reads the same from ``stream.h5`` itself (``recorded_run_of_stream``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from thimble.config import recording_mismatch, recording_path, recording_source, window_problem
from thimble.errors import DataError
from thimble.outputs import RECORDER as RECORDER_SOURCE
from thimble.outputs import RECORDER_RUN_FILE as RUN_FILE
from thimble.outputs import STREAM_DIR, STREAM_FILE
from thimble.plan.costs import RecordedRun

#: a complete segment's name (``thimble.record.format.segment_name``): the first and last step it holds
SEGMENT_NAME = re.compile(r"segment_(\d+)-(\d+)\.h5")


@dataclass(frozen=True)
class RecordingFolder:
    """What a recording's folder holds, by names only: its stream folder, the complete segments (first step,
    last step, path) in step order, whether ``stream.h5`` is there, and ``recorder.json`` (None when absent;
    its text when it is not JSON)."""

    path: Path
    stream: Path
    segments: tuple[tuple[int, int, Path], ...]
    finished: bool
    run: dict | str | None

    @property
    def run_file(self) -> Path:
        return self.stream / RUN_FILE

    @property
    def stream_file(self) -> Path:
        return self.stream / STREAM_FILE

    @property
    def attrs(self) -> dict:
        return self.run.get("attrs", {}) if isinstance(self.run, dict) else {}

    @property
    def last_step(self) -> int:
        """The last step the complete segments hold (what ``stream.h5`` covers once it is written)."""
        return self.segments[-1][1]


def read_folder(path: Path) -> RecordingFolder:
    """``path``'s stream folder, by names (and recorder.json); nothing is decoded."""
    stream = path / STREAM_DIR
    segments = []
    if stream.is_dir():
        for item in stream.iterdir():
            match = SEGMENT_NAME.fullmatch(item.name)
            if match:
                segments.append((int(match.group(1)), int(match.group(2)), item))
    run: dict | str | None = None
    if (stream / RUN_FILE).is_file():
        text = (stream / RUN_FILE).read_text(errors="replace")
        try:
            run = json.loads(text)
        except json.JSONDecodeError:
            run = text
    return RecordingFolder(path, stream, tuple(sorted(segments)), (stream / STREAM_FILE).is_file(), run)


def shown_path(path: Path, workdir: Path) -> str:
    """A recording's path for a message: relative ones with the directory they are taken from."""
    return str(path) if path.is_absolute() else f"{path} (in {Path(workdir).resolve()})"


def folder_problem(experiment: dict, workdir: Path = Path(".")) -> str | None:
    """Why the recording an experiment analyses cannot be analysed as its config says, or None: it is missing, or
    partial (segments and no stream.h5), or not thimble.Recorder's, a segment is missing, it records no parameter
    the config's ``source.tensors`` expects, it was recorded under another name than ``source.experiment``, or an
    analysis window ends after its last step. Each message names the file and the fix."""
    key = f"experiments.{experiment['name']}"
    source = recording_source(experiment)
    path = recording_path(experiment, workdir)
    folder = read_folder(path)
    shown = shown_path(Path(source["recording"]).expanduser(), workdir)
    if not path.exists():
        return (f"config key {key}.source.recording: {shown} does not exist; record into it with "
                f"thimble.Recorder({source['recording']!r}, model, optimizer), or point source.recording at the "
                "folder a Recorder wrote (relative paths are taken from the workflow's working directory)")
    if not folder.stream.is_dir():
        return (f"config key {key}.source.recording: {shown} holds no recording ({folder.stream} is missing: "
                "thimble.Recorder(path, ...) writes its stream there); point source.recording at the folder the "
                "Recorder was given")
    if not folder.finished:
        if folder.segments:
            return (f"{folder.stream} holds a partial recording: segments of steps {folder.segments[0][0]}.."
                    f"{folder.last_step} but no {STREAM_FILE} (the loop recording it is still running, or it "
                    f"stopped before closing its recorder). If it stopped, make it readable with "
                    f"thimble.record.recorder.close_partial({str(path.resolve())!r}) (it keeps the complete "
                    f"segments, steps 0..{folder.last_step}), or record again")
        return (f"{folder.stream} holds no recording (neither {STREAM_FILE} nor a segment): record again, or point "
                f"config key {key}.source.recording at the folder a Recorder wrote")
    if folder.run is None:
        return (f"{folder.stream_file} was not written by thimble.Recorder (there is no {RUN_FILE} beside it; "
                "thimble's own training writes none): an experiment whose source is a recording analyses a "
                "recording of thimble.Recorder; to analyse a thimble training, give the experiment a dataset and "
                f"its training settings instead of config key {key}.source")
    recorded_by = folder.attrs.get("recorded_by")
    if recorded_by != RECORDER_SOURCE:
        what = "is not JSON" if isinstance(folder.run, str) else f"says it was recorded by {recorded_by!r}"
        return (f"{folder.run_file} {what}, not {RECORDER_SOURCE!r}: {folder.stream} is not a recording of "
                f"thimble.Recorder; point config key {key}.source.recording at one")
    missing = missing_steps(folder)
    if missing:
        return (f"{folder.stream}: no segment holds steps {missing[0]}..{missing[1]} (a segment is missing); "
                f"restore it, or record again")
    names = folder.attrs.get("param_names")
    if "recorded_params" not in folder.attrs or names is None:
        return (f"{folder.run_file} does not list the recorded parameters (param_names, recorded_params), which "
                "the workflow reads there to plan the jobs without opening the HDF5 files: it was written by a "
                "thimble whose recorder did not write them; record again with this thimble")
    mismatch = recording_mismatch(key, source, str(folder.run_file), json.loads(names),
                                  folder.attrs.get("experiment"))
    if mismatch:
        return mismatch
    return window_problem(experiment, folder.last_step, str(folder.stream))


def missing_steps(folder: RecordingFolder) -> tuple[int, int] | None:
    """The first steps (first, last) between 0 and the last segment's end that no segment holds, or None."""
    expected = 0
    for first, last, _ in folder.segments:
        if first > expected:
            return expected, first - 1
        expected = max(expected, last + 1)
    return None


def recorded_run(experiment: dict, workdir: Path = Path(".")) -> RecordedRun:
    """The sizes of the recording an experiment analyses, from recorder.json and the segments' names (call
    ``folder_problem`` first: this assumes a recording it found nothing wrong with)."""
    folder = read_folder(recording_path(experiment, workdir))
    params = json.loads(folder.attrs["recorded_params"])
    return RecordedRun(folder.last_step, {name: (tuple(entry["shape"]), dict(entry["tensors"]))
                                          for name, entry in params.items()}, experiment["rechunk"])


def recorded_run_of_stream(experiment: dict, workdir: Path = Path(".")) -> tuple[RecordedRun, dict]:
    """For ``thimble plan``: the recording's sizes from its ``stream.h5`` (the recorded parameters its attributes
    state, each dataset's shape as stored) and its attributes."""
    from thimble.provenance import plain
    from thimble.record.format import RecordLayout, open_h5

    folder = read_folder(recording_path(experiment, workdir))
    with open_h5(folder.stream_file) as stream:
        layout = RecordLayout.of_file(stream)
        steps = stream["losses"].shape[0] - 1
        params = {}
        for name, param in layout.params.items():
            shapes = {stream[path].shape for path in param.paths.values()}
            params[name] = (tuple(param.shape), dict(param.dtypes))
            if shapes != {(steps + 1, *param.shape)}:
                raise DataError(f"{folder.stream_file}: {name}'s datasets have shapes {sorted(shapes)}, not "
                                f"({steps + 1}, {', '.join(map(str, param.shape))}) as its attributes say; the "
                                "recording is damaged: record again")
        attrs = {key: plain(value) for key, value in stream.attrs.items()}
    return RecordedRun(steps, params, experiment["rechunk"]), attrs
