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

Chunks are compressed losslessly in worker threads (byte shuffle, the same
transform as HDF5's shuffle filter, then zstd, which releases the GIL) and
written with direct chunk writes. The datasets declare the filter pipeline
shuffle -> zstd (filter 32015), so any HDF5 reader with hdf5plugin loaded
(``import hdf5plugin``, or ``HDF5_PLUGIN_PATH`` for h5dump) decodes them.

Integrity: every zstd frame thimble writes (here, in the rechunked recording and in
ΔW′) carries zstd's content checksum (XXH64 of the decoded bytes), which the
readers below verify as they decode them with zstandard. HDF5's own zstd filter
(hdf5plugin 7.1) does not check it: a plain h5py read of a flipped chunk returns
wrong numbers, so every thimble reader decodes the frames itself. The readers
refuse a frame without a checksum (a flipped header bit could otherwise drop it). The
small uncompressed datasets (losses, masks, counts) carry HDF5's Fletcher32.
Every reader here turns a damaged, truncated or missing file into a
``DataError`` naming the file, the dataset and the steps.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import hdf5plugin  # noqa: F401  (registers the zstd filter with HDF5)
import numpy as np
import zstandard

from thimble.bf16 import BFLOAT16, bfloat16_h5type, torch_to_bits, to_float16_counting
from thimble.errors import DataError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: the tensors of a bf16-rule recording (``thimble.update_rules.recorded_tensors`` gives each rule's)
TENSORS = ("W", "grad_W", "momentum_W", "variance_W")
ZSTD_FILTER = 32015
STREAM_FILE = "stream.h5"
STORAGE_DTYPES = ("bfloat16", "float16")
#: the stored dtype of a tensor: record.dtype for bf16 tensors, float32 for float32 optimizer state
TENSOR_DTYPES = ("bfloat16", "float16", "float32")
#: the ``chunk_checksum`` attribute of every file written here: what guards its chunks
CHUNK_CHECKSUM = "zstd-xxh64"
#: the longest zstd frame header (magic, descriptor, window, dictionary id, content size)
ZSTD_MAX_HEADER = 18


def storage_h5type(storage: str) -> h5py.h5t.TypeID:
    if storage == "bfloat16":
        return bfloat16_h5type()
    if storage == "float16":
        return h5py.h5t.IEEE_F16LE.copy()
    if storage == "float32":
        return h5py.h5t.IEEE_F32LE.copy()
    raise ValueError(f"unknown stored dtype {storage!r}; use one of {TENSOR_DTYPES}")


#: the unsigned integer type that holds an element's bits, by element size
BITS_DTYPES = {2: np.uint16, 4: np.uint32}


def stream_tensors(handle: h5py.File) -> dict[str, str]:
    """The recorded tensors of a stream or rechunked file, each with its stored dtype."""
    import json

    if "recorded_tensors" in handle.attrs:
        return json.loads(handle.attrs["recorded_tensors"])
    return dict.fromkeys(TENSORS, str(handle.attrs.get("storage_dtype", "bfloat16")))


def shuffle_bytes(values: np.ndarray) -> np.ndarray:
    """HDF5's shuffle filter: all first bytes of the elements, then all second bytes, and so on."""
    values = np.ascontiguousarray(values)
    if values.dtype.itemsize != 2:
        return np.ascontiguousarray(values.reshape(-1).view(np.uint8).reshape(-1, values.dtype.itemsize).T).reshape(-1)
    flat = values.reshape(-1).view(np.uint16)
    out = np.empty(flat.size * 2, dtype=np.uint8)
    # arithmetic, not strided byte copies: four times faster
    np.bitwise_and(flat, 0xFF, out=out[:flat.size], casting="unsafe")
    np.right_shift(flat, 8, out=out[flat.size:], casting="unsafe")
    return out


def unshuffle_into(shuffled: np.ndarray, out: np.ndarray) -> None:
    """Inverse of ``shuffle_bytes``: write the elements into ``out`` (any shape, contiguous)."""
    if out.dtype.itemsize != 2:
        size = out.dtype.itemsize
        out.reshape(-1).view(np.uint8).reshape(-1, size)[...] = shuffled.reshape(size, -1).T
        return
    flat = out.reshape(-1)
    low, high = shuffled[:flat.size], shuffled[flat.size:]
    np.left_shift(high, 8, out=flat, dtype=np.uint16)
    np.bitwise_or(flat, low, out=flat)


def damaged(where: str, problem: str) -> DataError:
    """The error for a stored chunk or file that cannot be trusted, saying what to do about it."""
    return DataError(f"{where}: {problem}; the file is damaged: restore it, or delete it and rerun the stage "
                     "that wrote it (for a stream segment: delete the stream folder and train again)")


def chunk_location(dataset: h5py.Dataset, first_step: int, last_step: int) -> str:
    """'file:dataset steps a..b', how errors name a stored chunk."""
    return f"{dataset.file.filename}:{dataset.name} steps {first_step}..{last_step}"


def check_frame_header(header: bytes, where: str) -> zstandard.FrameParameters:
    """The zstd frame's parameters; a DataError unless it is a frame that carries a checksum."""
    try:
        params = zstandard.get_frame_parameters(header)
    except zstandard.ZstdError as error:
        raise damaged(where, f"not a zstd frame ({error})") from None
    if not params.has_checksum:
        raise damaged(where, "its zstd frame carries no checksum (thimble writes one into every frame)")
    return params


def decode_frame(raw: bytes, size: int, where: str = "a stored chunk") -> bytes:
    """One stored zstd frame, decoded with its checksum verified, of exactly ``size`` bytes."""
    check_frame_header(raw[:ZSTD_MAX_HEADER], where)
    try:
        decoded = zstandard.ZstdDecompressor().decompress(raw)
    except zstandard.ZstdError as error:
        raise damaged(where, str(error)) from None
    if len(decoded) != size:
        raise damaged(where, f"it decodes to {len(decoded)} bytes, expected {size}")
    return decoded


def decode_chunk(raw: bytes, out: np.ndarray, where: str = "a stored chunk") -> None:
    """Decode one shuffle -> zstd chunk into ``out`` (its element size), verifying its checksum: what HDF5's
    filter pipeline does, and what it leaves out (its zstd filter does not check the checksum)."""
    unshuffle_into(np.frombuffer(decode_frame(raw, out.nbytes, where), dtype=np.uint8), out)


def zstd_compressor(level: int, threads: int = 0) -> zstandard.ZstdCompressor:
    """The compressor of every stored chunk: its frames carry zstd's content checksum."""
    return zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)


def has_shuffle_zstd(dataset: h5py.Dataset) -> bool:
    plist = dataset.id.get_create_plist()
    return [plist.get_filter(i)[0] for i in range(plist.get_nfilters())] == [h5py.h5z.FILTER_SHUFFLE, ZSTD_FILTER]


_compressors = threading.local()


def encode_chunk(values: np.ndarray, level: int) -> bytes:
    """One chunk as the filter pipeline shuffle -> zstd stores it."""
    if values.dtype.itemsize not in BITS_DTYPES:
        raise TypeError(f"expected 2- or 4-byte elements, got {values.dtype}")
    # a compressor per thread and level: creating one per chunk costs a fifth of the throughput
    compressors = _compressors.__dict__.setdefault("by_level", {})
    if level not in compressors:
        compressors[level] = zstd_compressor(level)
    return compressors[level].compress(shuffle_bytes(values))


def create_tensor_dataset(group: h5py.Group, name: str, shape: tuple, chunk_rows: int, storage: str,
                          level: int) -> h5py.Dataset:
    """A chunked (chunk_rows, V, D), shuffle+zstd compressed dataset of the storage dtype."""
    space = h5py.h5s.create_simple(shape)
    dcpl = zstd_dcpl((chunk_rows, *shape[1:]), level)
    h5py.h5d.create(group.id, name.encode(), storage_h5type(storage), space, dcpl=dcpl)
    return group[name]


def zstd_dcpl(chunks: tuple[int, ...], level: int, shuffle: bool = True) -> h5py.h5p.PropDCID:
    """Creation properties of every compressed tensor here: chunks, [shuffle ->] zstd (filter 32015)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk(tuple(chunks))
    if shuffle:
        dcpl.set_shuffle()
    dcpl.set_filter(ZSTD_FILTER, h5py.h5z.FLAG_OPTIONAL, (level,))
    return dcpl


def require_zstd_filter() -> None:
    """Fail naming the remedy when HDF5 cannot decode zstd chunks (filter 32015).

    Plain h5py says only "can't open directory (/usr/local/lib/plugin)", and
    h5dump prints an empty ``DATA { }`` and exits 0.
    """
    if not h5py.h5z.filter_avail(ZSTD_FILTER):
        raise OSError("HDF5 has no zstd filter (32015) registered, so it cannot decode thimble's compressed "
                      "tensors: `import hdf5plugin` before reading with h5py (reinstall hdf5plugin if that "
                      "does not register it); for h5dump, h5ls or h5diff: eval \"$(thimble h5-env)\"")


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
    itemsize = dataset.id.get_type().get_size()
    dtype = BFLOAT16 if is_bfloat16(dataset) else dataset.dtype
    if dataset.is_virtual:  # a stream: decode from its segment files
        out = np.empty((stop - start, *dataset.shape[1:]), dtype=BITS_DTYPES[itemsize])
        with ThreadPoolExecutor(1) as pool:
            read_stream_rows(Path(dataset.file.filename).parent, dataset.name.lstrip("/"), start, stop, out, pool)
        return out.view(dtype)
    if ZSTD_FILTER not in _filters(dataset) or (h5py.h5z.FILTER_SHUFFLE in _filters(dataset) and itemsize != 2):
        try:  # no zstd frame to check (HDF5 verifies a Fletcher32 checksum itself)
            return dataset[start:stop]
        except OSError as error:
            raise damaged(_stored_in(dataset, start, stop - 1), f"HDF5 cannot decode it ({error})") from None
    return _checked_chunk_rows(dataset, start, stop).view(dtype)


def _filters(dataset: h5py.Dataset) -> list[int]:
    plist = dataset.id.get_create_plist()
    return [plist.get_filter(index)[0] for index in range(plist.get_nfilters())]


def _checked_chunk_rows(dataset: h5py.Dataset, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a chunked [shuffle ->] zstd dataset, decoded chunk by chunk with the
    frame checksum verified; as unsigned integers of the element size."""
    rows, shape = dataset.chunks[0], dataset.shape
    unsigned = np.dtype(f"u{dataset.id.get_type().get_size()}")
    shuffled = h5py.h5z.FILTER_SHUFFLE in _filters(dataset)
    out = np.empty((stop - start, *shape[1:]), dtype=unsigned)
    for first in range(start - start % rows, stop, rows):
        where = chunk_location(dataset, first, min(first + rows, shape[0]) - 1)
        filter_mask, raw = dataset.id.read_direct_chunk((first,) + (0,) * (len(shape) - 1))
        if filter_mask != 0:
            raise damaged(where, f"it skipped filters (mask {filter_mask})")
        chunk = np.empty((rows, *shape[1:]), dtype=unsigned)
        if shuffled:
            decode_chunk(raw, chunk, where)
        else:
            chunk = np.frombuffer(decode_frame(raw, chunk.nbytes, where), dtype=unsigned).reshape(chunk.shape)
        low, high = max(start, first), min(stop, first + rows)
        out[low - start: high - start] = chunk[low - first: high - first]
    return out


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
    import json

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
        self.tensors = dict(tensors) if tensors is not None else dict.fromkeys(TENSORS, storage)
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

    def record(self, step: int, tensors: dict[str, torch.Tensor], loss: float) -> None:
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
            import torch

            if tensor.dtype != torch.float32:
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
    tensors = dict(tensors) if tensors is not None else dict.fromkeys(TENSORS, storage)
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
            h5py.h5d.create(out.id, name.encode(), storage_h5type(dtype), virtual_space, dcpl=dcpl)
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
                     pool: ThreadPoolExecutor, digest=None) -> None:
    """Rows [start, stop) of a recorded tensor, as stored bits, into ``out`` (uint16 or uint32).

    Reads the segments' compressed chunks and decodes them in ``pool``'s threads
    (HDF5 decodes one chunk at a time on one core), each verified against its
    checksum; at most a few chunks wait at once, so memory stays at ``out`` plus
    a handful of chunks. Every row comes from a segment, or it is a DataError
    (never a row left as it was). ``digest`` (hashlib) gets each row as decoded
    from the source, in step order.
    """
    window = 2 * pool._max_workers
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
                try:
                    filter_mask, raw = dataset.id.read_direct_chunk((step - first, 0, 0))
                except (OSError, KeyError) as error:
                    raise damaged(where, f"HDF5 cannot read its chunk ({error})") from None
                if filter_mask != 0:
                    raise damaged(where, f"its chunk skipped filters (mask {filter_mask})")
                pending.append((step, pool.submit(decode_chunk, raw, out[step - start], where)))
                while len(pending) >= window:
                    finish(*pending.popleft())
            while pending:
                finish(*pending.popleft())


def open_chunk(dataset: h5py.Dataset, coords: tuple[int, ...]) -> CheckedChunk:
    """A zstd decompression stream over one stored chunk, read from the file as it goes, checksum verified.

    For chunks of a gigabyte or more: neither the compressed nor the decoded
    chunk is ever whole in memory. The dataset's file must be flushed.
    """
    rows = dataset.chunks[0]
    first = coords[0]
    return CheckedChunk(dataset, coords, chunk_location(dataset, first, min(first + rows, dataset.shape[0]) - 1))


class _StoredBytes:
    """The ``size`` stored bytes of one chunk, from an open file positioned at its start."""

    def __init__(self, handle, size: int, where: str):
        self.handle, self.remaining, self.where = handle, size, where

    def read(self, size: int = -1) -> bytes:
        size = self.remaining if size < 0 else min(size, self.remaining)
        data = self.handle.read(size)
        if len(data) < size:
            raise damaged(self.where, "the file ends inside its chunk (truncated)")
        self.remaining -= len(data)
        return data

    def close(self) -> None:
        self.handle.close()


class CheckedChunk:
    """A stored chunk's zstd frame, decoded as it is read; every failure is a DataError naming the chunk.

    zstd checks the frame's checksum when the decoder reaches the frame's end, so
    leaving the ``with`` block normally reads the rest of the frame (an edge
    chunk's padding) to get there.
    """

    def __init__(self, dataset: h5py.Dataset, coords: tuple[int, ...], where: str):
        self.where = where
        try:
            info = dataset.id.get_chunk_info_by_coord(coords)
        except (OSError, KeyError, ValueError) as error:
            raise damaged(where, f"HDF5 cannot find its chunk ({error})") from None
        if info.byte_offset is None or info.size == 0:
            raise damaged(where, "its chunk was never written")
        if info.filter_mask != 0:
            raise damaged(where, f"its chunk skipped filters (mask {info.filter_mask})")
        handle = open(dataset.file.filename, "rb")
        handle.seek(info.byte_offset)
        try:
            params = check_frame_header(handle.read(ZSTD_MAX_HEADER), where)
        except BaseException:
            handle.close()
            raise
        # the compressors here always write the decoded size; 0 is unknown
        self.size = params.content_size if 0 <= params.content_size < zstandard.CONTENTSIZE_UNKNOWN else None
        self.decoded = 0
        handle.seek(info.byte_offset)
        # the decoder sees the chunk's bytes and nothing after them, so it stops at the frame's end
        self.stored = _StoredBytes(handle, info.size, where)
        self.reader = zstandard.ZstdDecompressor().stream_reader(self.stored, read_size=1 << 20, closefd=True)

    def readinto(self, buffer) -> int:
        try:
            got = self.reader.readinto(buffer)
        except zstandard.ZstdError as error:
            raise damaged(self.where, str(error)) from None
        if got == 0 and len(buffer) and self.size is not None and self.decoded < self.size:
            raise damaged(self.where, f"its chunk ended after {self.decoded} of {self.size} bytes")
        self.decoded += got
        return got

    def verify(self) -> None:
        """Read to the frame's end, where zstd checks the checksum."""
        scratch = bytearray(1 << 20)
        while self.readinto(scratch):
            pass
        if self.size is not None and self.decoded != self.size:
            raise damaged(self.where, f"its chunk decodes to {self.decoded} bytes, expected {self.size}")
        if self.stored.remaining:
            raise damaged(self.where, f"{self.stored.remaining} bytes of its chunk follow the end of its zstd frame")

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> CheckedChunk:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                self.verify()
        finally:
            self.close()


def stored_rows(reader, n_rows: int, row_elements: int, valid_rows: int, block_rows: int, element_bytes: int = 2):
    """Decode a stored shuffle+zstd chunk of 2- or 4-byte rows (``reader``: ``record.open_chunk``) in
    blocks of rows, as uint16 or uint32 bits, holding all but the last byte plane of the chunk.

    The shuffled stream is every element's first byte, then every second byte, and so on: the
    lower planes are kept, then the top plane is read a block at a time and joined with them.
    """
    with reader:
        yield from _stored_rows(reader, n_rows * row_elements, row_elements, valid_rows, block_rows, element_bytes)


def _read_exactly(reader, target: memoryview) -> None:
    got = 0
    while got < len(target):
        read = reader.readinto(target[got:])
        if read == 0:
            raise DataError("a stored chunk ended early")
        got += read


def _stored_rows(reader, n_elements: int, row_elements: int, valid_rows: int, block_rows: int,
                 element_bytes: int = 2):
    lower = np.empty((element_bytes - 1, n_elements), dtype=np.uint8)
    _read_exactly(reader, memoryview(lower.reshape(-1)))
    top = np.empty(block_rows * row_elements, dtype=np.uint8)
    bits = BITS_DTYPES[element_bytes]
    for start in range(0, valid_rows, block_rows):
        rows = min(block_rows, valid_rows - start)
        size = rows * row_elements
        _read_exactly(reader, memoryview(top)[:size])
        first = start * row_elements
        block = np.left_shift(top[:size], 8 * (element_bytes - 1), dtype=bits)
        block |= lower[0, first: first + size]
        for plane in range(1, element_bytes - 1):
            block |= np.left_shift(lower[plane, first: first + size], 8 * plane, dtype=bits)
        yield start, block.reshape(rows, row_elements)
