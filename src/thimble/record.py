"""Streaming HDF5 recorder: every step's W, grad_W, momentum_W, variance_W, bit for bit.

Layout of a recorded stream (a directory):

- ``segment_SSSSSS-EEEEEE.h5``: steps S..E of the four tensors, one step per
  chunk, and their losses. A segment is written under a ``.tmp`` name and
  renamed only when it is complete and synced, so a segment file on disk is
  always whole.
- ``stream.h5``: written last. Its ``W``, ``grad_W``, ``momentum_W`` and
  ``variance_W`` are HDF5 virtual datasets of shape (T+1, V, D) over the
  segments (relative paths: move the directory as a whole), with the seed's
  ``losses``, masks and attributes, and ``complete = True``.

Chunks are encoded in worker threads by ``thimble.codec`` (byte shuffle -> zstd
with the frame checksum, the same encoding in every file thimble writes) and
written with direct chunk writes; the readers here decode them there too, each
frame's checksum verified. The small uncompressed datasets (losses, masks,
counts) carry HDF5's Fletcher32. Every reader here turns a damaged, truncated or
missing file into a ``DataError`` naming the file, the dataset and the steps.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from thimble.bf16 import BFLOAT16, bfloat16_bits_from_float16_bits, bfloat16_h5type, torch_to_bits, \
    to_float16_counting
from thimble.codec import (BITS_DTYPES, CHUNK_CHECKSUM, ZSTD_FILTER, RowsInOrder, chunk_location, damaged,
                           dataset_filters, decode_chunk, decode_rows, encode_chunk, has_shuffle_zstd,
                           read_stored_chunk, require_zstd_filter, row_blocks, zstd_dcpl)
from thimble.errors import DataError
from thimble.h5_datasets import create_dataset, element_size
from thimble.update_rules import ELEMENT_BYTES, recorded_tensors
from thimble.workers import WorkerPool

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: the tensors of a bf16-rule recording (``thimble.update_rules.recorded_tensors`` gives each rule's)
TENSORS = tuple(recorded_tensors("bf16"))
STREAM_FILE = "stream.h5"
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


def is_bfloat16(dataset: h5py.Dataset) -> bool:
    return dataset.id.get_type() == bfloat16_h5type()


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
                    if _virtual_rows(source)[0] <= last and _virtual_rows(source)[1] >= first})
    return f"{where} (stored in {', '.join(files)})"


def _virtual_rows(source) -> tuple[int, int]:
    """First and last step a virtual dataset's source maps."""
    low, high = source.vspace.get_select_bounds()
    return low[0], high[0]


def read_steps_torch(dataset: h5py.Dataset, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """As ``read_steps``, as a torch tensor (bf16 or float16)."""
    import torch

    values = read_steps(dataset, start, stop)
    if values.dtype == BFLOAT16:
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


def segment_name(first: int, last: int) -> str:
    return f"segment_{first:06d}-{last:06d}.h5"


def list_segments(directory: Path) -> list[tuple[int, int, Path]]:
    """Complete segments in a directory as (first step, last step, path), in step order."""
    found = []
    for path in Path(directory).glob("segment_*-*.h5"):
        first, last = path.stem.removeprefix("segment_").split("-")
        found.append((int(first), int(last), path))
    return sorted(found)


def fsync_path(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


class _Segment:
    """One open segment file, steps first..last, written under a .tmp name."""

    def __init__(self, directory: Path, first: int, last: int, shape: tuple, tensors: dict[str, str], level: int):
        self.first, self.last = first, last
        self.final = directory / segment_name(first, last)
        self.tmp = self.final.with_suffix(".h5.tmp")
        self.file = h5py.File(self.tmp, "w")
        rows = last - first + 1
        self.datasets = {name: create_tensor_dataset(self.file, name, (rows, *shape), 1, storage, level)
                         for name, storage in tensors.items()}
        # written whole at close: one Fletcher32-guarded chunk
        self.losses = np.full(rows, np.nan, dtype=np.float32)
        self.file.attrs.update(first_step=first, last_step=last, storage_dtype=tensors["W"],
                               recorded_tensors=tensors_attr(tensors), chunk_checksum=CHUNK_CHECKSUM)
        self.written = 0

    def write(self, step: int, chunks: dict[str, bytes], loss: float) -> None:
        row = step - self.first
        for name, chunk in chunks.items():
            self.datasets[name].id.write_direct_chunk((row, 0, 0), chunk, 0)
        self.losses[row] = loss
        self.written += 1

    def close(self) -> None:
        if self.written != self.last - self.first + 1:
            raise RuntimeError(f"segment {self.first}-{self.last} got {self.written} steps")
        create_checked_array(self.file, "losses", self.losses)
        self.file.close()

    def commit(self) -> Path:
        """Make the closed segment durable, then give it its final name."""
        fsync_path(self.tmp)
        os.replace(self.tmp, self.final)
        return self.final


def tensors_attr(tensors: dict[str, str]) -> str:
    """The ``recorded_tensors`` attribute: which tensors a file holds and how each is stored."""
    return json.dumps(tensors)


class StreamRecorder:
    """Absorbs steps from the training loop and writes them in the background.

    ``tensors`` names the recorded tensors and their stored dtypes (default: the bf16 rule's four,
    stored as ``storage``). ``record`` hands over CPU copies of them; it blocks only when
    ``queue_steps`` steps are already waiting, which bounds memory whatever T
    is. ``checkpoint`` closes the current segment and then calls ``on_durable``
    (in the writer thread) once everything up to that step is on disk.
    """

    def __init__(self, directory: str | Path, shape: tuple[int, int], last_step: int, storage: str = "bfloat16",
                 segment_steps: int = 100, queue_steps: int = 64, level: int = 1, threads: int = 2,
                 tensors: dict[str, str] | None = None):
        if storage not in STORAGE_DTYPES:
            raise ValueError(f"unknown record.dtype {storage!r}; use one of {STORAGE_DTYPES}")
        self.tensors = dict(tensors) if tensors is not None else recorded_tensors("bf16", storage)
        for name, dtype in self.tensors.items():
            if dtype not in TENSOR_DTYPES:
                raise ValueError(f"unknown stored dtype {dtype!r} for {name}; use one of {TENSOR_DTYPES}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shape, self.last_step, self.storage = tuple(shape), last_step, storage
        self.segment_steps, self.level = segment_steps, level
        self.float16_altered = dict.fromkeys(self.tensors, 0)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_steps)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="thimble-compress")
        # fsync, rename and checkpoints run in order on their own thread, so that compression
        # goes on while the disk catches up
        self._durable = ThreadPoolExecutor(max_workers=1, thread_name_prefix="thimble-durable")
        self._durable_futures: list[Future] = []
        self._error: BaseException | None = None
        self._segment: _Segment | None = None
        self._thread = threading.Thread(target=self._run, name="thimble-writer", daemon=True)
        self._thread.start()

    # -- training side -------------------------------------------------------
    def segment_bounds(self, step: int) -> tuple[int, int]:
        first = step - step % self.segment_steps
        return first, min(first + self.segment_steps - 1, self.last_step)

    def is_segment_end(self, step: int) -> bool:
        return step == self.segment_bounds(step)[1]

    def record(self, step: int, tensors: dict[str, torch.Tensor], loss) -> None:
        """Queue a step: its host tensors and its loss, a float or the ``thimble.host_copy.HostStep`` whose
        copies (still running on a GPU) fill ``tensors``; the writer thread waits for them."""
        self._put(("step", step, tensors, loss))

    def checkpoint(self, step: int, on_durable) -> None:
        self._put(("checkpoint", step, on_durable))

    def close(self) -> None:
        """Wait for every queued step to be written; re-raise a writer error."""
        self._put(None)
        self._thread.join()
        self._pool.shutdown()
        self._durable.shutdown()
        for future in self._durable_futures:
            if future.exception() is not None and self._error is None:
                self._error = future.exception()
        if self._error is not None:
            raise RuntimeError("the HDF5 writer failed") from self._error

    def abort(self) -> None:
        """Stop without finishing the open segment (it stays a .tmp file)."""
        self._error = self._error or RuntimeError("aborted")
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=60)
        self._pool.shutdown(cancel_futures=True)
        self._durable.shutdown(cancel_futures=True)

    def _put(self, item) -> None:
        while True:
            if self._error is not None:
                raise RuntimeError("the HDF5 writer failed") from self._error
            try:
                self._queue.put(item, timeout=1.0)
                return
            except queue.Full:
                continue

    # -- writer thread ---------------------------------------------------------
    def _encode(self, tensor: torch.Tensor, storage: str) -> tuple[bytes, int]:
        """(compressed chunk, number of values the storage dtype altered)."""
        if storage == "bfloat16":
            return encode_chunk(torch_to_bits(tensor), self.level), 0
        if storage == "float32":
            if tensor.element_size() != 4:
                raise TypeError(f"float32 storage got a {tensor.dtype} tensor")
            return encode_chunk(tensor.contiguous().numpy(), self.level), 0
        values, altered = to_float16_counting(tensor)
        return encode_chunk(values, self.level), altered

    def _run(self) -> None:
        pending: collections.deque[tuple[int, dict[str, Future], float]] = collections.deque()
        try:
            while True:
                item = self._queue.get()
                if item is None or self._error is not None:
                    break
                if item[0] == "step":
                    _, step, tensors, loss = item
                    if hasattr(loss, "wait"):  # a thimble.host_copy.HostStep: its device copies end here
                        loss.wait()
                        loss = loss.loss
                    futures = {name: self._pool.submit(self._encode, tensors[name], storage)
                               for name, storage in self.tensors.items()}
                    pending.append((step, futures, loss))
                    self._drain(pending, keep=2)
                else:
                    _, step, on_durable = item
                    self._drain(pending, keep=0)
                    self._after_durable(on_durable, step)
            if self._error is None:
                self._drain(pending, keep=0)
        except BaseException as error:  # surfaced to the training thread by record()/close()
            self._error = error
            log.exception("HDF5 writer failed")

    def _drain(self, pending, keep: int) -> None:
        while len(pending) > keep:
            step, futures, loss = pending.popleft()
            chunks = {}
            for name, future in futures.items():
                chunks[name], altered = future.result()
                self.float16_altered[name] += altered
            if self._segment is None:
                first, last = self.segment_bounds(step)
                self._segment = _Segment(self.directory, first, last, self.shape, self.tensors, self.level)
            self._segment.write(step, chunks, loss)
            if step == self._segment.last:
                self._segment.close()
                self._after_durable(self._segment.commit)
                self._segment = None

    def _after_durable(self, function, *args) -> None:
        """Run ``function`` once everything handed over before it is durable."""
        for future in self._durable_futures:
            if future.done() and future.exception() is not None:
                raise future.exception()
        self._durable_futures = [f for f in self._durable_futures if not f.done()]
        self._durable_futures.append(self._durable.submit(function, *args))


def write_stream_file(directory: str | Path, shape: tuple[int, int], last_step: int, storage: str,
                      masks: dict[str, np.ndarray], attrs: dict, tensors: dict[str, str] | None = None) -> Path:
    """Write ``stream.h5``: virtual (T+1, V, D) datasets over the segments, losses, masks, attributes.

    Fails if the segments do not cover steps 0..last_step exactly.
    """
    directory = Path(directory)
    tensors = dict(tensors) if tensors is not None else recorded_tensors("bf16", storage)
    segments = covering_segments(directory, 0, last_step + 1)
    full = (last_step + 1, *shape)
    losses = np.empty(last_step + 1, dtype=np.float32)
    final = directory / STREAM_FILE
    tmp = final.with_suffix(".h5.tmp")
    with h5py.File(tmp, "w") as out:
        for name, dtype in tensors.items():
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            virtual_space = h5py.h5s.create_simple(full)
            for first, last, path in segments:
                rows = (last - first + 1, *shape)
                virtual_space.select_hyperslab((first, 0, 0), rows)
                dcpl.set_virtual(virtual_space, path.name.encode(), name.encode(), h5py.h5s.create_simple(rows))
            create_dataset(out, name, storage_h5type(dtype), virtual_space, dcpl)
        for first, last, path in segments:
            with open_h5(path) as segment:
                losses[first:last + 1] = read_checked(segment["losses"])
        create_checked_array(out, "losses", losses)
        for key, values in masks.items():
            create_checked_array(out, key, values)
        out.attrs.update(attrs)
        out.attrs["storage_dtype"] = storage
        out.attrs["recorded_tensors"] = tensors_attr(tensors)
        out.attrs["chunk_checksum"] = CHUNK_CHECKSUM
        out.attrs["complete"] = True
    fsync_path(tmp)
    os.replace(tmp, final)
    return final


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
        for name in stream_tensors(handle):
            check_virtual_sources(handle[name], Path(directory))
    except BaseException:
        handle.close()
        raise
    return handle


def check_virtual_sources(dataset: h5py.Dataset, directory: Path) -> None:
    """A DataError unless the segments behind a virtual dataset cover every step and are whole."""
    mapped = sorted((*_virtual_rows(source), source.file_name, source.dset_name)
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


def read_checked(dataset: h5py.Dataset) -> np.ndarray:
    """A small dataset, whole; a Fletcher32 mismatch is a DataError naming it."""
    try:
        return dataset[...]
    except OSError as error:
        raise damaged(f"{dataset.file.filename}:{dataset.name}", f"HDF5 cannot read it ({error})") from None


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
                    digest.update(out[step - start].data)

            for step in range(low, high):
                where = chunk_location(dataset, step, step)
                raw = read_stored_chunk(dataset, step - first, where)
                pending.append((step, pool.submit(decode_chunk, raw, out[step - start], where)))
                while len(pending) >= window:
                    finish(*pending.popleft())
            while pending:
                finish(*pending.popleft())


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


def verify_stream(directory: str | Path, threads: int = 1, block_rows: int = 16) -> None:
    """Decode every stored chunk of a finished stream, each against its checksum, and read its losses: a
    DataError naming the file, dataset and steps of the first damage, nothing written. What rechunk reads,
    checked before a rerun gives up the recording it would replace."""
    directory = Path(directory)
    with open_stream(directory) as stream, WorkerPool(threads) as pool:
        read_checked(stream["losses"])
        for name in stream_tensors(stream):
            dataset = stream[name]
            element_bytes = element_size(dataset)
            out = np.empty((block_rows, *dataset.shape[1:]), dtype=BITS_DTYPES[element_bytes])
            for start in range(0, dataset.shape[0], block_rows):
                stop = min(start + block_rows, dataset.shape[0])
                read_stream_rows(directory, name, start, stop, out[:stop - start], pool)
