"""Reading a recorded tensor's rows: the one way every stage and the notebook read them (``docs/recording.md``,
"Reading a recorded tensor").

A recorded tensor is a dataset of shape (T+1, *shape), a row per step, of any stored dtype: a stream's
virtual dataset over its segments (one step per chunk), a rechunked recording's (many steps per chunk), ΔW′.
``RecordedTensor`` reads its rows as stored bits (unsigned integers of the element size):

- by steps: ``bits(a, b)`` (a stream's one-step chunks decoded in a pool's threads); ``read_steps`` and
  ``read_steps_torch`` give the values in the stored precision;
- a stored chunk whole: ``chunk(first)`` (the notebook's cache keeps them);
- by rows in order: ``blocks(n)`` (blocks of n rows, each chunk decoded once, never whole in memory),
  ``in_order(n)`` (windows asked for in order, which may overlap); ``aligned_blocks`` gives several
  tensors stored in the same chunks block by block.

Every stored chunk is decoded by ``thimble.record.codec`` with its zstd checksum verified: a damaged chunk is a
DataError naming the file, the dataset and the steps. ``RecordingSource`` decides where a run's rows come
from: its recording.h5 or its stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from thimble.errors import DataError
from thimble.numerics.bf16 import BFLOAT16, bfloat16_bits_from_float16_bits
from thimble.outputs import RECORDING_FILE, STREAM_DIR, STREAM_FILE
from thimble.record.codec import (
    BITS_DTYPES,
    ZSTD_FILTER,
    chunk_location,
    chunk_row_blocks,
    damaged,
    dataset_filters,
    decode_stored_chunk,
    has_shuffle_zstd,
    require_zstd_filter,
    time_chunks,
)
from thimble.record.format import (
    NATIVE_STORAGE,
    STORAGE_DTYPES,
    TENSOR_DTYPES,
    RecordLayout,
    check_recorded_dataset,
    is_bfloat16,
    open_h5,
)
from thimble.record.h5_datasets import element_size
from thimble.record.stream_reader import open_stream, read_stream_rows
from thimble.update_rules import ELEMENT_BYTES
from thimble.util.workers import WorkerPool

if TYPE_CHECKING:
    import torch


class RecordedTensor:
    """One recorded tensor's rows, read as stored bits with every chunk's checksum verified.

    ``float16_as_bfloat16``: a float16 tensor's values come back as the bits of bf16 (round to nearest even),
    as every analysis reads a float16 recording; other tensors are untouched.
    """

    def __init__(self, dataset: h5py.Dataset, float16_as_bfloat16: bool = False):
        self.dataset = dataset
        # read from h5py once: each property costs tens of µs, more than the notebook serving a kept chunk
        #: 'file:/dataset', how errors (and the notebook's cache) name the tensor
        self.where = f"{dataset.file.filename}:{dataset.name}"
        self.shape: tuple[int, ...] = tuple(dataset.shape)
        self.is_stream = dataset.is_virtual
        self.bits_dtype = np.dtype(f"u{element_size(dataset)}")
        #: the stored values' numpy dtype (ml_dtypes.bfloat16 for bf16 tensors)
        self.dtype = BFLOAT16 if is_bfloat16(dataset) else np.dtype(dataset.dtype)
        #: steps per stored chunk: 1 for a stream (its segments hold one step per chunk) and for an
        #: unchunked dataset (read a step at a time)
        self.chunk_rows = 1 if self.is_stream or dataset.chunks is None else dataset.chunks[0]
        #: no zstd frame to check: HDF5 decodes the chunks (verifying a Fletcher32 checksum itself)
        self._by_hdf5 = not self.is_stream and _hdf5_decodes(dataset)
        self._to_bfloat16 = float16_as_bfloat16 and self.dtype == np.float16

    @classmethod
    def of_recording(cls, handle: h5py.File, name: str) -> RecordedTensor:
        """Tensor ``name`` of a file thimble train or rechunk wrote (a stream or recording.h5), read as the
        analyses read it: a float16 recording's values as bf16; float32 optimizer state (fp32_master) as its
        uint32 bits. A DataError unless it is stored as thimble stores a recorded tensor."""
        layout = RecordLayout.of_file(handle)
        dataset = check_recorded_dataset(handle, name, layout)
        storage = handle.attrs.get("storage_dtype")
        stored = layout.dtype_of(name)
        if storage not in (*STORAGE_DTYPES, NATIVE_STORAGE) or stored not in TENSOR_DTYPES \
                or element_size(dataset) != ELEMENT_BYTES[stored]:
            raise DataError(f"{handle.filename}: {name} is stored as {stored or storage} ({dataset.dtype}); the "
                            "analysis needs a recording written by thimble train (bfloat16 or float16)")
        if not dataset.is_virtual and not has_shuffle_zstd(dataset):
            raise DataError(f"{handle.filename}: {name} is not shuffle+zstd compressed; rechunk it with "
                            "thimble rechunk")
        # the seed's float16 storage held bf16 values; a float16 parameter stored in its own dtype is float16
        return cls(dataset, float16_as_bfloat16=storage == "float16")

    # -- by steps ----------------------------------------------------------------------------------

    def bits(self, start: int = 0, stop: int | None = None, out: np.ndarray | None = None,
             pool: WorkerPool | None = None, digest=None) -> np.ndarray:
        """Rows [start, stop) as stored bits, into ``out`` when given (else a new array); returns them.

        A stream's one-step chunks are decoded in ``pool``'s threads (one thread without it), at most a few
        waiting at once; a chunked dataset's chunks one after the other, each decoded whole and the rows
        copied out. ``digest`` (hashlib) gets each row as decoded, in step order.
        """
        require_zstd_filter()
        stop = self.shape[0] if stop is None else stop
        if out is None:
            out = np.empty((stop - start, *self.shape[1:]), dtype=self.bits_dtype)
        if self.is_stream:
            self._stream_bits(start, stop, out, pool, digest)
        else:
            if self._by_hdf5:
                _read_by_hdf5(self.dataset, start, stop, out)
            else:
                self._chunked_bits(start, stop, out)
            if digest is not None:
                for row in out:
                    digest.update(row.data)
        if self._to_bfloat16:
            out[...] = bfloat16_bits_from_float16_bits(out)
        return out

    def _stream_bits(self, start: int, stop: int, out: np.ndarray, pool: WorkerPool | None, digest) -> None:
        directory, name = Path(self.dataset.file.filename).parent, self.dataset.name.lstrip("/")
        if pool is not None:
            read_stream_rows(directory, name, start, stop, out, pool, digest)
            return
        with WorkerPool(1) as one:
            read_stream_rows(directory, name, start, stop, out, one, digest)

    def _chunked_bits(self, start: int, stop: int, out: np.ndarray) -> None:
        rows = self.chunk_rows
        chunk = np.empty((rows, *self.shape[1:]), dtype=self.bits_dtype)
        for first in range(start - start % rows, stop, rows):
            decode_stored_chunk(self.dataset, first, chunk)
            low, high = max(start, first), min(stop, first + rows)
            out[low - start: high - start] = chunk[low - first: high - first]

    def chunk(self, first: int) -> np.ndarray:
        """The valid steps of the stored chunk starting at step ``first``, as bits.

        A zstd chunk is decoded straight into the array returned (``bits`` would decode it into a scratch
        chunk and copy the steps out: a third more time and twice the memory for a chunk of 1.9 GB); a
        stream's step, or a chunk HDF5 decodes, goes through ``bits``.
        """
        stop = min(first + self.chunk_rows, self.shape[0])
        if self.is_stream or self._by_hdf5:
            return self.bits(first, stop)
        require_zstd_filter()
        chunk = np.empty(self.dataset.chunks, dtype=self.bits_dtype)  # edge chunks: full size
        decode_stored_chunk(self.dataset, first, chunk)
        if self._to_bfloat16:
            chunk[...] = bfloat16_bits_from_float16_bits(chunk)
        return chunk[:stop - first]

    # -- by rows in order ----------------------------------------------------------------------------

    def blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Every row in order as (first step, block) of up to ``block_rows`` rows of bits, shaped
        (rows, *shape): each chunk decoded once, as it is read, never whole in memory (a shuffled chunk of
        bf16 holds half of it, its lower byte planes), its checksum verified after its last block."""
        require_zstd_filter()
        if self.is_stream or self._by_hdf5:  # chunks of a step, or chunks HDF5 decodes: by steps
            for first in range(0, self.shape[0], block_rows):
                yield first, self.bits(first, min(first + block_rows, self.shape[0]))
            return
        for start, _ in time_chunks(self.shape[0], self.chunk_rows):
            for first, block in chunk_row_blocks(self.dataset, start, block_rows):
                yield first, (bfloat16_bits_from_float16_bits(block) if self._to_bfloat16 else block)

    def in_order(self, block_rows: int, pool: WorkerPool | None = None) -> RowsInOrder:
        """Windows of rows asked for in order (``RowsInOrder``), read in blocks of ``block_rows``; a stream's
        in ``pool``'s threads."""
        return RowsInOrder(self, block_rows, pool)


def _hdf5_decodes(dataset: h5py.Dataset) -> bool:
    """No zstd frame to check (no zstd, or a shuffle the codec does not undo): HDF5 decodes the chunks."""
    filters = dataset_filters(dataset)
    return ZSTD_FILTER not in filters or (h5py.h5z.FILTER_SHUFFLE in filters
                                          and element_size(dataset) not in BITS_DTYPES)


def _read_by_hdf5(dataset: h5py.Dataset, start: int, stop: int, out: np.ndarray) -> None:
    """Rows [start, stop) decoded by HDF5 into ``out`` as stored bits: the stored type as the memory type moves
    them untouched (h5py's ``dataset[...]`` would widen bf16 to float32)."""
    if stop <= start:
        return
    space = dataset.id.get_space()
    space.select_hyperslab((start, *(0,) * (dataset.ndim - 1)), (stop - start, *dataset.shape[1:]))
    try:
        dataset.id.read(h5py.h5s.create_simple(out.shape), space, out, mtype=dataset.id.get_type())
    except OSError as error:
        raise damaged(chunk_location(dataset, start, stop - 1), f"HDF5 cannot decode it ({error})") from None


class RowsInOrder:
    """A recorded tensor's rows asked for in windows, in order: a window may start inside the one before
    (the replay's windows overlap by a step), never before it. Each chunk is decoded once, with its checksum
    verified; the tensor holds half a chunk (its lower byte planes) and the rows between the windows. A
    stream's windows are read by steps (its chunks hold one step: nothing to keep between them)."""

    def __init__(self, tensor: RecordedTensor, block_rows: int, pool: WorkerPool | None = None):
        self.tensor, self._pool = tensor, pool
        self._blocks = None if tensor.is_stream else tensor.blocks(block_rows)
        self._first, self._rows = 0, None

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) as bits: into ``out`` when given, else a view of the rows held."""
        if self._blocks is None:
            return self.tensor.bits(start, stop, out, self._pool)
        first, rows = self._first, self._rows
        if rows is not None and start < first:
            raise ValueError(f"{self.tensor.where}: rows {start}.. asked for after rows {first}.. (read in order)")
        while rows is None or first + len(rows) < stop:
            try:
                block_first, block = next(self._blocks)
            except StopIteration:
                raise DataError(f"{self.tensor.where} ends before row {stop - 1}") from None
            first, rows = (block_first, block) if rows is None else (first, np.concatenate([rows, block]))
            if start > first:  # rows before the window are not asked for again
                drop = min(start - first, len(rows))
                first, rows = first + drop, rows[drop:]
        self._first, self._rows = first, rows
        window = rows[start - first: stop - first]
        if out is None:
            return window
        out[...] = window
        return out

    def finish(self) -> None:
        """Read to the end, where zstd checks the last frame's checksum, which the last window may stop short
        of; rows missing are an error. (A stream's chunks are checked as they are read.)"""
        if self._blocks is None:
            return
        end = self._first + (0 if self._rows is None else len(self._rows))
        for block_first, block in self._blocks:
            end = block_first + len(block)
        if end != self.tensor.shape[0]:
            raise DataError(f"{self.tensor.where} holds rows up to {end - 1}, expected {self.tensor.shape[0] - 1}")


def aligned_blocks(tensors: dict[str, RecordedTensor], block_rows: int,
                   pool: WorkerPool) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(first step, {name: block}) of several tensors stored in the same chunks of steps, block by block as
    ``RecordedTensor.blocks`` gives them, each tensor decoded in its own thread of ``pool``."""
    iterators = [tensor.blocks(block_rows) for tensor in tensors.values()]
    while True:
        futures = [pool.submit(next, iterator, None) for iterator in iterators]
        blocks = [future.result() for future in futures]
        if all(block is None for block in blocks):
            return
        if any(block is None for block in blocks) or len({(first, len(rows)) for first, rows in blocks}) != 1:
            filename = next(iter(tensors.values())).dataset.file.filename
            raise DataError(f"{filename}: {', '.join(tensors)} are not stored in the same chunks of steps; "
                            "rechunk the stream again with thimble rechunk")
        yield blocks[0][0], {name: rows for name, (_, rows) in zip(tensors, blocks)}


def read_steps(dataset: h5py.Dataset, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of a recorded tensor in its stored precision, every zstd frame's checksum verified.

    bf16 datasets come back as ``ml_dtypes.bfloat16`` with the stored bits
    untouched (h5py's own ``dataset[...]`` gives the same values as float32);
    float16 datasets come back as float16, others (ΔW′) in their own dtype.
    The zstd chunks are decoded here, not by HDF5's filter, which does not check
    zstd's content checksum: a flipped byte is a DataError naming file, dataset and steps.
    """
    tensor = RecordedTensor(dataset)
    return tensor.bits(start, stop).view(tensor.dtype)


def read_steps_torch(dataset: h5py.Dataset, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """As ``read_steps``, as a torch tensor (bf16 or float16)."""
    import torch

    values = read_steps(dataset, start, stop)
    if values.dtype == BFLOAT16:
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


@dataclasses.dataclass(frozen=True)
class RecordingSource:
    """Where a run's recorded rows are read from: a rechunked recording.h5, or the stream directory it is
    rechunked from (its stream.h5 over the segments). The one place that chooses between the two, for the
    stages (``of_path``) and the notebook (``in_results``)."""

    path: Path
    is_stream: bool

    @classmethod
    def of_path(cls, path: str | Path) -> RecordingSource:
        """What a stage is given: recording.h5, or the stream folder it was rechunked from (a folder)."""
        path = Path(path)
        return cls(path, path.is_dir())

    @classmethod
    def in_results(cls, directory: str | Path, source: str = "auto") -> RecordingSource | None:
        """An experiment's (results/{experiment}): its recording.h5 when ``source`` is "recording" (whether or
        not it exists yet) or "auto" and it exists, else its stream when stream.h5 is there; None when neither.
        recording.h5 comes first: it outlives a temporary stream, and reads a time chunk at a time."""
        directory = Path(directory)
        recording = directory / RECORDING_FILE
        if source == "recording" or (source == "auto" and recording.exists()):
            return cls(recording, False)
        if (directory / STREAM_DIR / STREAM_FILE).exists():
            return cls(directory / STREAM_DIR, True)
        return None

    @property
    def file(self) -> Path:
        """The HDF5 file the attributes come from (a stream's stream.h5)."""
        return self.path / STREAM_FILE if self.is_stream else self.path

    def open(self) -> h5py.File:
        """The file, open for reading: a stream only when finished, every segment behind it checked."""
        return open_stream(self.path) if self.is_stream else open_h5(self.path)
