"""One recorded per-step tensor of shape (T+1, *shape), read lazily through a ``ChunkCache``.

``series[steps, tokens, dims]`` (the embedding; another parameter's axes are its rows and
columns) selects each axis on its own (outer indexing, as h5py and xarray do; not numpy's
pairing of index arrays): an int (dropping the axis), a slice, a list or array of ints, or a
boolean mask of the axis's length, numpy arrays and torch tensors alike. Only the chunks holding
the steps asked for are decoded, each once per read (and kept in the run's cache while the
budget allows); only the rows asked for are copied out of them.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import h5py
import numpy as np

from thimble.notebook.chunk_cache import ChunkCache
from thimble.numerics.bf16 import BFLOAT16
from thimble.record.reader import RecordedTensor

if TYPE_CHECKING:
    import torch

#: what ``StepSeries.numpy`` gives: exact float32 (bf16 and float16 widen exactly), ml_dtypes bfloat16
#: (a bf16 tensor's own bits), or the stored dtype
NUMPY_DTYPES = ("float32", "bfloat16", "stored")


def step_range(index, n_steps: int) -> tuple[int, int, int] | int:
    """An index over steps 0..n_steps-1 as one step (int) or (start, stop, stride) (slice)."""
    if isinstance(index, slice):
        return index.indices(n_steps)
    return _one_position(index, n_steps, "step")


def axis_selection(index, length: int, axis: str, keep_slice: bool = False,
                   owner: str = "the run") -> tuple[np.ndarray | slice, bool]:
    """One axis's index as (the positions it selects, whether the axis is dropped).

    The positions are an int64 array, or the slice itself when ``keep_slice`` (numpy slices a chunk without
    a copy). A bool mask must have the axis's length; ints may be negative; out of range is an IndexError
    naming the axis and its range (``owner``'s: "the run has steps 0..60", "ln_f.bias has rows 0..7").
    """
    if isinstance(index, slice):
        return (index if keep_slice else np.arange(*index.indices(length))), False
    if not isinstance(index, (list, tuple, np.ndarray)) and not hasattr(index, "__array__"):
        return np.array([_one_position(index, length, axis, owner)], dtype=np.int64), True
    values = np.asarray(index)
    if values.ndim == 0:
        return axis_selection(values.item(), length, axis, keep_slice, owner)
    if values.ndim != 1:
        raise IndexError(f"{axis}s are indexed by a 1-d list, array or mask, not one of shape {values.shape}")
    if values.dtype == bool:
        if len(values) != length:
            raise IndexError(f"a boolean mask over {axis}s needs {length} entries, not {len(values)}")
        return np.flatnonzero(values), False
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"{axis}s are indexed by ints or a boolean mask, not {values.dtype}")
    values = values.astype(np.int64)
    outside = values[(values < -length) | (values >= length)]
    if outside.size:
        raise IndexError(f"{axis} {outside[0]} is out of range: {owner} has {axis}s 0..{length - 1}")
    return values % length if length else values, False


def _one_position(index, length: int, axis: str, owner: str = "the run") -> int:
    try:
        position = operator.index(index)
    except TypeError:
        raise TypeError(f"{axis}s are indexed by an int or a slice, a list of ints or a boolean mask, "
                        f"not {type(index).__name__}") from None
    if not -length <= position < length:
        raise IndexError(f"{axis} {position} is out of range: {owner} has {axis}s 0..{length - 1}")
    return position % length


#: the names of the embedding's axes after the step, (V, D)
EMBEDDING_AXES = ("token", "dim")


def parameter_axes(ndim: int) -> tuple[str, ...]:
    """The names of the axes after the step of a parameter other than the embedding, of ``ndim`` axes: its rows
    and columns, as the analyses view every tensor (``thimble.analysis.tensors``), then ``axis2``, ... ."""
    return ("row", "column", *(f"axis{axis}" for axis in range(2, ndim)))[:ndim]


def split_key(key, axes: tuple[str, ...] = EMBEDDING_AXES, name: str = "a per-step tensor") -> tuple:
    """``series[key]``'s key as (steps, *one index per axis of ``axes``), each defaulting to every position."""
    n_axes = 1 + len(axes)
    parts = key if isinstance(key, tuple) else (key,)
    if any(part is Ellipsis for part in parts):
        at = parts.index(Ellipsis)
        parts = parts[:at] + (slice(None),) * (n_axes - len(parts) + 1) + parts[at + 1:]
    if len(parts) > n_axes:
        raise IndexError(f"{name} has {n_axes} axes ({', '.join(('step', *axes))}); got {len(parts)} indices")
    return parts + (slice(None),) * (n_axes - len(parts))


class StepSeries:
    """One recorded per-step tensor, read lazily: ``series[t]``, ``series[a:b]``, ``series[steps, tokens]``.

    ``axes`` names the axes after the step (the embedding's token and dim, another parameter's row and column) and
    ``owner`` what an index out of range is out of: the run, for the embedding, else the parameter."""

    def __init__(self, dataset: h5py.Dataset, name: str, cache: ChunkCache, axes: tuple[str, ...] = EMBEDDING_AXES,
                 owner: str = "the run"):
        self.name, self._cache, self.owner = name, cache, owner
        self._tensor = RecordedTensor(dataset)
        if len(axes) != len(self._tensor.shape) - 1 or not axes:
            raise ValueError(f"{self._tensor.where} has shape {self._tensor.shape}: a per-step tensor of "
                             f"{len(axes)} axes after the step ({', '.join(axes)}) was expected")
        self.axes = tuple(axes)
        #: the stored values' numpy dtype (ml_dtypes.bfloat16 for bf16 tensors)
        self.stored_dtype = self._tensor.dtype
        self.bfloat16 = self.stored_dtype == BFLOAT16

    @property
    def shape(self) -> tuple[int, ...]:
        return self._tensor.shape

    @property
    def source(self) -> str:
        """The file the values are read from (recording.h5, stream.h5 or delta_w_lattice.h5)."""
        return self._tensor.dataset.file.filename

    def __len__(self) -> int:
        return self._tensor.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype ``series[key]`` comes back in (the stored one)."""
        import torch

        if self.bfloat16:
            return torch.bfloat16
        return torch.from_numpy(np.empty(0, self.stored_dtype)).dtype

    def bits(self, key=slice(None)) -> np.ndarray:
        """The stored bit patterns (uint16 or uint32) of ``series[key]``."""
        steps_index, rows_index, *later_indices = split_key(key, self.axes, self.name)
        steps, drop_step = axis_selection(steps_index, self.shape[0], "step")
        rows, drop_row = axis_selection(rows_index, self.shape[1], self.axes[0], keep_slice=True, owner=self.owner)
        out = self._cache.rows(self._tensor, steps, rows)  # the axis after the step is selected in the chunks
        dropped = [drop_step, drop_row]
        for axis, index in enumerate(later_indices, start=2):
            positions, drop = axis_selection(index, self.shape[axis], self.axes[axis - 1], keep_slice=True,
                                             owner=self.owner)
            out = out[(slice(None),) * axis + (positions,)]  # one axis at a time: outer indexing
            dropped.append(drop)
        for axis in reversed(range(len(dropped))):  # the last first, so that the positions of the others hold
            if dropped[axis]:
                out = out[(slice(None),) * axis + (0,)]
        return out

    def __getitem__(self, key) -> torch.Tensor:
        """As a torch tensor in the stored dtype (bf16 bit for bit)."""
        import torch

        bits = np.asarray(self.bits(key))  # np.ascontiguousarray would make one element 1-d
        if not bits.flags.c_contiguous:
            bits = bits.copy()
        if self.bfloat16:
            return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(bits.view(self.stored_dtype))

    def numpy(self, key=slice(None), dtype: str = "float32") -> np.ndarray:
        """``series[key]`` as numpy: ``"float32"`` (exact: bf16 and float16 widen without rounding; integer
        tensors such as ΔW′ stay integers), ``"bfloat16"`` (ml_dtypes, the stored bits; bf16 tensors only)
        or ``"stored"``."""
        if dtype not in NUMPY_DTYPES:
            raise ValueError(f"dtype must be one of {NUMPY_DTYPES}, not {dtype!r}")
        return values_from_bits(np.asarray(self.bits(key)), self.stored_dtype, dtype, self.name)

    def __repr__(self) -> str:
        return f"<StepSeries {self.name}: {len(self)} steps of {self.shape[1:]}>"


def values_from_bits(bits: np.ndarray, stored: np.dtype, dtype: str, name: str) -> np.ndarray:
    """Stored bits as the values ``StepSeries.numpy`` gives (see there)."""
    if dtype == "stored":
        return bits.view(stored)
    if dtype == "bfloat16":
        if stored != BFLOAT16:
            raise ValueError(f"{name} is stored as {stored}, which bfloat16 cannot hold exactly; "
                             "read it as float32 or stored")
        return bits.view(BFLOAT16)
    if stored == BFLOAT16:  # bf16 is float32's upper half: shifting the bits widens it exactly
        return (bits.astype(np.uint32) << 16).view(np.float32)
    if np.issubdtype(stored, np.floating):
        return bits.view(stored).astype(np.float32)
    return bits.view(stored)
