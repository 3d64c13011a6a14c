"""The bf16 lattice: exact displacement ΔW′ in integer lattice steps.

Every finite bf16 value has an ordinal: its position on the lattice of
representable values, counted from zero (sign-magnitude bits -> ±magnitude
index, with +0 and -0 both at 0). Consecutive finite values have consecutive
ordinals, across binade edges and through zero, so

    ΔW′[t] = ordinal(W[t]) - ordinal(W[t-1])

is the signed number of representable values walked: an integer by
construction. Within one binade it equals ΔW / ulp(W[t-1]) exactly; when a
move crosses into another binade the spacing changes and ΔW / ulp is not an
integer, while the step count still is.
"""

from __future__ import annotations

import logging

import numpy as np

from thimble.bf16 import BFLOAT16
from thimble.errors import DataError

log = logging.getLogger(__name__)

SIGN_BIT = np.uint16(0x8000)
MAGNITUDE_BITS = np.uint16(0x7FFF)
#: magnitudes at or above this are Inf (0x7F80) or NaN
NONFINITE_MAGNITUDE = 0x7F80
EXPONENT_SHIFT = 7


class NonFiniteError(DataError, ValueError):
    """W holds NaN or Inf; the message names the step and element."""


def as_bits(values: np.ndarray) -> np.ndarray:
    """bf16 values (ml_dtypes) or their uint16 patterns, as uint16 patterns."""
    if values.dtype == BFLOAT16:
        return values.view(np.uint16)
    if values.dtype == np.uint16:
        return values
    raise TypeError(f"expected bfloat16 values or uint16 bit patterns, got {values.dtype}")


def check_finite(bits: np.ndarray, first_step: int = 0) -> None:
    """Raise NonFiniteError naming the first NaN/Inf as (step, row, column)."""
    bad = (bits & MAGNITUDE_BITS) >= NONFINITE_MAGNITUDE
    if bad.any():
        where = np.unravel_index(int(np.flatnonzero(bad.reshape(-1))[0]), bits.shape)
        value = float(bits[where].view(BFLOAT16))
        location = (where[0] + first_step, *where[1:]) if bits.ndim >= 1 else where
        raise NonFiniteError(f"W is {value} at step {location[0]}, element {tuple(int(i) for i in location[1:])}: "
                             "the lattice displacement is undefined for NaN and Inf")


def ordinal(values: np.ndarray) -> np.ndarray:
    """Signed lattice ordinal (int32) of finite bf16 values; ±0 map to 0."""
    bits = as_bits(values)
    magnitude = (bits & MAGNITUDE_BITS).astype(np.int32)
    return np.where(bits & SIGN_BIT, -magnitude, magnitude)


def from_ordinal(ordinals: np.ndarray) -> np.ndarray:
    """The bf16 value (+0 for 0) at each signed ordinal."""
    ordinals = np.asarray(ordinals, dtype=np.int32)
    bits = np.abs(ordinals).astype(np.uint16) | np.where(ordinals < 0, SIGN_BIT, np.uint16(0))
    return bits.astype(np.uint16).view(BFLOAT16)


def delta_w_lattice(w_before: np.ndarray, w_after: np.ndarray) -> np.ndarray:
    """ΔW′: signed lattice steps from ``w_before`` to ``w_after`` (int32, exact)."""
    return ordinal(w_after) - ordinal(w_before)


def delta_w_lattice_series(w_steps: np.ndarray, w_previous: np.ndarray | None = None,
                           first_step: int = 0) -> np.ndarray:
    """ΔW′ for consecutive rows of ``w_steps`` (T, ...), optionally continuing from ``w_previous``.

    With ``w_previous`` (the row before the first), the result has T rows;
    without, T - 1. Raises NonFiniteError for NaN/Inf, naming the step.
    """
    bits = as_bits(w_steps)
    check_finite(bits, first_step)
    ordinals = ordinal(bits)
    if w_previous is None:
        return np.diff(ordinals, axis=0)
    previous = as_bits(w_previous)
    check_finite(previous[None], first_step - 1)
    return np.diff(np.concatenate([ordinal(previous)[None], ordinals]), axis=0)


def exponent(values: np.ndarray) -> np.ndarray:
    """The biased exponent field (0 for zeros and subnormals)."""
    return ((as_bits(values) & MAGNITUDE_BITS) >> EXPONENT_SHIFT).astype(np.int16)


def crossed_binade(w_before: np.ndarray, w_after: np.ndarray) -> np.ndarray:
    """True where a move (ΔW′ ≠ 0) left its binade: a different exponent field or sign."""
    before, after = as_bits(w_before), as_bits(w_after)
    moved = ordinal(before) != ordinal(after)
    same = (exponent(before) == exponent(after)) & ((before & SIGN_BIT) == (after & SIGN_BIT))
    return moved & ~same


def ulp(values: np.ndarray, dtype=np.float64) -> np.ndarray:
    """The lattice spacing within x's binade: 2**(e - 127 - 7), and 2**-133 for zero and subnormals
    (exact in float64 and float32)."""
    field = exponent(values).astype(np.int32)
    return np.ldexp(dtype(1), np.maximum(field, 1) - 127 - 7).astype(dtype, copy=False)


def spacing_toward(values: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Distance (float64) from each value to its lattice neighbour in ``direction`` (sign; 0 -> upward).

    Below a power of two the spacing is half the one above, so this is not ulp(x) for downward
    moves from a binade's bottom.
    """
    here = ordinal(values)
    step = np.where(np.asarray(direction) < 0, -1, 1).astype(np.int32)
    neighbour = from_ordinal(here + step).astype(np.float64)
    return np.abs(neighbour - as_bits(values).view(BFLOAT16).astype(np.float64))


#: rows of W turned into ΔW′ at a time (bounds the temporaries)
BLOCK_ROWS = 32


def _block_delta(bits: np.ndarray, previous: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """ΔW′ of ``bits`` (rows, n) after the row ``previous`` (n,) into ``out``; (moves, crossed) per row,
    or None when a step count does not fit ``out``'s integer type.

    Raises NonFiniteError without a location (the caller names it).
    """
    both = np.concatenate([previous[None], bits])
    if (both & MAGNITUDE_BITS).max() >= NONFINITE_MAGNITUDE:
        raise NonFiniteError("W holds NaN or Inf")
    signed = ordinal(both)
    delta = np.subtract(signed[1:], signed[:-1])
    info = np.iinfo(out.dtype)
    if delta.min() < info.min or delta.max() > info.max:
        return None
    out[...] = delta
    binade = both >> EXPONENT_SHIFT  # sign and exponent field
    moved = delta != 0
    crossed = moved & (binade[1:] != binade[:-1])
    return np.count_nonzero(moved, axis=1), np.count_nonzero(crossed, axis=1)


def write_delta_w_lattice(recording: str, output: str, level: int = 2, threads: int = 1) -> dict:
    """ΔW′ of a rechunked recording, indexed by step (row 0 is 0: nothing moves before t = 0).

    Stored as int16 when every step count fits (checked), else int32, in chunks
    of the recording's steps per chunk, zstd-compressed. Per-step counts of
    moves and binade crossings go alongside. Returns the summary attributes.
    W is decoded from its stored chunks block by block, so memory stays near
    half a chunk of W plus the compressed output.
    """
    from thimble.files import atomic_output
    from thimble.recording_format import open_h5
    from thimble.workers import WorkerPool

    with open_h5(recording) as source, WorkerPool(threads) as pool, atomic_output(output) as tmp:
        if source.attrs.get("storage_dtype") == "float16":
            log.warning("%s stores float16 (record.dtype float16): ΔW′ is of the stored values read back as bf16, "
                        "not exact where float16 altered W", recording)
        summary = _write_delta(source, recording, tmp, np.dtype(np.int16), level, pool)
        if summary is None:  # a step count beyond int16: walk W again into int32, which holds every one
            summary = _write_delta(source, recording, tmp, np.dtype(np.int32), level, pool)
    return summary


def _write_delta(source, recording: str, path, dtype: np.dtype, level: int, pool) -> dict | None:
    """Write ΔW′ of ``source``'s W (the file ``recording``) as ``dtype`` to ``path``; None (and a file to discard) when a step
    count does not fit ``dtype``."""
    import h5py
    from tqdm.auto import tqdm

    from thimble.codec import CHUNK_CHECKSUM, FrameEncoder, window_log_for, write_chunk, zstd_dcpl
    from thimble.h5_datasets import create_dataset
    from thimble.recording_format import create_checked_array
    from thimble.recording_reader import recorded_blocks
    from thimble.workers import thread_spans

    w = source["W"]
    rows, (n_steps, *row_shape) = w.chunks[0], w.shape
    row_elements = int(np.prod(row_shape))
    moves, crossed = np.zeros(n_steps, np.int64), np.zeros(n_steps, np.int64)
    # columns split across threads: numpy releases the GIL in its loops
    spans = thread_spans(row_elements, pool.threads)
    with h5py.File(path, "w") as out:
        # zstd only, no shuffle: rows decode in order, and small integers compress well anyway
        target = create_dataset(out, "delta_w_lattice", h5py.h5t.py_create(dtype), w.shape,
                                zstd_dcpl(w.chunks, level, shuffle=False))
        previous = encoder = None
        for step, block in tqdm(recorded_blocks(source, "W", BLOCK_ROWS), desc="ΔW′", unit="block",
                                mininterval=5):
            block = block.reshape(len(block), row_elements)
            chunk_start, end = step - step % rows, step + len(block)
            if step == chunk_start:
                # unshuffled: the previous step of an element lies a row of integers back
                encoder = FrameEncoder(rows * row_elements * dtype.itemsize, level, pool.threads,
                                       window_log_for(row_elements * dtype.itemsize, level))
            if previous is None:  # step 0: nothing moved before it
                previous = block[0].copy()
            delta = np.empty(block.shape, dtype)
            futures = [pool.submit(_block_delta, block[:, a:b], previous[a:b], delta[:, a:b]) for a, b in spans]
            try:
                counts = [future.result() for future in futures]
            except NonFiniteError:
                check_finite(np.concatenate([previous[None], block]).reshape(-1, *row_shape), first_step=step - 1)
                raise  # check_finite raised, naming the step and element
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
        create_checked_array(out, "moves_per_step", moves)
        create_checked_array(out, "crossed_binade_per_step", crossed)
        summary = {
            "first_step": 1,
            "last_step": n_steps - 1,
            "dtype": dtype.name,
            "moves": int(moves.sum()),
            "crossed_binade_moves": int(crossed.sum()),
            "crossed_binade_fraction": float(crossed.sum() / moves.sum()) if moves.sum() else 0.0,
            "source_storage": source.attrs.get("storage_dtype"),
            "exact": source.attrs.get("storage_dtype") != "float16",
        }
        target.attrs.update(summary)
        target.attrs["description"] = ("signed bf16 lattice steps from W[t-1] to W[t], indexed by t; "
                                       "row 0 is 0 (no step before t = 0)")
        out.attrs.update({key: value for key, value in source.attrs.items() if key not in ("sha256", "steps_per_chunk")})
        out.attrs["source"] = str(recording)
        out.attrs["chunk_checksum"] = CHUNK_CHECKSUM
    return summary
