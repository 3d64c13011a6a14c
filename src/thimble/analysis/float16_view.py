"""The float16 view of an exact bf16 recording: the seed's lossy storage, without training again.

An experiment stored as float16 whose dataset, model and training settings equal those of an experiment
stored as bf16 (its training twin, ``thimble.config.training_twin``) trains the same bits. This stage
writes its ``recording.h5`` from the twin's: every recorded tensor cast per step by the recorder's own
cast (``thimble.numerics.bf16.to_float16_counting``, what ``record.dtype: float16`` training stores), chunked,
encoded, checksummed and attributed as ``thimble rechunk`` writes a float16-recorded run, so every later
stage reads it unchanged. Its decoded tensors are bit for bit those of training with float16 storage and
rechunking (tests/test_float16.py holds that on a tiny run).

The view's attributes are the twin's (the training that made the bits: device, CPU, torch, determinism
check, timings), with what training the float16 experiment would have written in place of what differs:
``experiment``, ``config_hash`` and ``resume_key`` (its settings), ``storage_dtype`` and
``recorded_tensors``; and ``float16_view_of`` (the twin), ``float16_view_source_identity`` (the twin
recording's identity, ``thimble.provenance``) and ``float16_altered`` (values the cast altered, per tensor).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from thimble.config import settings_hash, trajectory_settings
from thimble.errors import DataError
from thimble.numerics.bf16 import bits_to_torch, to_float16_counting
from thimble.provenance import plain, recording_identity
from thimble.record.codec import CHUNK_CHECKSUM
from thimble.sizes import EMBEDDING, HDF5_MAX_CHUNK_BYTES, steps_per_chunk
from thimble.update_rules import recorded_tensors
from thimble.util.workers import WorkerPool

log = logging.getLogger(__name__)

#: rows of the twin read and cast at a time
CAST_BLOCK_ROWS = 16


class Float16ViewError(DataError):
    """The twin's recording cannot give this experiment's float16 view."""


@functools.cache
def float16_table() -> tuple[np.ndarray, np.ndarray]:
    """Per bf16 bit pattern (index 0..65535): the float16 bits the recorder stores, and whether that altered
    the value. The recorder's cast (``to_float16_counting``) is applied once to every pattern; it is
    elementwise, so a block of recorded bits is cast by looking its patterns up, without torch per block."""
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    values, altered_count = to_float16_counting(bits_to_torch(patterns))
    exact = bits_to_torch(patterns).float().numpy()
    back = values.astype(np.float32)
    altered = (back != exact) & ~(np.isnan(back) & np.isnan(exact))  # to_float16_counting's rule, per pattern
    if int(altered.sum()) != altered_count:
        raise AssertionError(f"{int(altered.sum())} patterns altered per pattern, {altered_count} by the cast")
    stored = values.view(np.uint16)
    stored.setflags(write=False)
    altered.setflags(write=False)
    return stored, altered


def float16_bits(bf16_bits: np.ndarray) -> tuple[np.ndarray, int]:
    """The float16 bits the recorder stores for bf16 bit patterns, and how many values the cast altered
    (``float16_table``: the recorder's own cast of each pattern, looked up)."""
    stored, altered = float16_table()
    return stored[bf16_bits], int(np.count_nonzero(altered[bf16_bits]))


def check_twin(attrs, twin_recording: Path, settings: dict) -> None:
    """A Float16ViewError unless the twin's recording is an exact bf16 recording of ``settings``'s trajectory
    (the view's train settings: only the storage may differ)."""
    storage = str(plain(attrs.get("storage_dtype", "")))
    if storage != "bfloat16":
        raise Float16ViewError(f"{twin_recording} stores {storage or 'no storage_dtype'}, not bfloat16: a float16 "
                               "view needs the exact bf16 recording; rebuild it with thimble train and rechunk")
    rule = str(plain(attrs.get("update_rule", "bf16")))
    if rule != "bf16":
        raise Float16ViewError(f"{twin_recording} was trained with training.update_rule {rule}; the float16 view "
                               "is the seed's storage of the bf16 rule only")
    try:
        recorded = json.loads(plain(attrs["resume_key"]))["settings"]
    except (KeyError, ValueError, TypeError):
        raise Float16ViewError(f"{twin_recording} has no readable resume_key attribute (not written by thimble "
                               "train?); rebuild it with thimble train and rechunk") from None
    wanted = trajectory_settings(settings)
    for section in ("model", "training"):
        if recorded.get(section) != wanted[section]:
            raise Float16ViewError(f"{twin_recording} was trained with other {section} settings than "
                                   f"{settings['name']} (recorded {recorded.get(section)}, wanted "
                                   f"{wanted[section]}); rebuild the twin's recording (snakemake reruns it)")


def view_attrs(twin_attrs, settings: dict, twin: str, altered: dict[str, int], rows: int) -> dict:
    """The view's root attributes: the twin's, with those training ``settings`` with float16 storage
    would write in place of what differs (module docstring)."""
    attrs = {name: value for name, value in twin_attrs.items()}
    resume_key = json.loads(plain(attrs["resume_key"]))
    resume_key["settings"] = trajectory_settings(settings)
    attrs.update(experiment=settings["name"], config_hash=settings_hash(settings),
                 resume_key=json.dumps(resume_key, sort_keys=True), storage_dtype="float16",
                 **view_layout((int(attrs["vocab_size"]), int(attrs["hidden_dim"]))).attrs(), float16_view_of=twin,
                 float16_view_source_identity=recording_identity(twin_attrs),
                 float16_altered=json.dumps(altered), steps_per_chunk=rows, chunk_checksum=CHUNK_CHECKSUM)
    return attrs


def view_layout(shape: tuple[int, int]):
    """The view's layout: the embedding alone, float16, as training with float16 storage lays it out."""
    from thimble.record.format import RecordLayout

    return RecordLayout.embedding(shape, recorded_tensors("bf16", "float16"))


def write_float16_view(twin_recording: str | Path, output: str | Path, settings: dict, twin: str,
                       chunk_setting: int | str, max_chunk_bytes: int, level: int = 1,
                       threads: int = 1) -> dict[str, int]:
    """Write ``output``, the float16 recording of ``settings`` (the view experiment's train settings), from
    its twin's bf16 ``twin_recording``. Returns the values the cast altered, per tensor. The file appears
    under its final name only when complete and verified."""
    from thimble.record.format import create_checked_array, open_h5, read_checked, storage_h5type
    from thimble.record.reader import RecordedTensor
    from thimble.record.rechunk import write_rechunked
    from thimble.util.files import atomic_output

    twin_recording, output = Path(twin_recording), Path(output)
    tensors = recorded_tensors("bf16", "float16")
    with open_h5(twin_recording) as source, atomic_output(output) as tmp:
        check_twin(source.attrs, twin_recording, settings)
        n_rows, vocab, hidden = source["W"].shape
        row_bytes = vocab * hidden * 2  # every tensor float16
        rows = steps_per_chunk(n_rows, row_bytes, chunk_setting, max_chunk_bytes)
        if rows * row_bytes > HDF5_MAX_CHUNK_BYTES:
            raise Float16ViewError(f"{rows} steps per chunk make {rows * row_bytes} bytes, over HDF5's 4 GiB "
                                   "chunk limit; lower rechunk.steps_per_chunk")
        log.info("float16 view of %s: %d steps of %d x %d in chunks of %d steps", twin_recording, n_rows, vocab,
                 hidden, rows)
        altered = dict.fromkeys(tensors, 0)
        layout = view_layout((vocab, hidden))
        paths = layout.params[EMBEDDING].roles()
        with h5py.File(tmp, "w") as out, WorkerPool(threads) as pool, \
                tqdm(total=n_rows * vocab * hidden * 2 * len(tensors), unit="B", unit_scale=True,
                     desc="float16 view", mininterval=5) as progress:
            for name in tensors:
                twin_rows = RecordedTensor.of_recording(source, name).in_order(CAST_BLOCK_ROWS)

                def cast_rows(start: int, stop: int, chunk: np.ndarray, digest, name=name, twin_rows=twin_rows) -> None:
                    for low in range(start, stop, CAST_BLOCK_ROWS):
                        high = min(low + CAST_BLOCK_ROWS, stop)
                        bits, count = float16_bits(twin_rows.read(low, high))
                        altered[name] += count
                        chunk[low - start:high - start] = bits
                        digest.update(bits.data)  # as rechunk hashes rows in step order

                checksum = write_rechunked(out, paths[name], storage_h5type("float16"), (n_rows, vocab, hidden),
                                           rows, level, pool, progress, cast_rows)
                twin_rows.finish()  # its last chunk's checksum is checked at its frame's end
                log.info("%s: %d of %d values altered by float16; verified, sha256 %s", name, altered[name],
                         n_rows * vocab * hidden, checksum)
            layout.link_aliases(out)
            for name, item in source.items():
                if isinstance(item, h5py.Dataset) and name not in tensors:
                    create_checked_array(out, name, read_checked(item))
            out.attrs.update(view_attrs(source.attrs, settings, twin, altered, rows))
    return altered
