"""A run's recorded tensors as a lazy, labelled xarray Dataset: ``run.to_xarray()``, and what the xarray
engine ``thimble`` (``thimble.notebook.xarray_backend``) opens.

Every recorded tensor (W, grad_W, momentum_W, variance_W; under other update
rules their own, e.g. master_W) is a lazy variable over (step, token, dim), read
through the run's ``StepSeries`` (so through the checksummed reader and the
run's chunk cache) only when values are asked for; ``losses`` is over step. The
coordinates are step, token and dim (their positions), ``token_text`` (the text
the dataset's tokenizer decodes each id to; left out, with a warning, when the
tokenizer is not beside the results) and ``group`` ("dead": never in the model
corpus, else "live").

Values are exact float32 by default (bf16 and float16 widen without rounding);
``dtype="bfloat16"`` gives bf16 tensors as ``ml_dtypes.bfloat16`` (their stored
bits), the others (float32 optimizer state, a float16 recording) as stored.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import xarray as xr
from xarray.backends import BackendArray
from xarray.core import indexing

from thimble.notebook.step_series import StepSeries
from thimble.provenance import plain

DTYPES = ("float32", "bfloat16")
DIMS = ("step", "token", "dim")


def series_dtype(series: StepSeries, dtype: str) -> str:
    """What ``StepSeries.numpy`` is asked for: bf16 tensors as asked, the others exactly (float32) or as stored."""
    return dtype if series.bfloat16 or dtype == "float32" else "stored"


class StepSeriesArray(BackendArray):
    """A recorded tensor as xarray's lazy array: outer indexing (ints, slices, int arrays per axis) maps onto
    ``StepSeries.numpy``, which decodes only the chunks holding the steps asked for."""

    def __init__(self, series: StepSeries, dtype: str, lock: threading.Lock):
        self.series, self.read_as, self.lock = series, series_dtype(series, dtype), lock
        self.shape = series.shape
        self.dtype = np.dtype(series.numpy((slice(0, 0),), self.read_as).dtype)

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER, self._read)

    def _read(self, key: tuple) -> np.ndarray:
        with self.lock:  # h5py handles are not for concurrent reads (dask may ask from several threads)
            return self.series.numpy(key, self.read_as)


def run_dataset(run, dtype: str = "float32") -> xr.Dataset:
    """``run`` (a ``thimble.notebook.run.Run``) as a lazy xarray Dataset; closing the Dataset closes the run."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    variables, coords = run_variables(run, dtype), run_coordinates(run)
    attrs = {key: plain(value) for key, value in run.attrs.items()}
    attrs["source"] = run.source
    dataset = xr.Dataset(variables, coords=coords, attrs=attrs)
    dataset.set_close(run.close)
    return dataset


def run_variables(run, dtype: str) -> dict[str, xr.Variable]:
    """Every recorded tensor, lazily over (step, token, dim), and the losses over step."""
    lock = threading.Lock()
    variables = {}
    for name, stored_dtype in run.recorded_tensors.items():
        lazy = indexing.LazilyIndexedArray(StepSeriesArray(run.tensor(name), dtype, lock))
        variables[name] = xr.Variable(DIMS, lazy, attrs={"stored_dtype": stored_dtype, "source": run.source})
    variables["losses"] = xr.Variable(("step",), run.losses.numpy(), attrs={"note": "NaN at step 0"})
    return variables


def run_coordinates(run) -> dict:
    """The positions along (step, token, dim), each token's group and, when the tokenizer is there, its text."""
    steps, vocab, hidden = run.W.shape
    coords = {"step": np.arange(steps), "token": np.arange(vocab), "dim": np.arange(hidden),
              "group": ("token", np.where(run.dead_mask.numpy(), "dead", "live"))}
    try:
        coords["token_text"] = ("token", np.array(run.token_text, dtype=object))
    except FileNotFoundError as error:
        warnings.warn(f"no token_text coordinate: {error}", stacklevel=3)  # run_dataset's caller
    return coords
