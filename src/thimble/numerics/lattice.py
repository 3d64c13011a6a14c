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
