"""The recording's format: how thimble lays out a recorded stream and names, stores and opens its tensors.

A recorded stream is a directory:

- ``segment_SSSSSS-EEEEEE.h5``: steps S..E of the recorded tensors (W, grad_W, momentum_W, variance_W
  under the bf16 rule), one step per chunk, and their losses. A segment is written under a ``.tmp``
  name and renamed only when it is complete and synced, so a segment file on disk is always whole.
- ``stream.h5``: written last. Its tensors are HDF5 virtual datasets of shape (T+1, V, D) over the
  segments (relative paths: move the directory as a whole), with the seed's ``losses``, masks and
  attributes, and ``complete = True``.

``thimble rechunk`` rewrites it as one file, ``recording.h5``, in large time chunks. Chunks are encoded by
``thimble.record.codec`` (byte shuffle -> zstd with the frame checksum, the same encoding in every file thimble
writes); the small uncompressed datasets (losses, masks, counts) carry HDF5's Fletcher32. The writer is
``thimble.record.writer``; a recorded tensor's rows are read through ``thimble.record.reader``
(``RecordedTensor``; a stream's segments are opened and decoded by ``thimble.record.stream_reader``), which
turns a damaged, truncated or missing file into a ``DataError`` naming the file, the dataset and the steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from thimble.errors import DataError
from thimble.numerics.bf16 import bfloat16_h5type
from thimble.record.codec import damaged, zstd_dcpl
from thimble.record.h5_datasets import create_dataset
from thimble.update_rules import recorded_tensors

#: the tensors of a bf16-rule recording (``thimble.update_rules.recorded_tensors`` gives each rule's)
TENSORS = tuple(recorded_tensors("bf16"))
STORAGE_DTYPES = ("bfloat16", "float16")
#: the stored dtype of a tensor: record.dtype for bf16 tensors, float32 for float32 optimizer state
TENSOR_DTYPES = ("bfloat16", "float16", "float32")


def storage_h5type(storage: str) -> h5py.h5t.TypeID:
    if storage == "bfloat16":
        return bfloat16_h5type()
    if storage == "float16":
        return h5py.h5t.IEEE_F16LE.copy()
    if storage == "float32":
        return h5py.h5t.IEEE_F32LE.copy()
    raise ValueError(f"unknown stored dtype {storage!r}; use one of {TENSOR_DTYPES}")


def stream_tensors(handle: h5py.File) -> dict[str, str]:
    """The recorded tensors of a stream or rechunked file, each with its stored dtype."""
    if "recorded_tensors" in handle.attrs:
        return json.loads(handle.attrs["recorded_tensors"])
    return recorded_tensors("bf16", str(handle.attrs.get("storage_dtype", "bfloat16")))


def tensors_attr(tensors: dict[str, str]) -> str:
    """The ``recorded_tensors`` attribute: which tensors a file holds and how each is stored."""
    return json.dumps(tensors)


def create_tensor_dataset(group: h5py.Group, name: str, shape: tuple, chunk_rows: int, storage: str,
                          level: int) -> h5py.Dataset:
    """A chunked (chunk_rows, V, D), shuffle+zstd compressed dataset of the storage dtype."""
    return create_dataset(group, name, storage_h5type(storage), shape, zstd_dcpl((chunk_rows, *shape[1:]), level))


def create_checked_array(group: h5py.Group, name: str, data: np.ndarray) -> h5py.Dataset:
    """A small array (losses, masks, counts) with HDF5's Fletcher32 checksum, which HDF5 verifies on
    every read (an empty array has no chunk to guard)."""
    data = np.asarray(data)
    if data.size == 0:
        return group.create_dataset(name, data=data)
    return group.create_dataset(name, data=data, chunks=data.shape, fletcher32=True)


def open_h5(path: str | Path, mode: str = "r") -> h5py.File:
    """Open an HDF5 file; a missing, truncated or unreadable one is a DataError naming it."""
    path = Path(path)
    if mode == "r" and not path.exists():
        raise DataError(f"{path} does not exist; rerun the stage that writes it")
    try:
        return h5py.File(path, mode)
    except OSError as error:
        raise damaged(str(path), f"HDF5 cannot open it ({error})") from None


def read_checked(dataset: h5py.Dataset) -> np.ndarray:
    """A small dataset, whole; a Fletcher32 mismatch is a DataError naming it."""
    try:
        return dataset[...]
    except OSError as error:
        raise damaged(f"{dataset.file.filename}:{dataset.name}", f"HDF5 cannot read it ({error})") from None


def is_bfloat16(dataset: h5py.Dataset) -> bool:
    return dataset.id.get_type() == bfloat16_h5type()


def segment_name(first: int, last: int) -> str:
    return f"segment_{first:06d}-{last:06d}.h5"


def list_segments(directory: Path) -> list[tuple[int, int, Path]]:
    """Complete segments in a directory as (first step, last step, path), in step order."""
    found = []
    for path in Path(directory).glob("segment_*-*.h5"):
        first, last = path.stem.removeprefix("segment_").split("-")
        found.append((int(first), int(last), path))
    return sorted(found)


def covering_segments(directory: str | Path, start: int, stop: int) -> list[tuple[int, int, Path]]:
    """The segments holding steps [start, stop), in order; a DataError naming the steps no segment holds."""
    directory = Path(directory)
    found = [(first, last, path) for first, last, path in list_segments(directory) if last >= start and first < stop]
    expected = start
    for first, last, path in found:
        if first > expected:
            raise DataError(f"{directory}: no segment file holds steps {expected}..{first - 1} (a segment is missing); "
                            f"restore it, or delete {directory} and train again")
        if first < expected and expected > start:
            raise DataError(f"{directory}: segments overlap at step {first} ({path.name}); delete {directory} "
                            "and train again")
        expected = last + 1
    if expected < stop:
        raise DataError(f"{directory}: no segment file holds steps {expected}..{stop - 1} (a segment is missing); "
                        f"restore it, or delete {directory} and train again")
    return found
