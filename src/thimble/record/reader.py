"""Reading recorded tensors: ``read_steps`` reads rows of any recorded dataset (a stream's virtual
dataset, a rechunked recording's, ΔW′) in its stored precision; ``recorded_blocks`` and ``RecordingRows``
read a rechunked recording (the file ``thimble rechunk`` writes) in order, each chunk decoded once.
Every zstd frame's checksum is verified (the layout: ``thimble.record.format``). ``RecordingSource``
decides where a run's rows come from: its recording.h5 or its stream.
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
    RowsInOrder,
    chunk_location,
    damaged,
    dataset_filters,
    decode_rows,
    has_shuffle_zstd,
    require_zstd_filter,
    row_blocks,
)
from thimble.record.format import STORAGE_DTYPES, TENSOR_DTYPES, is_bfloat16, open_h5, stream_tensors
from thimble.record.h5_datasets import element_size
from thimble.record.stream_reader import open_stream, read_stream_rows, virtual_rows
from thimble.update_rules import ELEMENT_BYTES
from thimble.util.workers import WorkerPool

if TYPE_CHECKING:
    import torch


def read_steps(dataset: h5py.Dataset, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of a recorded tensor in its stored precision, every zstd frame's checksum verified.

    bf16 datasets come back as ``ml_dtypes.bfloat16`` with the stored bits
    untouched (h5py's own ``dataset[...]`` gives the same values as float32);
    float16 datasets come back as float16, others (ΔW′) in their own dtype.
    The zstd chunks are decoded here, not by HDF5's filter, which does not check
    zstd's content checksum: a flipped byte is a DataError naming file, dataset and steps.
    """
    require_zstd_filter()
    stop = dataset.shape[0] if stop is None else stop
    itemsize = element_size(dataset)
    dtype = BFLOAT16 if is_bfloat16(dataset) else dataset.dtype
    if dataset.is_virtual:  # a stream: decode from its segment files
        out = np.empty((stop - start, *dataset.shape[1:]), dtype=BITS_DTYPES[itemsize])
        with WorkerPool(1) as pool:
            read_stream_rows(Path(dataset.file.filename).parent, dataset.name.lstrip("/"), start, stop, out, pool)
        return out.view(dtype)
    filters = dataset_filters(dataset)
    if ZSTD_FILTER not in filters or (h5py.h5z.FILTER_SHUFFLE in filters and itemsize not in BITS_DTYPES):
        try:  # no zstd frame to check (HDF5 verifies a Fletcher32 checksum itself)
            return dataset[start:stop]
        except OSError as error:
            raise damaged(_stored_in(dataset, start, stop - 1), f"HDF5 cannot decode it ({error})") from None
    return decode_rows(dataset, start, stop).view(dtype)


def _stored_in(dataset: h5py.Dataset, first: int, last: int) -> str:
    """Where steps first..last of a dataset are stored: the segment files of a virtual dataset."""
    where = chunk_location(dataset, first, last)
    if not dataset.is_virtual:
        return where
    files = sorted({source.file_name for source in dataset.virtual_sources()
                    if virtual_rows(source)[0] <= last and virtual_rows(source)[1] >= first})
    return f"{where} (stored in {', '.join(files)})"


def read_steps_torch(dataset: h5py.Dataset, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """As ``read_steps``, as a torch tensor (bf16 or float16)."""
    import torch

    values = read_steps(dataset, start, stop)
    if values.dtype == BFLOAT16:
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


def recorded_blocks(handle: h5py.File, name: str, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first step, rows) blocks of a rechunked recording's tensor as stored bits, shaped (rows, V, D),
    decoded chunk by chunk with every checksum verified, holding half a chunk.

    bf16 tensors come back as uint16 bit patterns, a float16 recording's (the seed's storage) read back as
    bf16 as every stage reads it; float32 optimizer state (fp32_master) as its uint32 bits.
    """
    dataset = handle[name]
    storage = handle.attrs.get("storage_dtype")
    stored = stream_tensors(handle).get(name)
    element_bytes = element_size(dataset)
    if storage not in STORAGE_DTYPES or stored not in TENSOR_DTYPES or element_bytes != ELEMENT_BYTES[stored]:
        raise DataError(f"{handle.filename}: {name} is stored as {stored or storage} ({dataset.dtype}); the analysis "
                        "needs a recording written by thimble train (bfloat16 or float16)")
    if not has_shuffle_zstd(dataset):
        raise DataError(f"{handle.filename}: {name} is not shuffle+zstd compressed; rechunk it with thimble rechunk")
    for first, block in row_blocks(dataset, block_rows):
        if stored == "float16":
            block = bfloat16_bits_from_float16_bits(block)
        yield first, block.reshape(-1, *dataset.shape[1:])


class RecordingRows:
    """Rows of a rechunked recording's tensors, each tensor's asked for in order (a window may start
    inside the one before: the replay's windows overlap by a step), as stored bits like
    ``recorded_blocks`` gives them (a float16 recording's read back as bf16). Each chunk is decoded once,
    with its checksum verified; a tensor holds half a chunk (its lower byte planes) and the rows between
    the windows."""

    def __init__(self, handle: h5py.File, block_rows: int):
        self.handle, self.block_rows = handle, block_rows
        self._rows: dict[str, RowsInOrder] = {}

    def read(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        """Rows [start, stop) of ``name`` into ``out``."""
        if name not in self._rows:
            self._rows[name] = RowsInOrder(recorded_blocks(self.handle, name, self.block_rows),
                                           self.handle[name].shape[0], f"{self.handle.filename}:/{name}")
        out[...] = self._rows[name].read(start, stop)

    def finish(self) -> None:
        """Read each tensor to its end: its last chunk's checksum is checked there."""
        for rows in self._rows.values():
            rows.finish()


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
