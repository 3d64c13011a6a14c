"""The stored-chunk codec: how every compressed tensor chunk thimble writes is encoded, read and verified.

A chunk is the filter pipeline [byte shuffle ->] zstd (filter 32015): the shuffle
is HDF5's (every element's first byte, then every second byte, ...; 2- and 4-byte
elements, handled as their unsigned bits),
and the zstd frame carries zstd's content checksum (XXH64 of the decoded bytes).
The datasets declare that pipeline, so any HDF5 reader with hdf5plugin loaded
(``import hdf5plugin``, or ``HDF5_PLUGIN_PATH`` for h5dump) decodes them.

Integrity: HDF5's own zstd filter (hdf5plugin 7.1) does not check the checksum,
so a plain h5py read of a flipped chunk returns wrong numbers. Thimble's readers
therefore take the stored bytes (direct chunk reads) and decode the frames here,
verifying each checksum, and refuse a frame without one (a flipped header bit
could otherwise drop it). Every failure is a ``DataError`` naming the file, the
dataset and the steps. Chunks are written with direct chunk writes, so HDF5
never writes a frame without a checksum.

These are the chunk-level calls; rows are read through ``thimble.record.reader`` (``RecordedTensor``), which
iterates them over a dataset's chunks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import h5py
import hdf5plugin  # noqa: F401  (registers the zstd filter with HDF5)
import numpy as np
import zstandard

from thimble.errors import DataError
from thimble.record.h5_datasets import element_size

ZSTD_FILTER = 32015
#: the ``chunk_checksum`` attribute of every file holding such chunks: what guards them
CHUNK_CHECKSUM = "zstd-xxh64"
#: the longest zstd frame header (magic, descriptor, window, dictionary id, content size)
ZSTD_MAX_HEADER = 18
#: the largest zstd window any decoder accepts without being told to (zstd's ZSTD_WINDOWLOG_LIMIT_DEFAULT)
ZSTD_MAX_WINDOW_LOG = 27
#: bytes fed to the compressor at a time while shuffling a large chunk
SHUFFLE_PIECE = 1 << 24
#: bytes the streaming decoder reads from the file at a time
READ_SIZE = 1 << 20
#: the unsigned integer type that holds an element's bits, by element size
BITS_DTYPES = {2: np.uint16, 4: np.uint32}


# -- errors --------------------------------------------------------------------------------------

def damaged(where: str, problem: str) -> DataError:
    """The error for a stored chunk or file that cannot be trusted, saying what to do about it."""
    return DataError(f"{where}: {problem}; the file is damaged: restore it, or delete it and rerun the stage "
                     "that wrote it (for a stream segment: delete the stream folder and train again)")


def chunk_location(dataset: h5py.Dataset, first_step: int, last_step: int) -> str:
    """'file:dataset steps a..b', how errors name a stored chunk."""
    return f"{dataset.file.filename}:{dataset.name} steps {first_step}..{last_step}"


def chunk_where(dataset: h5py.Dataset, first: int) -> str:
    """How errors name the chunk that starts at row ``first``: 'file:dataset steps a..b', the steps it holds."""
    return chunk_location(dataset, first, min(first + dataset.chunks[0], dataset.shape[0]) - 1)


# -- byte shuffle --------------------------------------------------------------------------------

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


# -- zstd frames ---------------------------------------------------------------------------------

def window_log_for(row_elements: int, level: int) -> int:
    """The zstd window (log2 bytes) of a chunk of many steps of ``row_elements`` elements each.

    A shuffled byte plane holds one byte per element, so the same element one step earlier lies
    ``row_elements`` bytes back: at thimble_7's width (640,000 elements) beyond level 1's own window
    (2^19 for large inputs), which then codes every step from scratch. The window reaches eight steps
    back (a frozen weight or a stalled exp_avg_sq is a match against the previous step; eight, so that
    the multithreaded compressor's jobs, each a few windows long, overlap by whole steps), never below
    the level's own and never above ZSTD_MAX_WINDOW_LOG, so the frames stay ones every decoder reads.
    """
    own = zstandard.ZstdCompressionParameters.from_level(level, source_size=1 << 30).window_log
    reach = max(1, 8 * row_elements - 1).bit_length()
    return min(ZSTD_MAX_WINDOW_LOG, max(own, reach))


def zstd_compressor(level: int, threads: int = 0, window_log: int | None = None) -> zstandard.ZstdCompressor:
    """The compressor of every stored chunk: its frames carry zstd's content checksum. ``window_log``
    widens the level's window (``window_log_for``); with threads, each job of the multithreaded
    compressor spans several windows and starts from the whole window before it (its defaults, jobs of a
    few MB with a small overlap, lose the step before at every job start). The frames stay standard
    (HDF5's zstd filter and any zstd decoder read them)."""
    if window_log is None:
        return zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    jobs = {"job_size": max(1 << 25, 4 << window_log), "overlap_log": 9} if threads else {}
    params = zstandard.ZstdCompressionParameters.from_level(level, source_size=1 << 30, window_log=window_log,
                                                            threads=threads, write_checksum=1,
                                                            write_content_size=1, **jobs)
    return zstandard.ZstdCompressor(compression_params=params)


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


class FrameEncoder:
    """One zstd frame of ``size`` decoded bytes, compressed piece by piece as the pieces come."""

    def __init__(self, size: int, level: int, threads: int = 0, window_log: int | None = None):
        self._compressor = zstd_compressor(level, threads, window_log).compressobj(size=size)
        self.pieces: list[bytes] = []

    def add(self, values: np.ndarray) -> None:
        self.pieces.append(self._compressor.compress(np.ascontiguousarray(values)))

    def add_shuffled(self, values: np.ndarray) -> None:
        """2- or 4-byte ``values`` shuffled as they are compressed, a piece at a time (no shuffled copy)."""
        size = values.dtype.itemsize
        flat = values.reshape(-1).view(BITS_DTYPES[size])
        piece = np.empty(min(SHUFFLE_PIECE, flat.size), dtype=np.uint8)
        for plane in range(size):  # every element's lowest byte, then the next, ...
            for begin in range(0, flat.size, piece.size):
                part = flat[begin:begin + piece.size]
                out = piece[:part.size]
                if plane == 0:
                    np.bitwise_and(part, 0xFF, out=out, casting="unsafe")
                elif plane == size - 1:
                    np.right_shift(part, 8 * plane, out=out, casting="unsafe")
                else:
                    np.bitwise_and(part >> (8 * plane), 0xFF, out=out, casting="unsafe")
                self.add(out)

    def finish(self) -> list[bytes]:
        """The frame's compressed pieces (join them to write the chunk)."""
        self.pieces.append(self._compressor.flush())
        return self.pieces


def compress_shuffled(values: np.ndarray, level: int, threads: int) -> list[bytes]:
    """zstd(shuffle(values)) for a chunk of steps (rows) of 2- or 4-byte elements as compressed pieces,
    streamed (no shuffled copy), with a window that reaches the previous steps (``window_log_for``)."""
    encoder = FrameEncoder(values.nbytes, level, threads, window_log_for(int(np.prod(values.shape[1:])), level))
    encoder.add_shuffled(values)
    return encoder.finish()


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


# -- datasets ------------------------------------------------------------------------------------

def zstd_dcpl(chunks: tuple[int, ...], level: int, shuffle: bool = True) -> h5py.h5p.PropDCID:
    """Creation properties of every compressed tensor: chunks, [shuffle ->] zstd (filter 32015)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk(tuple(chunks))
    if shuffle:
        dcpl.set_shuffle()
    dcpl.set_filter(ZSTD_FILTER, h5py.h5z.FLAG_OPTIONAL, (level,))
    return dcpl


def dataset_filters(dataset: h5py.Dataset) -> list[int]:
    return [code for code, _ in _filters_with_values(dataset)]


def zstd_level(dataset: h5py.Dataset) -> int:
    """The zstd level a dataset's chunks were written with (its filter's parameter)."""
    return next(int(values[0]) for code, values in _filters_with_values(dataset) if code == ZSTD_FILTER)


def _filters_with_values(dataset: h5py.Dataset) -> list[tuple[int, tuple]]:
    plist = dataset.id.get_create_plist()
    return [plist.get_filter(index)[:3:2] for index in range(plist.get_nfilters())]


def has_shuffle_zstd(dataset: h5py.Dataset) -> bool:
    return dataset_filters(dataset) == [h5py.h5z.FILTER_SHUFFLE, ZSTD_FILTER]


def require_zstd_filter() -> None:
    """Fail naming the remedy when HDF5 cannot decode zstd chunks (filter 32015).

    Plain h5py says only "can't open directory (/usr/local/lib/plugin)", and
    h5dump prints an empty ``DATA { }`` and exits 0.
    """
    if not h5py.h5z.filter_avail(ZSTD_FILTER):
        raise OSError("HDF5 has no zstd filter (32015) registered, so it cannot decode thimble's compressed "
                      "tensors: `import hdf5plugin` before reading with h5py (reinstall hdf5plugin if that "
                      "does not register it); for h5dump, h5ls or h5diff: eval \"$(thimble h5-env)\"")


def time_chunks(n_rows: int, rows: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of consecutive chunks of ``rows`` rows."""
    return [(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


def chunk_origin(dataset: h5py.Dataset, first_row: int) -> tuple[int, ...]:
    """The coordinates of the chunk whose first row is ``first_row`` (chunks span every other axis)."""
    return (first_row,) + (0,) * (dataset.ndim - 1)


def write_chunk(dataset: h5py.Dataset, first_row: int, frame: bytes) -> None:
    """Store an encoded chunk as it is (its frame carries a checksum, which HDF5's filter would not write)."""
    dataset.id.write_direct_chunk(chunk_origin(dataset, first_row), frame, 0)


def read_stored_chunk(dataset: h5py.Dataset, first_row: int, where: str) -> bytes:
    """The stored (still encoded) bytes of the chunk starting at ``first_row``."""
    try:
        filter_mask, raw = dataset.id.read_direct_chunk(chunk_origin(dataset, first_row))
    except (OSError, KeyError) as error:
        raise damaged(where, f"HDF5 cannot read its chunk ({error})") from None
    if filter_mask != 0:
        raise damaged(where, f"its chunk skipped filters (mask {filter_mask})")
    return raw


def decode_stored_chunk(dataset: h5py.Dataset, first_row: int, out: np.ndarray) -> None:
    """The whole stored chunk starting at ``first_row`` of a chunked [shuffle ->] zstd dataset, decoded into
    ``out`` (the chunk's full shape, unsigned integers of the element size) with its frame's checksum verified."""
    where = chunk_where(dataset, first_row)
    raw = read_stored_chunk(dataset, first_row, where)
    if h5py.h5z.FILTER_SHUFFLE in dataset_filters(dataset):
        decode_chunk(raw, out, where)
    else:
        out[...] = np.frombuffer(decode_frame(raw, out.nbytes, where), dtype=out.dtype).reshape(out.shape)


# -- streaming a chunk too large to hold twice -----------------------------------------------------

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
    """A stored chunk's zstd frame, decoded as it is read from the file; every failure is a DataError
    naming the chunk. For chunks of a gigabyte or more: neither the compressed nor the decoded chunk
    is ever whole in memory. The dataset's file must be flushed.

    zstd checks the frame's checksum when the decoder reaches the frame's end, so
    leaving the ``with`` block normally reads the rest of the frame (an edge
    chunk's padding) to get there.
    """

    def __init__(self, dataset: h5py.Dataset, first_row: int):
        self.where = where = chunk_where(dataset, first_row)
        try:
            info = dataset.id.get_chunk_info_by_coord(chunk_origin(dataset, first_row))
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
        self.reader = zstandard.ZstdDecompressor().stream_reader(self.stored, read_size=READ_SIZE, closefd=True)

    def readinto(self, buffer) -> int:
        try:
            got = self.reader.readinto(buffer)
        except zstandard.ZstdError as error:
            raise damaged(self.where, str(error)) from None
        if got == 0 and len(buffer) and self.size is not None and self.decoded < self.size:
            raise damaged(self.where, f"its chunk ended after {self.decoded} of {self.size} bytes")
        self.decoded += got
        return got

    def read_exactly(self, buffer) -> None:
        """Fill ``buffer`` (a writable buffer) from the frame."""
        view, filled = memoryview(buffer).cast("B"), 0
        while filled < len(view):
            got = self.readinto(view[filled:])
            if got == 0:
                raise damaged(self.where, f"its chunk ended after {self.decoded} bytes")
            filled += got

    def verify(self) -> None:
        """Read to the frame's end, where zstd checks the checksum."""
        scratch = bytearray(READ_SIZE)
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


def chunk_row_blocks(dataset: h5py.Dataset, first_row: int, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """The valid rows of one stored [shuffle ->] zstd chunk as (first row, block): blocks of up to
    ``block_rows`` rows of bits (unsigned integers of the element size, shaped (rows, *row shape)), the
    frame's checksum verified after the last block. Never the whole decoded chunk in memory: a shuffled
    chunk holds its lower byte planes (``_shuffled_row_blocks``), an unshuffled one none."""
    if h5py.h5z.FILTER_SHUFFLE in dataset_filters(dataset):
        yield from _shuffled_row_blocks(dataset, first_row, block_rows)
        return
    rows, n_rows = dataset.chunks[0], dataset.shape[0]
    bits = np.dtype(f"u{element_size(dataset)}")
    with CheckedChunk(dataset, first_row) as chunk:
        for first in range(first_row, min(first_row + rows, n_rows), block_rows):
            block = np.empty((min(block_rows, first_row + rows - first, n_rows - first), *dataset.shape[1:]),
                             dtype=bits)
            chunk.read_exactly(block)
            yield first, block


def _shuffled_row_blocks(dataset: h5py.Dataset, first_row: int,
                         block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """``chunk_row_blocks`` of a shuffled chunk of 2- or 4-byte elements.

    The shuffled stream is every element's first byte, then every second byte, and so on: the lower
    planes are kept (half a chunk of bf16), then the top plane is read a block at a time and joined with them.
    """
    rows, element_bytes = dataset.chunks[0], element_size(dataset)
    valid_rows = min(rows, dataset.shape[0] - first_row)
    row_elements = int(np.prod(dataset.shape[1:]))
    bits = BITS_DTYPES[element_bytes]
    with CheckedChunk(dataset, first_row) as chunk:
        lower = np.empty((element_bytes - 1, rows * row_elements), dtype=np.uint8)  # edge chunks are full size
        chunk.read_exactly(lower)
        top = np.empty(block_rows * row_elements, dtype=np.uint8)
        for start in range(0, valid_rows, block_rows):
            first, size = start * row_elements, min(block_rows, valid_rows - start) * row_elements
            chunk.read_exactly(top[:size])
            block = np.left_shift(top[:size], 8 * (element_bytes - 1), dtype=bits)
            block |= lower[0, first: first + size]
            for plane in range(1, element_bytes - 1):
                block |= np.left_shift(lower[plane, first: first + size], 8 * plane, dtype=bits)
            yield first_row + start, block.reshape(-1, *dataset.shape[1:])
