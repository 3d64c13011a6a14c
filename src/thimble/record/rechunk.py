"""Rechunk a recorded stream (one step per chunk) into large time chunks, bit for bit.

The lab's analysis loads whole tensors at a time, so every recorded tensor (``params/<name>/value``,
``grad``, the optimizer's state; the embedding's seed names linked to them) is rewritten with chunks of
(steps_per_chunk, *shape); losses, masks and attributes are carried over.

Each destination chunk is read whole, shuffled and zstd-compressed in a
streaming, multi-threaded pass, and written with one direct chunk write, so
peak memory stays near 1.5 x one destination chunk whatever T is. A sha256 of
every dataset is taken of the rows as they decode from the stream's segments
(each segment chunk verified against its zstd checksum, every step accounted
for) and again by reading the destination back; the two must agree or the
stage fails and leaves no output. The destination's frames carry zstd
checksums too.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from thimble.errors import DataError
from thimble.outputs import STREAM_FILE
from thimble.record.codec import (
    BITS_DTYPES,
    CHUNK_CHECKSUM,
    chunk_row_blocks,
    compress_shuffled,
    time_chunks,
    write_chunk,
    zstd_dcpl,
)
from thimble.record.h5_datasets import create_dataset, element_size
from thimble.sizes import HDF5_MAX_CHUNK_BYTES, steps_per_chunk
from thimble.util.workers import WorkerPool

log = logging.getLogger(__name__)

#: rows decoded at a time when a written chunk is read back to verify it
VERIFY_BLOCK_ROWS = 16


class RechunkError(DataError):
    """The rechunked file would not hold the same bits as its source."""


def create_chunked(group: h5py.Group, name: str, h5type: h5py.h5t.TypeID, shape: tuple, rows: int,
                   level: int) -> h5py.Dataset:
    return create_dataset(group, name, h5type, shape, zstd_dcpl((rows, *shape[1:]), level))


def write_rechunked(out: h5py.File, name: str, h5type: h5py.h5t.TypeID, shape: tuple, rows: int, level: int,
                    pool: WorkerPool, progress: tqdm, fill_rows) -> str:
    """Write one tensor in (rows, ...) chunks; return the sha256 of its bits, verified on disk.

    ``fill_rows(start, stop, chunk, digest)`` puts rows [start, stop) into ``chunk[:stop - start]`` (the
    stored bits) and hashes each into ``digest`` as it comes from its source: rechunk decodes them from the
    stream, the float16 view casts them from its twin's recording.
    """
    target = create_chunked(out, name, h5type, shape, rows, level)
    row_elements = math.prod(shape[1:])
    element_bytes = h5type.get_size()
    copied, stored = hashlib.sha256(), hashlib.sha256()
    for start, stop in time_chunks(shape[0], rows):
        # HDF5 stores an edge chunk at full size: the rows past the end are zero padding
        chunk = np.zeros((rows, *shape[1:]), dtype=BITS_DTYPES[element_bytes])
        fill_rows(start, stop, chunk, copied)
        pieces = compress_shuffled(chunk, level, pool.threads)
        del chunk  # the source chunk goes before the compressed one is joined: peak ~1.5 chunks
        write_chunk(target, start, b"".join(pieces))
        del pieces
        # read the chunk back from the file and hash what it decodes to, a block of rows at a time
        out.flush()
        for _, block in chunk_row_blocks(target, start, VERIFY_BLOCK_ROWS):
            stored.update(block.data)
        progress.update((stop - start) * row_elements * element_bytes)
    if stored.hexdigest() != copied.hexdigest():
        raise RechunkError(f"{name}: the rechunked bits differ from the source "
                           f"(sha256 {stored.hexdigest()} != {copied.hexdigest()})")
    target.attrs["sha256"] = copied.hexdigest()
    return copied.hexdigest()


def copy_rechunked(source: h5py.Dataset, out: h5py.File, rows: int, level: int,
                   pool: WorkerPool, progress: tqdm) -> str:
    """Copy one tensor of the stream into (rows, ...) chunks; return the sha256 of its bits, verified on disk."""
    from thimble.record.reader import RecordedTensor

    name = source.name.lstrip("/")
    rows_of = RecordedTensor(source)

    def from_stream(start: int, stop: int, chunk: np.ndarray, digest) -> None:
        # `digest` hashes each row as it decodes from the stream's segments (a missing one is an error)
        rows_of.bits(start, stop, chunk[:stop - start], pool, digest)

    # h5py shows bf16 as float32: the stored type is HDF5's
    return write_rechunked(out, name, source.id.get_type(), source.shape, rows, level, pool, progress, from_stream)


class RecordingSourceError(DataError):
    """An outside recording that is not what the experiment's config says it analyses."""


def rechunk_stream(stream_dir: str | Path, output: str | Path, setting: int | str, max_chunk_bytes: int,
                   level: int = 1, threads: int = 1, outside: dict | None = None) -> dict[str, str]:
    """Write ``output``: the stream's tensors in large time chunks, the rest carried over.

    Returns the sha256 of each tensor's bits. The file appears under its final
    name only when complete and verified, so a recording already at ``output``
    stays as it was when the stream turns out damaged, and the error says so
    (the workflow keeps it for a rerun: the last intact copy of what the stream lost).

    ``outside``: for an experiment whose source is a recording made by ``thimble.Recorder``, ``{"name": the
    experiment, "source": its config's source}`` (``thimble.config.recording_source``). The stream must then be
    the Recorder's and hold what ``source`` expects (``RecordingSourceError`` otherwise), and ``output`` is the
    experiment's: its attribute ``experiment`` is the experiment's name (the recording's own is kept as
    ``source_experiment``), and ``source_attrs`` say which recording it was made from.
    """
    output = Path(output)
    replaced = output.exists()
    try:
        return rechunk_into(Path(stream_dir), output, setting, max_chunk_bytes, level, threads, outside)
    except DataError as error:
        if not replaced or isinstance(error, (RechunkError, RecordingSourceError)):
            raise
        again = "record again" if outside else "train again"
        raise DataError(f"{error}; {output} is kept as it was: restore {stream_dir}, or delete the stream and "
                        f"{again}") from error


def check_outside_recording(stream: h5py.File, stream_dir: Path, outside: dict) -> None:
    """A ``RecordingSourceError`` unless ``stream`` is thimble.Recorder's and holds the parameters and the run
    the experiment's ``source`` expects."""
    import json

    from thimble.config import recording_mismatch
    from thimble.record.format import made_by_recorder

    where = stream_dir / STREAM_FILE
    if not made_by_recorder(stream.attrs):
        raise RecordingSourceError(f"{where} is not a recording of thimble.Recorder (its attribute recorded_by is "
                                   f"{stream.attrs.get('recorded_by')!r}); point config key "
                                   f"experiments.{outside['name']}.source.recording at a folder a Recorder wrote")
    problem = recording_mismatch(f"experiments.{outside['name']}", outside["source"], str(where),
                                 json.loads(stream.attrs["param_names"]), stream.attrs.get("experiment"))
    if problem:
        raise RecordingSourceError(problem)


def source_attrs(stream: h5py.File, stream_dir: Path, outside: dict, checksums: dict[str, str]) -> dict:
    """The attributes of an outside recording's recording.h5 that say what it was made from: ``experiment`` (the
    experiment's name, which the stages check against the folder), ``source_experiment`` (the name it was
    recorded under), ``source_recording`` (the recording's folder, resolved), ``source_stream_sha256`` (of its
    stream.h5) and ``source_tensors_sha256`` (of every recorded tensor's bits: the sha256 of the JSON
    ``{dataset: sha256 of its bits}``, keys sorted), the recording's identity."""
    import json

    from thimble.util.files import sha256_file

    return {"experiment": outside["name"], "source_experiment": str(stream.attrs.get("experiment", "")),
            "source_recording": str(stream_dir.resolve().parent),
            "source_stream_sha256": sha256_file(stream_dir / STREAM_FILE),
            "source_tensors_sha256": hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()}


def rechunk_into(stream_dir: Path, output: Path, setting: int | str, max_chunk_bytes: int, level: int,
                 threads: int, outside: dict | None = None) -> dict[str, str]:
    """``rechunk_stream``'s work: the stream read, verified and written to ``output`` whole."""
    from thimble.record.format import RecordLayout, create_checked_array, read_checked
    from thimble.record.stream_reader import open_stream
    from thimble.util.files import atomic_output

    with open_stream(stream_dir) as stream, atomic_output(output) as tmp:
        if outside is not None:
            check_outside_recording(stream, stream_dir, outside)
        layout = RecordLayout.of_file(stream)
        datasets = {name: stream[name] for name in layout.datasets()}
        n_rows = stream["losses"].shape[0]
        # every tensor gets the same steps per chunk (the stages read tensors block by block together): the
        # largest step of any tensor sets it
        row_bytes = max(math.prod(dataset.shape[1:]) * element_size(dataset) for dataset in datasets.values())
        rows = steps_per_chunk(n_rows, row_bytes, setting, max_chunk_bytes)
        if rows * row_bytes > HDF5_MAX_CHUNK_BYTES:
            raise RechunkError(f"{rows} steps per chunk make {rows * row_bytes} bytes, over HDF5's 4 GiB chunk limit")
        log.info("rechunking %s: %d steps of %d tensors (%d parameters) in chunks of %d steps (%.2f GB at most)",
                 stream_dir, n_rows, len(datasets), len(layout.params), rows, rows * row_bytes / 1e9)
        checksums = {}
        total = sum(dataset.size * element_size(dataset) for dataset in datasets.values())
        with h5py.File(tmp, "w") as out, WorkerPool(threads) as pool, \
                tqdm(total=total, unit="B", unit_scale=True, desc="rechunk", mininterval=5) as progress:
            for name, dataset in datasets.items():
                checksums[name] = copy_rechunked(dataset, out, rows, level, pool, progress)
                log.info("%s: verified, sha256 %s", name, checksums[name])
            layout.link_aliases(out)
            for name, item in stream.items():
                if isinstance(item, h5py.Dataset) and name not in datasets and not layout.is_alias(name):
                    create_checked_array(out, name, read_checked(item))
            out.attrs.update(dict(stream.attrs))
            if outside is not None:
                out.attrs.update(source_attrs(stream, stream_dir, outside, checksums))
            out.attrs["steps_per_chunk"] = rows
            out.attrs["chunk_checksum"] = CHUNK_CHECKSUM
    return checksums
