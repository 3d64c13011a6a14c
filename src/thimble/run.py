"""An experiment's results from a notebook: ``run = thimble.open_run("results/thimble_mini")``.

Per-step tensors are read lazily, a step or a range of steps at a time, with
the recorder's own readers (``thimble.record.read_steps_torch``): ``run.W[t]``
is the (V, D) embedding matrix after step t as a bf16 torch tensor, bit for
bit; ``run.W[10:20]`` is steps 10..19. Tables come back as pandas DataFrames
and the JSON summaries as dicts. A missing file is named, with the Snakemake
target that makes it.

The tensors come from ``recording.h5`` when it exists (the rechunked file,
which outlives a temporary stream), else from ``stream/``. A read from
``recording.h5`` decodes the whole time chunk that holds the step
(``rechunk.steps_per_chunk`` steps) and keeps it, so walking through steps in
order decodes each chunk once; ``source="stream"`` reads one step per chunk.
"""

from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from thimble.codec import require_zstd_filter
from thimble.record import STREAM_FILE, open_stream, read_steps_torch

if TYPE_CHECKING:
    import pandas
    import torch

RECORDING_FILE = "recording.h5"
DELTA_W_FILE = "delta_w_lattice.h5"
SOURCES = ("auto", "recording", "stream")
MASKS = ("live_mask", "dead_mask", "live_ids", "dead_ids")


def step_range(index, n_steps: int) -> tuple[int, int, int] | int:
    """An index over steps 0..n_steps-1 as one step (int) or (start, stop, stride) (slice)."""
    if isinstance(index, slice):
        return index.indices(n_steps)
    try:
        step = operator.index(index)
    except TypeError:
        raise TypeError(f"steps are indexed by an int or a slice, not {type(index).__name__}") from None
    if not -n_steps <= step < n_steps:
        raise IndexError(f"step {step} is out of range: the run has steps 0..{n_steps - 1}")
    return step % n_steps


def make_target(directory: Path, filename: str) -> str:
    """What to run to make ``filename`` of the experiment in ``directory`` (results/{experiment})."""
    target = f"results/{directory.name}/{filename}"
    results = directory.resolve().parent
    where = results.parent if results.name == "results" else "that made the others"
    return f"`snakemake --cores 1 {target}` (in the workflow directory {where})"


class StepSeries:
    """One recorded per-step tensor of shape (T+1, ...), read lazily: ``series[t]``, ``series[a:b]``."""

    def __init__(self, dataset: h5py.Dataset, name: str):
        self._dataset, self.name = dataset, name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._dataset.shape)

    def __len__(self) -> int:
        return self._dataset.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        import torch

        steps = step_range(index, len(self))
        if isinstance(steps, int):
            return self._read(steps, steps + 1)[0]
        start, stop, stride = steps
        if stride == 1 or start >= stop:
            return self._read(start, max(start, stop))
        # a strided selection reads only the steps it names
        return torch.stack([self._read(step, step + 1)[0] for step in range(start, stop, stride)])

    def _read(self, start: int, stop: int) -> torch.Tensor:
        return read_steps_torch(self._dataset, start, stop)

    def __repr__(self) -> str:
        return f"<StepSeries {self.name}: {len(self)} steps of {self.shape[1:]}>"


def open_cached(handle: h5py.File, name: str) -> h5py.Dataset:
    """``handle[name]`` with a chunk cache holding one whole chunk, so that steps read in order from a
    many-step chunk decode it once (HDF5's default cache, 1 MiB, keeps no chunk larger than that)."""
    dataset = handle[name]
    if dataset.chunks is None or dataset.chunks[0] == 1:
        return dataset
    chunk_bytes = int(np.prod(dataset.chunks)) * dataset.id.get_type().get_size()
    access = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    access.set_chunk_cache(521, chunk_bytes + 1, 1.0)
    return h5py.Dataset(h5py.h5d.open(handle.id, name.encode(), access))


class Run:
    """The results of one experiment (``results/{experiment}``); see ``open_run``."""

    def __init__(self, directory: str | Path, source: str = "auto"):
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory} does not exist: an experiment's results are made by the "
                                    f"workflow, e.g. {make_target(self.directory, 'freeze.csv')}")
        self.experiment = self.directory.name
        self.source = source
        self._files: dict[str, h5py.File] = {}
        self._series: dict[str, StepSeries] = {}

    # -- recorded tensors -----------------------------------------------------
    def _recording(self) -> h5py.File:
        """recording.h5 if present (or asked for), else the stream."""
        if "recording" not in self._files:
            require_zstd_filter()
            recording = self.directory / RECORDING_FILE
            stream = self.directory / "stream"
            if self.source == "recording" or (self.source == "auto" and recording.exists()):
                if not recording.exists():
                    raise FileNotFoundError(f"{recording} does not exist: make it with "
                                            f"{make_target(self.directory, RECORDING_FILE)}")
                self._files["recording"] = h5py.File(recording, "r")
            elif (stream / STREAM_FILE).exists():
                self._files["recording"] = open_stream(stream)
            else:
                raise FileNotFoundError(
                    f"{self.directory} holds no recording (neither {RECORDING_FILE} nor stream/{STREAM_FILE}): "
                    f"make it with {make_target(self.directory, RECORDING_FILE)}")
        return self._files["recording"]

    def _tensor(self, name: str) -> StepSeries:
        if name not in self._series:
            self._series[name] = StepSeries(open_cached(self._recording(), name), name)
        return self._series[name]

    @property
    def W(self) -> StepSeries:
        """The embedding matrix after step t, (T+1, V, D)."""
        return self._tensor("W")

    @property
    def grad_W(self) -> StepSeries:
        """The gradient step t applied (zeros at t = 0)."""
        return self._tensor("grad_W")

    @property
    def momentum_W(self) -> StepSeries:
        """AdamW's exp_avg after step t."""
        return self._tensor("momentum_W")

    @property
    def variance_W(self) -> StepSeries:
        """AdamW's exp_avg_sq after step t."""
        return self._tensor("variance_W")

    @property
    def update_rule(self) -> str:
        """training.update_rule of the run (docs/update_rules.md)."""
        from thimble.update_rules import rule_of

        return rule_of(self._recording().attrs)

    @property
    def recorded_tensors(self) -> dict[str, str]:
        """Every recorded per-step tensor and its stored dtype (float32 state under fp32_master)."""
        from thimble.record import stream_tensors

        return stream_tensors(self._recording())

    def tensor(self, name: str) -> StepSeries:
        """Any recorded tensor by name, e.g. ``master_W`` (fp32_master) or ``kahan_compensation_W`` (kahan)."""
        if name not in self.recorded_tensors:
            raise KeyError(f"{name!r} is not recorded under update rule {self.update_rule}; recorded: "
                           f"{', '.join(self.recorded_tensors)}")
        return self._tensor(name)

    @property
    def losses(self) -> torch.Tensor:
        """Training loss per step, float32 (NaN at t = 0)."""
        import torch

        return torch.from_numpy(self._recording()["losses"][...])

    def _mask(self, name: str) -> torch.Tensor:
        import torch

        return torch.from_numpy(np.asarray(self._recording()[name][...]))

    @property
    def live_mask(self) -> torch.Tensor:
        """(V,) bool: the token occurs in the model corpus."""
        return self._mask("live_mask")

    @property
    def dead_mask(self) -> torch.Tensor:
        """(V,) bool: the token never occurs in the model corpus."""
        return self._mask("dead_mask")

    @property
    def live_ids(self) -> torch.Tensor:
        return self._mask("live_ids")

    @property
    def dead_ids(self) -> torch.Tensor:
        return self._mask("dead_ids")

    @property
    def attrs(self) -> dict:
        """The recording's attributes: hyperparameters, config hash, provenance."""
        return dict(self._recording().attrs)

    @property
    def storage_dtype(self) -> str:
        """bfloat16 (bit for bit), or float16 (the seed's lossy storage; tensors come back as float16)."""
        return str(self._recording().attrs.get("storage_dtype", "bfloat16"))

    # -- ΔW′ ------------------------------------------------------------------
    @property
    def delta_w_lattice(self) -> StepSeries:
        """ΔW′[t]: signed bf16 lattice steps from W[t-1] to W[t] (int16 or int32; row 0 is 0)."""
        if "delta_w_lattice" not in self._series:
            require_zstd_filter()
            path = self.directory / DELTA_W_FILE
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist: make it with "
                                        f"{make_target(self.directory, DELTA_W_FILE)}")
            self._files["delta_w_lattice"] = h5py.File(path, "r")
            self._series["delta_w_lattice"] = StepSeries(open_cached(self._files["delta_w_lattice"],
                                                                     "delta_w_lattice"), "delta_w_lattice")
        return self._series["delta_w_lattice"]

    # -- tables and summaries ---------------------------------------------------
    @property
    def tables(self) -> list[str]:
        """The stems of the experiment's CSV tables present now (``run.table(stem)``)."""
        return sorted(path.stem for path in self.directory.glob("*.csv"))

    def table(self, stem: str) -> pandas.DataFrame:
        """``results/{experiment}/{stem}.csv`` as a DataFrame, e.g. ``run.table("freeze")``."""
        import pandas as pd

        return pd.read_csv(self._existing(f"{stem}.csv"))

    def json(self, stem: str) -> dict:
        """``results/{experiment}/{stem}.json`` as a dict."""
        return json.loads(self._existing(f"{stem}.json").read_text())

    @property
    def summary(self) -> dict:
        """summary.json: per window and group freeze statistics, the trend and the cooling verdict."""
        return self.json("summary")

    @property
    def replay(self) -> dict:
        """replay.json: the bitwise AdamW replay's mismatches and the freeze criterion."""
        return self.json("replay")

    def _existing(self, filename: str) -> Path:
        from thimble.outputs import EXPERIMENT_FILES

        path = self.directory / filename
        if path.exists():
            return path
        if filename in EXPERIMENT_FILES:
            raise FileNotFoundError(f"{path} does not exist: make it with {make_target(self.directory, filename)}")
        suffix = Path(filename).suffix
        made = sorted(name.removesuffix(suffix) for name in EXPERIMENT_FILES if name.endswith(suffix)
                      and "/" not in name)
        raise FileNotFoundError(f"{path} does not exist, and the workflow makes no such file; "
                                f"its {suffix} files are: {', '.join(made)}")

    # -- lifetime -------------------------------------------------------------
    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        self._series.clear()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<thimble run {self.experiment} at {self.directory} (source {self.source})>"


def open_run(directory: str | Path, source: str = "auto") -> Run:
    """Open an experiment's results folder, ``results/{experiment}``, for reading.

    ``source``: ``"auto"`` reads the tensors from ``recording.h5`` when it exists,
    else from ``stream/``; ``"recording"`` or ``"stream"`` insist on one.
    Nothing is read until it is asked for.
    """
    return Run(directory, source)
