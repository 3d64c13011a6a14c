"""A run's recorded tensors as lazy, labelled xarray objects, and what the xarray engine ``thimble``
(``thimble.notebook.xarray_backend``) opens:

- ``run.to_xarray()`` (``xr.open_dataset``): the embedding as a Dataset. Every recorded tensor of it (W, grad_W,
  momentum_W, variance_W; under other update rules their own, e.g. master_W) is a variable over
  (step, token, dim); ``losses`` is over step.
- ``run.to_datatree()`` (``xr.open_datatree``): every recorded parameter as a DataTree node named as the
  parameter, holding ``value``, ``grad`` and the optimizer's state under its own keys (``exp_avg``,
  ``exp_avg_sq``; ``kahan_comp``, ``master``). The embedding's node is over (step, token, dim), as the Dataset
  is; another parameter's over step and its own axes, ``<parameter>:row`` and ``<parameter>:column``, so that
  parameters of different shapes never share a dimension. The root holds ``losses``, the token masks and the
  coordinates step, token, ``group`` and ``token_text``; the embedding's node inherits step and token (a node
  inherits indexes only) and carries ``group`` and ``token_text`` itself.

Every tensor is a lazy variable read through the run's ``StepSeries`` (so through the checksummed reader and
the run's chunk cache) only when values are asked for. The coordinates are the positions along each dimension,
``token_text`` (the text the dataset's tokenizer decodes each id to; left out, with a warning, when the
tokenizer is not beside the results) and ``group`` ("dead": never in the model corpus, else "live").

Values are exact float32 by default (bf16 and float16 widen without rounding);
``dtype="bfloat16"`` gives bf16 tensors as ``ml_dtypes.bfloat16`` (their stored
bits), the others (float32 optimizer state, a float16 recording) as stored.
"""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr
from xarray.backends import BackendArray
from xarray.core import indexing

from thimble.notebook.parameters import NotRecordedError
from thimble.notebook.step_series import EMBEDDING_AXES, StepSeries
from thimble.provenance import plain
from thimble.sizes import EMBEDDING

DTYPES = ("float32", "bfloat16")
DIMS = ("step", *EMBEDDING_AXES)
#: the token masks the root of the DataTree holds, those the recording has
MASKS = ("dead_mask", "live_mask")


def series_dtype(series: StepSeries, dtype: str) -> str:
    """What ``StepSeries.numpy`` is asked for: bf16 tensors as asked, the others exactly (float32) or as stored."""
    return dtype if series.bfloat16 or dtype == "float32" else "stored"


class StepSeriesArray(BackendArray):
    """A recorded tensor as xarray's lazy array: outer indexing (ints, slices, int arrays per axis) maps onto
    ``StepSeries.numpy``, which decodes only the chunks holding the steps asked for."""

    def __init__(self, series: StepSeries, dtype: str, lock):
        self.series, self.read_as, self.lock = series, series_dtype(series, dtype), lock
        self.shape = series.shape
        self.dtype = np.dtype(series.numpy((slice(0, 0),), self.read_as).dtype)

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER, self._read)

    def _read(self, key: tuple) -> np.ndarray:
        with self.lock:  # h5py handles are not for concurrent reads (dask may ask from several threads)
            return self.series.numpy(key, self.read_as)


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")


def run_attrs(run) -> dict:
    """The recording's attributes as xarray keeps them, and the file the tensors are read from."""
    attrs = {key: plain(value) for key, value in run.attrs.items()}
    attrs["source"] = run.source
    return attrs


def lazy_variable(series: StepSeries, dims: tuple[str, ...], dtype: str, lock, attrs: dict) -> xr.Variable:
    return xr.Variable(dims, indexing.LazilyIndexedArray(StepSeriesArray(series, dtype, lock)), attrs=attrs)


def run_dataset(run, dtype: str = "float32") -> xr.Dataset:
    """``run``'s embedding (``run`` a ``thimble.notebook.run.Run``) as a lazy xarray Dataset; closing the Dataset
    closes the run."""
    check_dtype(dtype)
    if EMBEDDING not in run.params:
        raise NotRecordedError(f"{run.source} does not record the embedding {EMBEDDING}, which the Dataset holds "
                               f"(recorded: {', '.join(run.params)}): open every recorded parameter as a DataTree, "
                               "run.to_datatree() or xarray.open_datatree(path, engine=\"thimble\")")
    variables, coords = run_variables(run, dtype), run_coordinates(run)
    coords["dim"] = np.arange(run.W.shape[2])
    dataset = xr.Dataset(variables, coords=coords, attrs=run_attrs(run))
    dataset.set_close(run.close)
    return dataset


def run_variables(run, dtype: str) -> dict[str, xr.Variable]:
    """Every recorded tensor of the embedding, lazily over (step, token, dim), and the losses over step."""
    variables = {}
    for name, stored_dtype in run.recorded_tensors.items():
        attrs = {"stored_dtype": stored_dtype, "source": run.source}
        variables[name] = lazy_variable(run.tensor(name), DIMS, dtype, run.read_lock, attrs)
    variables["losses"] = losses_variable(run)
    return variables


def losses_variable(run) -> xr.Variable:
    return xr.Variable(("step",), run.losses.numpy(), attrs={"note": "NaN at step 0"})


def run_coordinates(run) -> dict:
    """The positions along step and token, each token's group and, when the tokenizer is there, its text (a
    recording without token masks, a loop of your own recorded without ``token_groups``: the steps alone)."""
    try:
        dead = run.dead_mask.numpy()
    except KeyError:  # h5py names the dataset it lacks
        return {"step": np.arange(len(run.losses))}
    coords = {"step": np.arange(len(run.losses)), "token": np.arange(len(dead)),
              "group": ("token", np.where(dead, "dead", "live"))}
    try:
        coords["token_text"] = ("token", np.array(run.token_text, dtype=object))
    except FileNotFoundError as error:
        warnings.warn(f"no token_text coordinate: {error}", stacklevel=3)  # the caller of run_dataset or run_datatree
    return coords


def parameter_dims(name: str, axes: tuple[str, ...]) -> tuple[str, ...]:
    """A parameter's dimensions in the DataTree: the embedding's (step, token, dim), shared with the root's token
    coordinates; another parameter's axes named after it (``<parameter>:row``), so that no two parameters of
    different shapes share a dimension."""
    if name == EMBEDDING:
        return DIMS
    return ("step", *(f"{name}:{axis}" for axis in axes))


def parameter_dataset(run, name: str, dtype: str, drop: tuple[str, ...] = (),
                      token_coords: dict | None = None) -> xr.Dataset:
    """Recorded parameter ``name`` as a Dataset: ``value``, ``grad`` and each optimizer state key (but those of
    ``drop``), lazily; the embedding's with ``token_coords`` (group, token_text), which a DataTree node does not
    inherit (only indexes are)."""
    param = run.param(name)
    dims = parameter_dims(name, param.axes)
    variables = {}
    for key in param.keys:
        if key not in drop:
            attrs = {"stored_dtype": param.stored_dtypes[key], "source": run.source}
            variables[key] = lazy_variable(param.series(key), dims, dtype, run.read_lock, attrs)
    # positions along the parameter's own axes: the root has step and token
    coords = {dim: np.arange(size) for dim, size in zip(dims[1:], param.shape) if dim != "token"}
    if name == EMBEDDING:
        coords.update(token_coords or {})
    return xr.Dataset(variables, coords=coords, attrs={"parameter": name, "shape": list(param.shape)})


def run_groups(run, dtype: str = "float32", drop: tuple[str, ...] = ()) -> dict[str, xr.Dataset]:
    """The DataTree's nodes by path: the root ("/", the losses, token masks and token coordinates) and each
    recorded parameter ("/<parameter>"), without the variables of ``drop``."""
    check_dtype(dtype)
    root_variables = {"losses": losses_variable(run)}
    for mask in MASKS:
        try:
            root_variables[mask] = xr.Variable(("token",), getattr(run, mask).numpy())
        except KeyError:  # a recording without it (h5py names the dataset it lacks)
            continue
    coords = run_coordinates(run)
    root = xr.Dataset(root_variables, coords=coords, attrs=run_attrs(run))
    groups = {"/": root.drop_vars(drop, errors="ignore")}
    token_coords = {name: coords[name] for name in ("group", "token_text") if name in coords}
    groups.update({f"/{name}": parameter_dataset(run, name, dtype, drop, token_coords) for name in run.params})
    return groups


def run_datatree(run, dtype: str = "float32", drop: tuple[str, ...] = ()) -> xr.DataTree:
    """Every recorded parameter of ``run`` as a node of a lazy DataTree (``run_groups``); closing the tree closes
    the run."""
    tree = xr.DataTree.from_dict(run_groups(run, dtype, drop))
    tree.set_close(run.close)
    return tree
