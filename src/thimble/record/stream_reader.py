"""The stream's reader: a finished stream opened with every segment behind it checked, its rows decoded
from the segments' one-step chunks with every checksum verified (the layout: ``thimble.record.format``).
"""

from __future__ import annotations

import collections
from concurrent.futures import Future
from pathlib import Path

import h5py
import numpy as np

from thimble.errors import DataError
from thimble.outputs import STREAM_FILE
from thimble.record.codec import (
    BITS_DTYPES,
    chunk_location,
    damaged,
    decode_chunk,
    has_shuffle_zstd,
    read_stored_chunk,
    require_zstd_filter,
)
from thimble.record.format import RecordLayout, covering_segments, open_h5, read_checked
from thimble.record.h5_datasets import element_size
from thimble.util.workers import WorkerPool


def open_stream(directory: str | Path) -> h5py.File:
    """Open a finished stream's ``stream.h5`` for reading; refuse an incomplete one."""
    require_zstd_filter()
    path = Path(directory) / STREAM_FILE
    if not path.exists():
        raise DataError(f"{path} does not exist: the recording is missing or was not finished; train again")
    handle = open_h5(path)
    try:
        if not handle.attrs.get("complete", False):
            raise DataError(f"{path} is not marked complete; delete {directory} and train again")
        # HDF5 reads a missing source of a virtual dataset as zeros: check every source first
        for name in RecordLayout.of_file(handle).datasets():
            check_virtual_sources(handle[name], Path(directory))
    except BaseException:
        handle.close()
        raise
    return handle


def check_virtual_sources(dataset: h5py.Dataset, directory: Path) -> None:
    """A DataError unless the segments behind a virtual dataset cover every step and are whole."""
    mapped = sorted((*virtual_rows(source), source.file_name, source.dset_name)
                    for source in dataset.virtual_sources())
    expected = 0
    for first, last, file_name, dset_name in mapped:
        where = f"{directory / file_name}:{dset_name} steps {first}..{last}"
        if first != expected:
            raise DataError(f"{dataset.file.filename}:{dataset.name}: no segment holds steps {expected}..{first - 1}; "
                            f"delete {directory} and train again")
        if not (directory / file_name).is_file():
            raise DataError(f"{where}: the segment file is missing (HDF5 would read zeros); restore it, or "
                            f"delete {directory} and train again")
        with open_h5(directory / file_name) as segment:
            if dset_name not in segment or segment[dset_name].shape[0] != last - first + 1:
                raise damaged(where, f"the segment does not hold {last - first + 1} steps of {dset_name}")
        expected = last + 1
    if expected != dataset.shape[0]:
        raise DataError(f"{dataset.file.filename}:{dataset.name}: no segment holds steps {expected}.."
                        f"{dataset.shape[0] - 1}; delete {directory} and train again")


def virtual_rows(source) -> tuple[int, int]:
    """First and last step a virtual dataset's source maps."""
    low, high = source.vspace.get_select_bounds()
    return low[0], high[0]


def read_stream_rows(stream_dir: str | Path, name: str, start: int, stop: int, out: np.ndarray,
                     pool: WorkerPool, digest=None) -> None:
    """Rows [start, stop) of a recorded tensor, as stored bits, into ``out`` (uint16 or uint32).

    Reads the segments' compressed chunks and decodes them in ``pool``'s threads
    (HDF5 decodes one chunk at a time on one core), each verified against its
    checksum; at most a few chunks wait at once, so memory stays at ``out`` plus
    a handful of chunks. Every row comes from a segment, or it is a DataError
    (never a row left as it was). ``digest`` (hashlib) gets each row as decoded
    from the source, in step order.
    """
    window = 2 * pool.threads
    for first, last, path in covering_segments(stream_dir, start, stop):
        low, high = max(start, first), min(stop, last + 1)
        with open_h5(path) as segment:
            if name not in segment or segment[name].shape[0] != last - first + 1:
                raise damaged(f"{path}:/{name} steps {first}..{last}", f"it does not hold {last - first + 1} steps")
            dataset = segment[name]
            if not has_shuffle_zstd(dataset):
                raise DataError(f"{path}:{name} is not shuffle+zstd compressed; not a thimble stream segment")
            pending: collections.deque[tuple[int, Future]] = collections.deque()

            def finish(step: int, future: Future) -> None:
                future.result()
                if digest is not None:
                    digest.update(out[step - start, ...].data)

            for step in range(low, high):
                where = chunk_location(dataset, step, step)
                raw = read_stored_chunk(dataset, step - first, where)
                # `[step, ...]`: a view also for a 0-d parameter's rows (`out[step]` would be a copied scalar)
                pending.append((step, pool.submit(decode_chunk, raw, out[step - start, ...], where)))
                while len(pending) >= window:
                    finish(*pending.popleft())
            while pending:
                finish(*pending.popleft())


def verify_stream(directory: str | Path, threads: int = 1, block_rows: int = 16) -> None:
    """Decode every stored chunk of a finished stream, each against its checksum, and read its losses: a
    DataError naming the file, dataset and steps of the first damage, nothing written. What rechunk reads,
    checked before a rerun gives up the recording it would replace."""
    directory = Path(directory)
    with open_stream(directory) as stream, WorkerPool(threads) as pool:
        read_checked(stream["losses"])
        for name in RecordLayout.of_file(stream).datasets():
            dataset = stream[name]
            element_bytes = element_size(dataset)
            out = np.empty((block_rows, *dataset.shape[1:]), dtype=BITS_DTYPES[element_bytes])
            for start in range(0, dataset.shape[0], block_rows):
                stop = min(start + block_rows, dataset.shape[0])
                read_stream_rows(directory, name, start, stop, out[:stop - start], pool)
