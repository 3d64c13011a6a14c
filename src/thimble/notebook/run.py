"""An experiment's results from a notebook: ``run = thimble.open_run("results/thimble_mini")``.

Per-step tensors are read lazily (``thimble.notebook.step_series``): ``run.W[t]`` is the
(V, D) embedding matrix after step t as a bf16 torch tensor, bit for bit;
``run.W[10:20]`` is steps 10..19, ``run.W[1000:1500, run.dead_ids]`` only the
dead tokens' rows. Tables come back as pandas DataFrames and the JSON summaries
as dicts; ``run.to_xarray()`` is the labelled view (``thimble.notebook.xarray_view``).
A missing file is named, with the Snakemake target that makes it.

The tensors come from ``recording.h5`` when it exists (the rechunked file,
which outlives a temporary stream), else from ``stream/``. A read from
``recording.h5`` decodes the whole time chunk that holds the step
(``rechunk.steps_per_chunk`` steps); the run keeps decoded chunks in one
``ChunkCache`` bounded by ``cache_bytes``, so walking through steps in order
decodes each chunk once. ``source="stream"`` reads one step per chunk.

Tables and summaries are checked against the recording beside them before they
are served (``thimble.provenance``): one computed from another recording is
refused, naming the stale files and the target that rebuilds them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from thimble.notebook.chunk_cache import ChunkCache
from thimble.notebook.step_series import StepSeries, step_range  # noqa: F401  (step_range: the run's step indices)
from thimble.outputs import RECORDING_FILE, STREAM_DIR, STREAM_FILE
from thimble.record.codec import require_zstd_filter
from thimble.record.format import open_h5, read_checked
from thimble.record.reader import RecordingSource

if TYPE_CHECKING:
    import pandas
    import torch
    import xarray

DELTA_W_FILE = "delta_w_lattice.h5"
SOURCES = ("auto", "recording", "stream")
MASKS = ("live_mask", "dead_mask", "live_ids", "dead_ids")
#: the column of token_freeze.csv holding each token's text (run.token_text)
TEXT_COLUMN = "token_text"
#: what pandas reads as missing by default (its documented na_values), kept for every column but the text
MISSING_VALUES = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
                  "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]


def make_target(directory: Path, *filenames: str, under_results: str | None = None) -> str:
    """What to run to make ``filenames`` of the experiment in ``directory`` (results/{experiment}), or of
    ``results/{under_results}`` when given."""
    targets = " ".join(f"results/{under_results or directory.name}/{filename}" for filename in filenames)
    results = directory.resolve().parent
    where = results.parent if results.name == "results" else "that made the others"
    return f"`snakemake --cores 1 {targets}` (in the workflow directory {where})"


class Run:
    """The results of one experiment (``results/{experiment}``); see ``open_run``."""

    def __init__(self, directory: str | Path, source: str = "auto", cache_bytes: int | None = None,
                 allow_stale: bool = False):
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory} does not exist: an experiment's results are made by the "
                                    f"workflow, e.g. {make_target(self.directory, 'freeze.csv')}")
        self.experiment = self.directory.name
        self.requested_source = source
        self.allow_stale = allow_stale
        #: decoded chunks of every tensor of the run, within ``cache_bytes`` (thimble.notebook.chunk_cache)
        self.cache = ChunkCache(cache_bytes)
        self._files: dict[str, h5py.File] = {}
        self._series: dict[str, StepSeries] = {}
        self._checked = False
        self._token_text: list[str] | None = None

    @property
    def source(self) -> str:
        """The file the tensors are read from (opening it if need be): recording.h5 or stream/stream.h5."""
        return self._recording().filename

    # -- recorded tensors -----------------------------------------------------
    def _recording(self) -> h5py.File:
        """recording.h5 if present (or asked for), else the stream."""
        if "recording" not in self._files:
            require_zstd_filter()
            source = RecordingSource.in_results(self.directory, self.requested_source)
            if source is None:
                raise FileNotFoundError(f"{self.directory} holds no recording (neither {RECORDING_FILE} nor "
                                        f"{STREAM_DIR}/{STREAM_FILE}): make it with "
                                        f"{make_target(self.directory, RECORDING_FILE)}")
            if not source.is_stream and not source.path.exists():
                raise FileNotFoundError(f"{source.path} does not exist: make it with "
                                        f"{make_target(self.directory, RECORDING_FILE)}")
            self._files["recording"] = source.open()
            if not source.is_stream and (self.directory / ".partial").exists():
                from thimble.provenance import StaleResultWarning

                warnings.warn(f"{self.directory / '.partial'} exists: a training of {self.experiment} is under "
                              f"way or was interrupted, so {source.path} is the previous training's",
                              StaleResultWarning, stacklevel=4)
        return self._files["recording"]

    def _tensor(self, name: str) -> StepSeries:
        if name not in self._series:
            self._series[name] = StepSeries(self._recording()[name], name, self.cache)
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
        from thimble.record.format import stream_tensors

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

        return torch.from_numpy(read_checked(self._recording()["losses"]))

    def _mask(self, name: str) -> torch.Tensor:
        import torch

        return torch.from_numpy(np.asarray(read_checked(self._recording()[name])))

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
            self._files["delta_w_lattice"] = open_h5(path)
            self._check_results()  # ΔW′ carries its recording's attributes: refused if it is another's
            self._series["delta_w_lattice"] = StepSeries(self._files["delta_w_lattice"]["delta_w_lattice"],
                                                         "delta_w_lattice", self.cache)
        return self._series["delta_w_lattice"]

    # -- tables and summaries ---------------------------------------------------
    @property
    def tables(self) -> list[str]:
        """The stems of the experiment's CSV tables present now (``run.table(stem)``)."""
        return sorted(path.stem for path in self.directory.glob("*.csv"))

    def table(self, stem: str) -> pandas.DataFrame:
        """``results/{experiment}/{stem}.csv`` as a DataFrame, e.g. ``run.table("freeze")``."""
        import pandas as pd

        path = self._existing(f"{stem}.csv")
        self._check_results()
        columns = pd.read_csv(path, nrows=0).columns
        if TEXT_COLUMN not in columns:
            return pd.read_csv(path)
        # token texts are read as written: 'NA', 'None' or 'nan' are tokens, not missing values
        return pd.read_csv(path, keep_default_na=False, dtype={TEXT_COLUMN: str},
                           na_values={name: MISSING_VALUES for name in columns if name != TEXT_COLUMN})

    def json(self, stem: str) -> dict:
        """``results/{experiment}/{stem}.json`` as a dict."""
        path = self._existing(f"{stem}.json")
        self._check_results()
        return json.loads(path.read_text())

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

    # -- belonging together -----------------------------------------------------
    @property
    def stale(self) -> list:
        """The outputs here that were not computed from the recording beside them (``thimble.provenance``):
        one ``Stale`` per file, with why and the target that rebuilds it; empty when all belong."""
        from thimble.provenance import stale_results

        return stale_results(self.directory, dict(self._recording().attrs), Path(self.source).name)

    def _check_results(self) -> None:
        """Refuse tables, summaries and ΔW′ of another recording (with ``allow_stale``: warn), and warn about
        those that cannot be told (written before thimble recorded provenance)."""
        if self._checked:
            return
        from thimble.provenance import StaleResultError, StaleResultWarning, describe, rebuild_targets

        def message(items) -> str:
            return (f"{describe(self.directory, items)}. Rebuild them with "
                    f"{make_target(self.directory, *rebuild_targets(items))}")

        stale = self.stale
        certain = [item for item in stale if item.certain]
        if certain and not self.allow_stale:
            raise StaleResultError(message(certain) + "; or open_run(..., allow_stale=True) to read them anyway")
        if stale:
            warnings.warn(message(stale), StaleResultWarning, stacklevel=3)
        self._checked = True

    # -- tokens and the labelled view -------------------------------------------
    @property
    def token_text(self) -> list[str]:
        """Each token id's text as the dataset's tokenizer decodes it alone (byte-level BPE: 'Ġloue' is
        ' loue'; a token holding part of a UTF-8 character decodes to '\ufffd')."""
        if self._token_text is None:
            from thimble.data.tokenizer import token_texts

            dataset = str(self.attrs["dataset"])
            path = self.directory.parent / "data" / dataset / "tokenizer.json"
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist: make it with "
                                        f"{make_target(self.directory, 'tokenizer.json', under_results='data/' + dataset)}")
            self._token_text = token_texts(path, int(self.attrs["vocab_size"]))
        return self._token_text

    def to_xarray(self, dtype: str = "float32") -> xarray.Dataset:
        """The recorded tensors as a lazy xarray Dataset labelled (step, token, dim), with token text and
        group (dead/live) coordinates; ``dtype="bfloat16"`` gives ml_dtypes bf16 (see thimble.notebook.xarray_view)."""
        from thimble.notebook.xarray_view import run_dataset

        return run_dataset(self, dtype)

    # -- lifetime -------------------------------------------------------------
    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        self._series.clear()
        self.cache.clear()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        opened = self._files.get("recording")
        source = Path(opened.filename).name if opened is not None else f"{self.requested_source}, not opened yet"
        return f"<thimble run {self.experiment} at {self.directory} (source {source})>"


def open_run(directory: str | Path, source: str = "auto", cache_bytes: int | None = None,
             allow_stale: bool = False) -> Run:
    """Open an experiment's results folder, ``results/{experiment}``, for reading.

    ``source``: ``"auto"`` reads the tensors from ``recording.h5`` when it exists,
    else from ``stream/``; ``"recording"`` or ``"stream"`` insist on one.
    ``cache_bytes``: the most memory decoded chunks may hold (default: a quarter of
    the machine's memory, at most 4 GiB; 0 keeps none).
    ``allow_stale``: serve tables that were not computed from this recording with a
    ``StaleResultWarning`` instead of refusing them.
    Nothing is read until it is asked for.
    """
    return Run(directory, source, cache_bytes, allow_stale)
