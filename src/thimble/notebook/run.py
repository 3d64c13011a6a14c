"""An experiment's results from a notebook: ``run = thimble.open_run("results/thimble_mini")``.

Per-step tensors are read lazily (``thimble.notebook.step_series``): ``run.W[t]`` is the
(V, D) embedding matrix after step t as a bf16 torch tensor, bit for bit;
``run.W[10:20]`` is steps 10..19, ``run.W[1000:1500, run.dead_ids]`` only the
dead tokens' rows. Every recorded parameter is read alike: ``run.params`` names them,
``run.param(name).value``, ``.grad`` and ``.state("exp_avg")`` are its series
(``thimble.notebook.parameters``). Tables come back as pandas DataFrames and the JSON
summaries as dicts; ``run.to_xarray()`` (the embedding) and ``run.to_datatree()`` (every
parameter) are the labelled views (``thimble.notebook.xarray_view``). A missing file is
named, with the Snakemake target that makes it.

The tensors come from ``recording.h5`` when it exists (the rechunked file,
which outlives a temporary stream), else from ``stream/``. A read from
``recording.h5`` decodes the whole time chunk that holds the step
(``rechunk.steps_per_chunk`` steps); the run keeps decoded chunks in one
``ChunkCache`` bounded by ``cache_bytes``, so walking through steps in order
decodes each chunk once. ``source="stream"`` reads one step per chunk.

Tables and summaries are checked against the recording beside them before they
are served (``thimble.provenance``): one computed from another recording is
refused, naming the stale files and the target that rebuilds them.

A ``Run`` is made of parts, each doing one thing: ``RunFiles`` opens the HDF5 files,
``RecordedSeries`` serves every recorded tensor as a ``StepSeries``, ``ResultFiles``
serves the tables and summaries once they are known to belong to the recording.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from thimble.notebook.chunk_cache import ChunkCache
from thimble.notebook.parameters import NotRecordedError, Parameter, RecordedSeries, parameter_axes_of
from thimble.notebook.step_series import StepSeries
from thimble.outputs import (
    DATA_DIR,
    DELTA_W_DATASET,
    DELTA_W_FILE,
    EXPERIMENT_FILES,
    FREEZE_OUTPUTS,
    RECORDING_FILE,
    REPLAY_OUTPUTS,
    RESULTS_DIR,
    RESUME_DIR,
    STREAM_DIR,
    STREAM_FILE,
    TOKEN_TEXT_COLUMN,
    TOKENIZER_FILE,
    dataset_dir,
)
from thimble.provenance import StaleResultError, StaleResultWarning, describe, rebuild_targets, stale_results
from thimble.record.codec import require_zstd_filter
from thimble.record.format import PARAMS_GROUP, open_h5, param_dataset, read_checked
from thimble.record.reader import RecordingSource
from thimble.sizes import EMBEDDING
from thimble.update_rules import rule_of

if TYPE_CHECKING:
    import pandas
    import torch
    import xarray

SOURCES = ("auto", "recording", "stream")
#: what pandas reads as missing by default (its documented na_values), kept for every column but the text
MISSING_VALUES = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
                  "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]


def make_target(directory: Path, *filenames: str, under_results: str | None = None) -> str:
    """What to run to make ``filenames`` of the experiment in ``directory`` (results/{experiment}), or of
    ``results/{under_results}`` when given."""
    targets = " ".join(f"{RESULTS_DIR}/{under_results or directory.name}/{filename}" for filename in filenames)
    results = directory.resolve().parent
    where = results.parent if results.name == RESULTS_DIR else "that made the others"
    return f"`snakemake --cores 1 {targets}` (in the workflow directory {where})"


class RunFiles:
    """The HDF5 files of an experiment's results folder, each opened when first asked for; a missing one
    is named with the target that makes it."""

    def __init__(self, directory: Path, requested_source: str):
        self.directory, self.requested_source = directory, requested_source
        self._recording: h5py.File | None = None
        self._delta_w: h5py.File | None = None

    @property
    def recording(self) -> h5py.File:
        """recording.h5 if present (or asked for), else the stream."""
        if self._recording is None:
            source = self._recording_source()
            self._recording = source.open()
            self._warn_if_superseded(source)
        return self._recording

    @property
    def opened_recording(self) -> h5py.File | None:
        """The recording if it was opened, else None (opening nothing)."""
        return self._recording

    def _recording_source(self) -> RecordingSource:
        require_zstd_filter()
        source = RecordingSource.in_results(self.directory, self.requested_source)
        if source is None:
            raise FileNotFoundError(f"{self.directory} holds no recording (neither {RECORDING_FILE} nor "
                                    f"{STREAM_DIR}/{STREAM_FILE}): make it with "
                                    f"{make_target(self.directory, RECORDING_FILE)}")
        if not source.is_stream and not source.path.exists():
            raise FileNotFoundError(f"{source.path} does not exist: make it with "
                                    f"{make_target(self.directory, RECORDING_FILE)}")
        return source

    def _warn_if_superseded(self, source: RecordingSource) -> None:
        """Warn when recording.h5 is the previous training's: a training of the experiment is under way."""
        resume = self.directory / RESUME_DIR
        if not source.is_stream and resume.exists():
            # stacklevel: the line reading run.W, through .recording, Run._tensors and the descriptor
            warnings.warn(f"{resume} exists: a training of {self.directory.name} is under way or was interrupted, "
                          f"so {source.path} is the previous training's", StaleResultWarning, stacklevel=5)

    @property
    def delta_w(self) -> h5py.File:
        """ΔW′ (the lattice stage's file)."""
        if self._delta_w is None:
            require_zstd_filter()
            path = self.directory / DELTA_W_FILE
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist: make it with "
                                        f"{make_target(self.directory, DELTA_W_FILE)}")
            self._delta_w = open_h5(path)
        return self._delta_w

    def close(self) -> None:
        for handle in (self._recording, self._delta_w):
            if handle is not None:
                handle.close()
        self._recording = self._delta_w = None


class _Recorded:
    """One of the embedding's recorded tensors as an attribute of the run (``run.W`` is ``run.tensor("W")``, the
    same series as ``run.param("transformer.wte.weight").value``)."""

    def __init__(self, doc: str):
        self.__doc__ = doc

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, run: Run | None, owner=None):
        return self if run is None else run._tensors[self.name]


class _TokenSelection:
    """A (V,) mask or id list the recording holds (live_mask, dead_mask, live_ids, dead_ids) as an attribute
    of the run, read with its checksum verified."""

    def __init__(self, doc: str):
        self.__doc__ = doc

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, run: Run | None, owner=None):
        if run is None:
            return self
        import torch

        return torch.from_numpy(np.asarray(read_checked(run._files.recording[self.name])))


def read_table(path: Path) -> pandas.DataFrame:
    """A CSV table, its token texts read as written: 'NA', 'None' or 'nan' are tokens, not missing values."""
    import pandas as pd

    columns = pd.read_csv(path, nrows=0).columns
    if TOKEN_TEXT_COLUMN not in columns:
        return pd.read_csv(path)
    return pd.read_csv(path, keep_default_na=False, dtype={TOKEN_TEXT_COLUMN: str},
                       na_values={name: MISSING_VALUES for name in columns if name != TOKEN_TEXT_COLUMN})


class ResultFiles:
    """An experiment's tables and JSON summaries, served once they are known to belong to the recording
    (``thimble.provenance``): those of another recording are refused (with ``allow_stale``: warned about),
    those that cannot be told (written before thimble recorded provenance) warned about."""

    def __init__(self, directory: Path, stale: Callable[[], list], allow_stale: bool):
        self.directory, self._stale, self.allow_stale = directory, stale, allow_stale
        self._checked = False

    @property
    def stems(self) -> list[str]:
        """The stems of the CSV tables present now."""
        return sorted(path.stem for path in self.directory.glob("*.csv"))

    def table(self, stem: str) -> pandas.DataFrame:
        path = self.existing(f"{stem}.csv")
        self.check(stacklevel=4)
        return read_table(path)

    def json(self, stem: str) -> dict:
        path = self.existing(f"{stem}.json")
        self.check(stacklevel=4)
        return json.loads(path.read_text())

    def existing(self, filename: str) -> Path:
        """The file's path; a missing one named with its target, or with the names the workflow makes."""
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

    def check(self, stacklevel: int) -> None:
        """Refuse (or warn about) outputs that do not belong to the recording, once per run; ``stacklevel``
        points a warning at the user's line."""
        if self._checked:
            return

        def message(items) -> str:
            return (f"{describe(self.directory, items)}. Rebuild them with "
                    f"{make_target(self.directory, *rebuild_targets(items))}")

        stale = self._stale()
        certain = [item for item in stale if item.certain]
        if certain and not self.allow_stale:
            raise StaleResultError(message(certain) + "; or open_run(..., allow_stale=True) to read them anyway")
        if stale:
            warnings.warn(message(stale), StaleResultWarning, stacklevel=stacklevel)
        self._checked = True


class Run:
    """The results of one experiment (``results/{experiment}``); see ``open_run``."""

    W = _Recorded("The embedding matrix after step t, (T+1, V, D).")
    grad_W = _Recorded("The gradient step t applied (zeros at t = 0).")
    momentum_W = _Recorded("AdamW's exp_avg after step t.")
    variance_W = _Recorded("AdamW's exp_avg_sq after step t.")

    def __init__(self, directory: str | Path, source: str = "auto", cache_bytes: int | None = None,
                 allow_stale: bool = False):
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory} does not exist: an experiment's results are made by the "
                                    f"workflow, e.g. {make_target(self.directory, FREEZE_OUTPUTS['freeze'])}")
        self.experiment = self.directory.name
        self.requested_source = source
        self.allow_stale = allow_stale
        #: decoded chunks of every tensor of the run, within ``cache_bytes`` (thimble.notebook.chunk_cache)
        self.cache = ChunkCache(cache_bytes)
        self._files = RunFiles(self.directory, source)
        self._recorded: RecordedSeries | None = None
        self._params: dict[str, Parameter] = {}
        self._results = ResultFiles(self.directory, lambda: self.stale, allow_stale)
        #: ΔW′ by parameter name
        self._delta_w_lattice: dict[str, StepSeries] = {}
        self._token_text: list[str] | None = None
        #: held while the xarray views read (dask may ask from several threads; h5py handles and the cache are
        #: not for concurrent use)
        self.read_lock = threading.Lock()

    @property
    def source(self) -> str:
        """The file the tensors are read from (opening it if need be): recording.h5 or stream/stream.h5."""
        return self._files.recording.filename

    # -- recorded tensors -----------------------------------------------------
    @property
    def _tensors(self) -> RecordedSeries:
        """Every recorded per-step tensor, over the recording (opened here if need be)."""
        if self._recorded is None:
            self._recorded = RecordedSeries(self._files.recording, self.cache)
        return self._recorded

    @property
    def recorded_tensors(self) -> dict[str, str]:
        """The embedding's recorded per-step tensors by the seed's names and their stored dtypes (float32 state
        under fp32_master); empty when the embedding is not recorded."""
        return dict(self._tensors.stored_dtypes)

    def tensor(self, name: str) -> StepSeries:
        """Any of the embedding's recorded tensors by the seed's name, e.g. ``master_W`` (fp32_master) or
        ``kahan_compensation_W`` (kahan)."""
        return self._tensors[name]

    @property
    def params(self) -> list[str]:
        """The recorded parameters' names, in the model's order (``record.tensors``; a recording made before it
        holds the embedding alone, ``transformer.wte.weight``)."""
        return list(self._tensors.layout.params)

    def param(self, name: str) -> Parameter:
        """Recorded parameter ``name`` (one of ``run.params``): ``.value``, ``.grad``, ``.state(key)``,
        ``.delta_w_lattice``, each read lazily as ``run.W`` is."""
        if name not in self._params:
            series = self._tensors
            self._params[name] = Parameter(series.recorded(name), series, self._delta_w_series)
        return self._params[name]

    @property
    def update_rule(self) -> str:
        """training.update_rule of the run (docs/update_rules.md)."""
        return rule_of(self._files.recording.attrs)

    @property
    def losses(self) -> torch.Tensor:
        """Training loss per step, float32 (NaN at t = 0)."""
        import torch

        return torch.from_numpy(read_checked(self._files.recording["losses"]))

    @property
    def attrs(self) -> dict:
        """The recording's attributes: hyperparameters, config hash, provenance."""
        return dict(self._files.recording.attrs)

    @property
    def hyperparameters(self) -> pandas.DataFrame:
        """Each param group's settings as each step used them (the recording's ``hyperparameters`` table: a
        scheduler's lr at every step), one row per step and group, a column per setting (``lr``, ``betas.0``,
        ``weight_decay``, ...)."""
        import json

        import pandas

        handle = self._files.recording
        if "hyperparameters" not in handle:
            raise KeyError(f"{handle.filename} has no hyperparameters table (recorded before thimble kept one); its "
                           "settings are its attributes (run.attrs)")
        table = read_checked(handle["hyperparameters"])
        steps, groups, columns = table.shape
        index = pandas.MultiIndex.from_product([range(steps), range(groups)], names=["step", "group"])
        return pandas.DataFrame(table.reshape(steps * groups, columns), index=index,
                                columns=json.loads(handle.attrs["hyperparameter_columns"]))

    @property
    def storage_dtype(self) -> str:
        """bfloat16 (bit for bit), or float16 (the seed's lossy storage; tensors come back as float16)."""
        return str(self._files.recording.attrs.get("storage_dtype", "bfloat16"))

    # -- ΔW′ ------------------------------------------------------------------
    @property
    def delta_w_lattice(self) -> StepSeries:
        """ΔW′[t] of the embedding: signed bf16 lattice steps from W[t-1] to W[t] (int16 or int32; row 0 is 0)."""
        return self._delta_w_series(EMBEDDING)

    def _delta_w_series(self, param: str) -> StepSeries:
        """ΔW′ of parameter ``param`` from delta_w_lattice.h5: ``params/<name>/delta_w_lattice``, the embedding's
        also at the root (the one a file written before every tensor had its ΔW′ holds)."""
        if param not in self._delta_w_lattice:
            handle = self._files.delta_w
            # ΔW′ carries its recording's attributes: refused if it is another's; the warning points at the line
            # reading run.delta_w_lattice or run.param(name).delta_w_lattice
            self._results.check(stacklevel=4)
            path = param_dataset(param, DELTA_W_DATASET)
            if param == EMBEDDING and DELTA_W_DATASET in handle:
                path = DELTA_W_DATASET
            if path not in handle:
                raise NotRecordedError(self._missing_delta_w(handle, param, path))
            dataset = handle[path]
            axes = parameter_axes_of(param, dataset.ndim - 1)
            name = DELTA_W_DATASET if param == EMBEDDING else f"{param}/{DELTA_W_DATASET}"
            self._delta_w_lattice[param] = StepSeries(dataset, name, self.cache, axes,
                                                      "the run" if param == EMBEDDING else param)
        return self._delta_w_lattice[param]

    def _missing_delta_w(self, handle: h5py.File, param: str, path: str) -> str:
        target = make_target(self.directory, DELTA_W_FILE)
        held = [name for name in handle.get(PARAMS_GROUP, {}) if DELTA_W_DATASET in handle[PARAMS_GROUP][name]]
        if not held:
            return (f"{handle.filename} holds no {path}: it was written before the lattice stage computed ΔW′ of "
                    f"every recorded parameter (it holds the embedding's alone); rebuild it with {target}")
        return (f"{handle.filename} holds no ΔW′ of {param} ({path}); it holds those of the recorded parameters "
                f"{', '.join(held)}: record {param} (record.tensors in the experiment's config), train and "
                f"rebuild it with {target}")

    # -- tokens ---------------------------------------------------------------
    live_mask = _TokenSelection("(V,) bool: the token occurs in the model corpus.")
    dead_mask = _TokenSelection("(V,) bool: the token never occurs in the model corpus.")
    live_ids = _TokenSelection("The ids of the tokens that occur in the model corpus.")
    dead_ids = _TokenSelection("The ids of the tokens that never occur in the model corpus.")

    @property
    def token_text(self) -> list[str]:
        """Each token id's text as the dataset's tokenizer decodes it alone (byte-level BPE: 'Ġloue' is
        ' loue'; a token holding part of a UTF-8 character decodes to '\ufffd')."""
        if self._token_text is None:
            from thimble.data.tokenizer import token_texts

            if "dataset" not in self.attrs:  # a recording of your own loop (thimble.Recorder) names no tokenizer
                raise FileNotFoundError(f"{self.source} was recorded from a loop of your own and names no dataset, "
                                        "so there is no tokenizer to decode its tokens")
            dataset = str(self.attrs["dataset"])
            path = dataset_dir(self.directory.parent, dataset) / TOKENIZER_FILE
            if not path.exists():
                target = make_target(self.directory, TOKENIZER_FILE, under_results=f"{DATA_DIR}/{dataset}")
                raise FileNotFoundError(f"{path} does not exist: make it with {target}")
            self._token_text = token_texts(path, int(self.attrs["vocab_size"]))
        return self._token_text

    # -- tables and summaries ---------------------------------------------------
    @property
    def tables(self) -> list[str]:
        """The stems of the experiment's CSV tables present now (``run.table(stem)``)."""
        return self._results.stems

    def table(self, stem: str) -> pandas.DataFrame:
        """``results/{experiment}/{stem}.csv`` as a DataFrame, e.g. ``run.table("freeze")``."""
        return self._results.table(stem)

    def json(self, stem: str) -> dict:
        """``results/{experiment}/{stem}.json`` as a dict."""
        return self._results.json(stem)

    @property
    def summary(self) -> dict:
        """summary.json: per window and group freeze statistics, the trend and the cooling verdict."""
        return self._results.json(Path(FREEZE_OUTPUTS["summary"]).stem)

    @property
    def replay(self) -> dict:
        """replay.json: the bitwise AdamW replay's mismatches and the freeze criterion."""
        return self._results.json(Path(REPLAY_OUTPUTS["summary"]).stem)

    @property
    def stale(self) -> list:
        """The outputs here that were not computed from the recording beside them (``thimble.provenance``):
        one ``Stale`` per file, with why and the target that rebuilds it; empty when all belong."""
        return stale_results(self.directory, dict(self._files.recording.attrs), Path(self.source).name)

    # -- the labelled view ------------------------------------------------------
    def to_xarray(self, dtype: str = "float32") -> xarray.Dataset:
        """The embedding's recorded tensors as a lazy xarray Dataset labelled (step, token, dim), with token text
        and group (dead/live) coordinates; ``dtype="bfloat16"`` gives ml_dtypes bf16 (see
        thimble.notebook.xarray_view)."""
        from thimble.notebook.xarray_view import run_dataset

        return run_dataset(self, dtype)

    def to_datatree(self, dtype: str = "float32") -> xarray.DataTree:
        """Every recorded parameter as a node of a lazy xarray DataTree (variables value, grad and the optimizer
        state over step and the parameter's axes), the losses, masks and token coordinates at the root; ``dtype``
        as for ``to_xarray`` (see thimble.notebook.xarray_view)."""
        from thimble.notebook.xarray_view import run_datatree

        return run_datatree(self, dtype)

    # -- lifetime -------------------------------------------------------------
    def close(self) -> None:
        self._files.close()
        self._recorded = None
        self._params.clear()
        self._delta_w_lattice.clear()
        self.cache.clear()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        opened = self._files.opened_recording
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
