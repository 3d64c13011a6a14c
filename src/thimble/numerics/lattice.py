"""The lattices of bf16, float16 and float32: exact displacement ΔW′ in integer lattice steps.

Every finite value of a binary float type has an ordinal: its position on the lattice of
representable values, counted from zero (sign-magnitude bits -> ±magnitude
index, with +0 and -0 both at 0). Consecutive finite values have consecutive
ordinals, across binade edges and through zero, so

    ΔW′[t] = ordinal(W[t]) - ordinal(W[t-1])

is the signed number of representable values walked: an integer by
construction. Within one binade it equals ΔW / ulp(W[t-1]) exactly; when a
move crosses into another binade the spacing changes and ΔW / ulp is not an
integer, while the step count still is.

The construction is the same for every IEEE-style binary type, over its own bit patterns: a tensor is counted
in its own lattice (``Lattice``: bf16's, float16's or float32's), so a float32 parameter's ΔW′ is in float32
ULPs. The functions take the lattice as ``lattice`` and default to bf16's, the seed's; the module's constants
are bf16's.
"""

from __future__ import annotations

import dataclasses

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


@dataclasses.dataclass(frozen=True)
class Lattice:
    """A binary float type's lattice: its bit patterns' layout (a sign bit, ``exponent_width`` exponent bits,
    ``mantissa_width`` mantissa bits) and the integer types its patterns and ordinals are held in."""

    name: str               # the stored dtype's name (thimble.record.format.TENSOR_DTYPES)
    label: str              # how texts name it
    values: np.dtype        # the numpy dtype of its values (ml_dtypes.bfloat16 for bf16)
    bits: np.dtype          # the unsigned integer type of its patterns
    mantissa_width: int
    exponent_width: int
    #: ordinals and their differences: int32 holds every 16-bit lattice's (±2^15 each); float32's ordinals
    #: (±0x7F800000) fit int32 but two of them differ by up to 2^32, which needs int64
    ordinal_dtype: np.dtype

    @property
    def sign_bit(self):
        return self.bits.type(1 << (8 * self.bits.itemsize - 1))

    @property
    def magnitude_bits(self):
        return self.bits.type((1 << (8 * self.bits.itemsize - 1)) - 1)

    @property
    def mantissa_bits(self):
        return self.bits.type((1 << self.mantissa_width) - 1)

    @property
    def exponent_shift(self) -> int:
        return self.mantissa_width

    @property
    def exponent_bias(self) -> int:
        return (1 << (self.exponent_width - 1)) - 1

    @property
    def exponent_fields(self) -> int:
        """How many biased exponent fields there are (the last is Inf and NaN's)."""
        return 1 << self.exponent_width

    @property
    def nonfinite_magnitude(self) -> int:
        """Magnitudes at or above this are Inf or NaN: the all-ones exponent field."""
        return ((1 << self.exponent_width) - 1) << self.mantissa_width


BF16_LATTICE = Lattice("bfloat16", "bf16", BFLOAT16, np.dtype(np.uint16), 7, 8, np.dtype(np.int32))
FLOAT16_LATTICE = Lattice("float16", "float16", np.dtype(np.float16), np.dtype(np.uint16), 10, 5, np.dtype(np.int32))
FLOAT32_LATTICE = Lattice("float32", "float32", np.dtype(np.float32), np.dtype(np.uint32), 23, 8, np.dtype(np.int64))
#: each lattice by its stored dtype's name
LATTICES = {lattice.name: lattice for lattice in (BF16_LATTICE, FLOAT16_LATTICE, FLOAT32_LATTICE)}


def lattice_named(dtype: str) -> Lattice:
    """The lattice of a stored dtype (``bfloat16``, ``float16``, ``float32``)."""
    if dtype not in LATTICES:
        raise ValueError(f"no lattice for dtype {dtype!r}; thimble counts lattice steps of {', '.join(LATTICES)}")
    return LATTICES[dtype]


class NonFiniteError(DataError, ValueError):
    """W holds NaN or Inf; the message names the step and element."""


def as_bits(values: np.ndarray, lattice: Lattice = BF16_LATTICE) -> np.ndarray:
    """Values of the lattice's type (bf16 as ml_dtypes) or their bit patterns, as bit patterns."""
    if values.dtype == lattice.values:
        return values.view(lattice.bits)
    if values.dtype == lattice.bits:
        return values
    raise TypeError(f"expected {lattice.name} values or {lattice.bits} bit patterns, got {values.dtype}")


def check_finite(bits: np.ndarray, first_step: int = 0, name: str = "W", lattice: Lattice = BF16_LATTICE) -> None:
    """Raise NonFiniteError naming the first NaN/Inf of tensor ``name`` as (step, row, column)."""
    bad = (bits & lattice.magnitude_bits) >= lattice.nonfinite_magnitude
    if bad.any():
        where = np.unravel_index(int(np.flatnonzero(bad.reshape(-1))[0]), bits.shape)
        value = float(bits[where].view(lattice.values))
        location = (where[0] + first_step, *where[1:]) if bits.ndim >= 1 else where
        raise NonFiniteError(f"{name} is {value} at step {location[0]}, element {tuple(int(i) for i in location[1:])}: "
                             "the lattice displacement is undefined for NaN and Inf")


def ordinal(values: np.ndarray, lattice: Lattice = BF16_LATTICE) -> np.ndarray:
    """Signed lattice ordinal (the lattice's ``ordinal_dtype``: int32 for bf16) of finite values; ±0 map to 0."""
    bits = as_bits(values, lattice)
    magnitude = (bits & lattice.magnitude_bits).astype(lattice.ordinal_dtype)
    return np.where(bits & lattice.sign_bit, -magnitude, magnitude)


def from_ordinal(ordinals: np.ndarray, lattice: Lattice = BF16_LATTICE) -> np.ndarray:
    """The value (+0 for 0) at each signed ordinal."""
    ordinals = np.asarray(ordinals, dtype=lattice.ordinal_dtype)
    bits = np.abs(ordinals).astype(lattice.bits) | np.where(ordinals < 0, lattice.sign_bit, lattice.bits.type(0))
    return bits.astype(lattice.bits).view(lattice.values)


def delta_w_lattice(w_before: np.ndarray, w_after: np.ndarray, lattice: Lattice = BF16_LATTICE) -> np.ndarray:
    """ΔW′: signed lattice steps from ``w_before`` to ``w_after`` (the lattice's ordinal dtype, exact)."""
    return ordinal(w_after, lattice) - ordinal(w_before, lattice)


def delta_w_lattice_series(w_steps: np.ndarray, w_previous: np.ndarray | None = None,
                           first_step: int = 0, lattice: Lattice = BF16_LATTICE) -> np.ndarray:
    """ΔW′ for consecutive rows of ``w_steps`` (T, ...), optionally continuing from ``w_previous``.

    With ``w_previous`` (the row before the first), the result has T rows;
    without, T - 1. Raises NonFiniteError for NaN/Inf, naming the step.
    """
    bits = as_bits(w_steps, lattice)
    check_finite(bits, first_step, lattice=lattice)
    ordinals = ordinal(bits, lattice)
    if w_previous is None:
        return np.diff(ordinals, axis=0)
    previous = as_bits(w_previous, lattice)
    check_finite(previous[None], first_step - 1, lattice=lattice)
    return np.diff(np.concatenate([ordinal(previous, lattice)[None], ordinals]), axis=0)


def exponent(values: np.ndarray, lattice: Lattice = BF16_LATTICE) -> np.ndarray:
    """The biased exponent field (0 for zeros and subnormals)."""
    return ((as_bits(values, lattice) & lattice.magnitude_bits) >> lattice.exponent_shift).astype(np.int16)


def crossed_binade(w_before: np.ndarray, w_after: np.ndarray, lattice: Lattice = BF16_LATTICE) -> np.ndarray:
    """True where a move (ΔW′ ≠ 0) left its binade: a different exponent field or sign."""
    before, after = as_bits(w_before, lattice), as_bits(w_after, lattice)
    moved = ordinal(before, lattice) != ordinal(after, lattice)
    same = (exponent(before, lattice) == exponent(after, lattice)) \
        & ((before & lattice.sign_bit) == (after & lattice.sign_bit))
    return moved & ~same


def ulp(values: np.ndarray, dtype=np.float64, lattice: Lattice = BF16_LATTICE) -> np.ndarray:
    """The lattice spacing within x's binade: 2**(e - bias - mantissa bits), for bf16 2**(e - 127 - 7), and for
    zero and subnormals the spacing of the first normal binade (bf16 2**-133; exact in float64, and in float32
    for bf16, float16 and float32)."""
    field = exponent(values, lattice).astype(np.int32)
    return np.ldexp(dtype(1), np.maximum(field, 1) - lattice.exponent_bias - lattice.exponent_shift).astype(
        dtype, copy=False)


def spacing_toward(values: np.ndarray, direction: np.ndarray, lattice: Lattice = BF16_LATTICE) -> np.ndarray:
    """Distance (float64) from each value to its lattice neighbour in ``direction`` (sign; 0 -> upward).

    Below a power of two the spacing is half the one above, so this is not ulp(x) for downward
    moves from a binade's bottom.
    """
    here = ordinal(values, lattice)
    step = np.where(np.asarray(direction) < 0, -1, 1).astype(lattice.ordinal_dtype)
    neighbour = from_ordinal(here + step, lattice).astype(np.float64)
    return np.abs(neighbour - as_bits(values, lattice).view(lattice.values).astype(np.float64))


def half_spacing_exponent(w_bits: np.ndarray, downward: np.ndarray, lattice: Lattice = BF16_LATTICE) -> np.ndarray:
    """log2 of half the lattice spacing from w (bit patterns) towards the move (int16); spacings are powers
    of two.

    Away from zero it is the spacing of w's binade, for bf16 2**(e - 134) (e the biased exponent field, 1 for
    zero and subnormals); towards zero from a binade's bottom (a zero mantissa) it is half that.
    """
    magnitude = w_bits & lattice.magnitude_bits
    field = np.maximum(magnitude >> lattice.exponent_shift, lattice.bits.type(1)).astype(np.int16)
    negative = w_bits >= lattice.sign_bit
    towards_zero = (magnitude != 0) & (downward != negative)
    # a zero mantissa above the subnormals' binades: the binade below is twice as fine
    finer = towards_zero & ((magnitude & lattice.mantissa_bits) == 0) \
        & (magnitude >= lattice.bits.type(2 << lattice.exponent_shift))
    field -= finer
    field -= lattice.exponent_bias + lattice.exponent_shift + 1  # half a spacing: for bf16 2**(e - 127 - 7 - 1)
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
