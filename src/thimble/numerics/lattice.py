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

import numpy as np

from thimble.errors import DataError
from thimble.numerics.bf16 import BFLOAT16

SIGN_BIT = np.uint16(0x8000)
MAGNITUDE_BITS = np.uint16(0x7FFF)
#: magnitudes at or above this are Inf (0x7F80) or NaN
NONFINITE_MAGNITUDE = 0x7F80
#: the mantissa's bits, below the exponent field
MANTISSA_BITS = np.uint16(0x7F)
EXPONENT_SHIFT = 7
#: a normal value is ±2^(field − EXPONENT_BIAS) times its mantissa, field the biased exponent field
EXPONENT_BIAS = 127


class NonFiniteError(DataError, ValueError):
    """W holds NaN or Inf; the message names the step and element."""


def as_bits(values: np.ndarray) -> np.ndarray:
    """bf16 values (ml_dtypes) or their uint16 patterns, as uint16 patterns."""
    if values.dtype == BFLOAT16:
        return values.view(np.uint16)
    if values.dtype == np.uint16:
        return values
    raise TypeError(f"expected bfloat16 values or uint16 bit patterns, got {values.dtype}")


def check_finite(bits: np.ndarray, first_step: int = 0, name: str = "W") -> None:
    """Raise NonFiniteError naming the first NaN/Inf of tensor ``name`` as (step, row, column)."""
    bad = (bits & MAGNITUDE_BITS) >= NONFINITE_MAGNITUDE
    if bad.any():
        where = np.unravel_index(int(np.flatnonzero(bad.reshape(-1))[0]), bits.shape)
        value = float(bits[where].view(BFLOAT16))
        location = (where[0] + first_step, *where[1:]) if bits.ndim >= 1 else where
        raise NonFiniteError(f"{name} is {value} at step {location[0]}, element {tuple(int(i) for i in location[1:])}: "
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
    return np.ldexp(dtype(1), np.maximum(field, 1) - EXPONENT_BIAS - EXPONENT_SHIFT).astype(dtype, copy=False)


def spacing_toward(values: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Distance (float64) from each value to its lattice neighbour in ``direction`` (sign; 0 -> upward).

    Below a power of two the spacing is half the one above, so this is not ulp(x) for downward
    moves from a binade's bottom.
    """
    here = ordinal(values)
    step = np.where(np.asarray(direction) < 0, -1, 1).astype(np.int32)
    neighbour = from_ordinal(here + step).astype(np.float64)
    return np.abs(neighbour - as_bits(values).view(BFLOAT16).astype(np.float64))


def half_spacing_exponent(w_bits: np.ndarray, downward: np.ndarray) -> np.ndarray:
    """log2 of half the lattice spacing from w (bf16 bit patterns) towards the move (int16); spacings
    are powers of two.

    Away from zero it is the spacing of w's binade, 2**(e - 134) (e the biased exponent field, 1 for
    zero and subnormals); towards zero from a binade's bottom (a zero mantissa) it is half that.
    """
    magnitude = w_bits & MAGNITUDE_BITS
    field = np.maximum(magnitude >> EXPONENT_SHIFT, np.uint16(1)).astype(np.int16)
    negative = w_bits >= SIGN_BIT
    towards_zero = (magnitude != 0) & (downward != negative)
    # a zero mantissa above the subnormals' binades: the binade below is twice as fine
    finer = towards_zero & ((magnitude & MANTISSA_BITS) == 0) & (magnitude >= np.uint16(2 << EXPONENT_SHIFT))
    field -= finer
    field -= EXPONENT_BIAS + EXPONENT_SHIFT + 1  # half a spacing: 2**(e - 127 - 7 - 1)
    return field


def log2_ratio_floor(w_bits: np.ndarray, pre_rounding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """floor(log2(update_ratio)) (int16, clipped to [-200, 200]: -200 where the update is 0, 200 past
    float32's range) and where the ratio is exactly 1 (a tie), from the float32 update's exponent
    bits and the bf16 weight's: the fast, exact form of ``update_ratio`` for histograms.

    ``pre_rounding - w`` is exact in float32 whenever the update is smaller than w (Sterbenz); a larger
    one has a ratio of at least 2**8, the histogram's last bin, where rounding cannot change the bin.
    """
    update = pre_rounding - (w_bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    bits = update.view(np.uint32)
    field = ((bits >> np.uint32(23)) & np.uint32(0xFF)).astype(np.int16)
    mantissa_zero = (bits & np.uint32(0x7FFFFF)) == 0
    floor = field - 127  # floor(log2 |update|) of a normal float32
    subnormal = np.flatnonzero((field == 0) & ~mantissa_zero)
    if subnormal.size:  # below 2**-126: rare, and exact through frexp
        fraction, exponent = np.frexp(update.reshape(-1)[subnormal])
        floor.reshape(-1)[subnormal] = exponent - 1
        mantissa_zero.reshape(-1)[subnormal] = np.abs(fraction) == 0.5
    floor -= half_spacing_exponent(w_bits, bits >= np.uint32(0x80000000))
    np.clip(floor, -199, 199, out=floor)
    floor[update == 0] = -200
    floor[field == 255] = 200
    return floor, mantissa_zero & (floor == 0)


def stays_from_ratio(w_bits: np.ndarray, log2_floor: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """``stays_put`` from the ratio's exponent: below half a spacing, or exactly half with an even w."""
    return (log2_floor < 0) | (tie & ((w_bits & np.uint16(1)) == 0))
