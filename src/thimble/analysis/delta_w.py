"""The lattice stage: ΔW′ of every tensor of a rechunked recording, each in its own lattice (bf16's; a recorder's
float16 or float32 parameter in float16's or float32's), in integer lattice steps, written beside it
(``delta_w_lattice.h5``). The arithmetic is ``thimble.numerics.lattice``'s."""

from __future__ import annotations

import logging

import numpy as np

from thimble.numerics.lattice import BF16_LATTICE, Lattice, NonFiniteError, check_finite, ordinal
from thimble.outputs import DELTA_W_DATASET
from thimble.record.format import param_dataset

log = logging.getLogger(__name__)


#: rows of W turned into ΔW′ at a time (bounds the temporaries)
BLOCK_ROWS = 32


def delta_dtypes(lattice: Lattice) -> tuple[np.dtype, ...]:
    """The integer types a tensor's ΔW′ is tried in, narrowest first: int16 when every step count fits, then
    the lattice's ordinal type, which holds every difference of two ordinals (int32 for the 16-bit lattices,
    int64 for float32's)."""
    return tuple(dict.fromkeys([np.dtype(np.int16), np.dtype(np.int32), lattice.ordinal_dtype]))


def _block_delta(bits: np.ndarray, previous: np.ndarray, out: np.ndarray,
                 lattice: Lattice = BF16_LATTICE) -> tuple[np.ndarray, np.ndarray] | None:
    """ΔW′ of ``bits`` (rows, n) after the row ``previous`` (n,) in ``lattice`` into ``out``; (moves, crossed)
    per row, or None when a step count does not fit ``out``'s integer type.

    Raises NonFiniteError without a location (the caller names it).
    """
    both = np.concatenate([previous[None], bits])
    if (both & lattice.magnitude_bits).max() >= lattice.nonfinite_magnitude:
        raise NonFiniteError("the tensor holds NaN or Inf")
    signed = ordinal(both, lattice)
    delta = np.subtract(signed[1:], signed[:-1])
    info = np.iinfo(out.dtype)
    if delta.min() < info.min or delta.max() > info.max:
        return None
    out[...] = delta
    binade = both >> lattice.exponent_shift  # sign and exponent field
    moved = delta != 0
    crossed = moved & (binade[1:] != binade[:-1])
    return np.count_nonzero(moved, axis=1), np.count_nonzero(crossed, axis=1)


def write_delta_w_lattice(recording: str, output: str, level: int = 2, threads: int = 1) -> dict:
    """ΔW′ of every recorded tensor of a rechunked recording, indexed by step (row 0 is 0: nothing moves before
    t = 0), each in its own lattice.

    Each tensor's ΔW′ is ``params/<name>/delta_w_lattice`` of the tensor's shape, with its per-step counts of moves
    and binade crossings beside it; the embedding's are also at the root under the seed's names (hard links),
    so that an embedding-only run reads as before. Each tensor is counted in its own lattice
    (``thimble.analysis.tensors.stored_lattice``). A tensor's ΔW′ is int16 when every step count fits (checked),
    else int32 (int64 for a float32 tensor whose step counts exceed int32: ``delta_dtypes``), in chunks of the
    recording's steps per chunk, zstd-compressed. Returns the summary: the embedding's at the top level (when it is recorded) and every tensor's under ``tensors``. Values are decoded
    from their stored chunks block by block, so memory stays near half a chunk of the largest tensor plus the
    compressed output.
    """
    import h5py

    from thimble.analysis.tensors import recorded_params, stored_lattice
    from thimble.record.codec import CHUNK_CHECKSUM
    from thimble.record.format import open_h5
    from thimble.sizes import EMBEDDING
    from thimble.util.files import atomic_output
    from thimble.util.workers import WorkerPool

    with open_h5(recording) as source, WorkerPool(threads) as pool, atomic_output(output) as tmp:
        if source.attrs.get("storage_dtype") == "float16":
            log.warning("%s stores float16 (record.dtype float16): ΔW′ is of the stored values read back as bf16, "
                        "not exact where float16 altered W", recording)
        summaries = {}
        with h5py.File(tmp, "w") as out:
            for param in recorded_params(source):
                group = out.require_group(param_dataset(param.name, "")[:-1])
                lattice = stored_lattice(source.attrs, param)
                for dtype in delta_dtypes(lattice):
                    # a step count beyond the type: walk the tensor again into the next, the last holds all
                    for name in list(group):
                        del group[name]
                    summary = _write_delta(source, param.roles()["W"], param.name, group, dtype, level, pool,
                                           lattice)
                    if summary is not None:
                        break
                summaries[param.name] = {**summary, "lattice": lattice.name}
            if EMBEDDING in summaries:
                for name in (DELTA_W_DATASET, *COUNTS):
                    out[name] = out[param_dataset(EMBEDDING, name)]
            out.attrs.update({key: value for key, value in source.attrs.items()
                              if key not in ("sha256", "steps_per_chunk")})
            out.attrs["source"] = str(recording)
            out.attrs["chunk_checksum"] = CHUNK_CHECKSUM
    return {**summaries.get(EMBEDDING, {}), "tensors": summaries}


#: the per-step counts beside each ΔW′: steps that moved an element, and those that crossed a binade
COUNTS = ("moves_per_step", "crossed_binade_per_step")


def _write_delta(source, path: str, name: str, out, dtype: np.dtype, level: int, pool,
                 lattice: Lattice = BF16_LATTICE) -> dict | None:
    """Write ΔW′ of ``source``'s tensor at ``path`` (parameter ``name``'s value) in ``lattice`` as ``dtype`` into
    the group ``out``; None (and datasets to discard) when a step count does not fit ``dtype``."""
    import h5py
    from tqdm.auto import tqdm

    from thimble.record.codec import FrameEncoder, window_log_for, write_chunk, zstd_dcpl
    from thimble.record.format import create_checked_array
    from thimble.record.h5_datasets import create_dataset
    from thimble.record.reader import RecordedTensor
    from thimble.util.workers import thread_spans

    w = source[path]
    rows, (n_steps, *row_shape) = w.chunks[0], w.shape
    row_elements = int(np.prod(row_shape))
    moves, crossed = np.zeros(n_steps, np.int64), np.zeros(n_steps, np.int64)
    # columns split across threads: numpy releases the GIL in its loops
    spans = thread_spans(row_elements, pool.threads)
    # zstd only, no shuffle: rows decode in order, and small integers compress well anyway
    target = create_dataset(out, DELTA_W_DATASET, h5py.h5t.py_create(dtype), w.shape,
                            zstd_dcpl(w.chunks, level, shuffle=False))
    previous = encoder = None
    for step, block in tqdm(RecordedTensor.of_recording(source, path).blocks(BLOCK_ROWS), desc=f"ΔW′ {name}",
                            unit="block", mininterval=5):
        block = block.reshape(len(block), row_elements)
        chunk_start, end = step - step % rows, step + len(block)
        if step == chunk_start:
            # unshuffled: the previous step of an element lies a row of integers back
            encoder = FrameEncoder(rows * row_elements * dtype.itemsize, level, pool.threads,
                                   window_log_for(row_elements * dtype.itemsize, level))
        if previous is None:  # step 0: nothing moved before it
            previous = block[0].copy()
        delta = np.empty(block.shape, dtype)
        futures = [pool.submit(_block_delta, block[:, a:b], previous[a:b], delta[:, a:b], lattice)
                   for a, b in spans]
        try:
            counts = [future.result() for future in futures]
        except NonFiniteError:
            check_finite(np.concatenate([previous[None], block]).reshape(-1, *row_shape), first_step=step - 1,
                         name=name, lattice=lattice)
            raise  # check_finite raised, naming the tensor, the step and the element
        if any(count is None for count in counts):
            return None
        moves[step:end] = sum(count[0] for count in counts)
        crossed[step:end] = sum(count[1] for count in counts)
        encoder.add(delta)
        previous = block[-1].copy()
        if end == min(chunk_start + rows, n_steps):
            if end - chunk_start < rows:  # edge chunk: stored full size, zero padded
                encoder.add(np.zeros((rows - (end - chunk_start)) * row_elements, dtype))
            write_chunk(target, chunk_start, b"".join(encoder.finish()))
    create_checked_array(out, COUNTS[0], moves)
    create_checked_array(out, COUNTS[1], crossed)
    summary = {
        "first_step": 1,
        "last_step": n_steps - 1,
        "dtype": dtype.name,
        "elements": row_elements,
        "moves": int(moves.sum()),
        "crossed_binade_moves": int(crossed.sum()),
        "crossed_binade_fraction": float(crossed.sum() / moves.sum()) if moves.sum() else 0.0,
        "source_storage": source.attrs.get("storage_dtype"),
        "exact": source.attrs.get("storage_dtype") != "float16",
    }
    target.attrs.update(summary)
    target.attrs["description"] = (f"signed {lattice.label} lattice steps of {name} from step t-1 to t, indexed by t; "
                                   "row 0 is 0 (no step before t = 0)")
    return summary
