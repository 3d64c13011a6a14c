"""ΔW′ in float16's and float32's own lattices, against oracles: every float16 value enumerated (as the bf16 tests
do), float32 walked with numpy.nextafter from random and edge values."""

import numpy as np
import pytest

from thimble.numerics.lattice import (
    BF16_LATTICE,
    FLOAT16_LATTICE,
    FLOAT32_LATTICE,
    NonFiniteError,
    crossed_binade,
    delta_w_lattice,
    delta_w_lattice_series,
    exponent,
    from_ordinal,
    half_spacing_exponent,
    lattice_named,
    ordinal,
    spacing_toward,
    ulp,
)

F16 = FLOAT16_LATTICE
F32 = FLOAT32_LATTICE

ALL16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
FINITE16 = ALL16[np.isfinite(ALL16)]
#: float16's lattice: its distinct finite values in increasing order (+0 and -0 are one point)
LATTICE16 = np.unique(FINITE16.astype(np.float64))


def test_the_lattices_layouts_are_the_types_own():
    assert (F16.exponent_bias, F16.exponent_shift, int(F16.nonfinite_magnitude)) == (15, 10, 0x7C00)
    assert (F32.exponent_bias, F32.exponent_shift, int(F32.nonfinite_magnitude)) == (127, 23, 0x7F800000)
    assert (int(F32.sign_bit), int(F32.magnitude_bits), int(F32.mantissa_bits)) == (0x80000000, 0x7FFFFFFF, 0x7FFFFF)
    assert (int(BF16_LATTICE.nonfinite_magnitude), BF16_LATTICE.exponent_fields) == (0x7F80, 256)
    assert F16.exponent_fields == 32 and F32.exponent_fields == 256
    assert lattice_named("float32") is F32 and lattice_named("float16") is F16
    with pytest.raises(ValueError, match="no lattice for dtype 'int8'"):
        lattice_named("int8")


# -- float16: every value -----------------------------------------------------------------------------------

def test_float16_ordinal_is_the_position_on_the_lattice_for_all_65536_patterns():
    zero = np.searchsorted(LATTICE16, 0.0)
    expected = np.searchsorted(LATTICE16, FINITE16.astype(np.float64)) - zero
    got = ordinal(FINITE16, F16)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)
    assert ordinal(np.array([0x8000], np.uint16), F16).item() == 0 == ordinal(np.array([0], np.uint16), F16).item()
    np.testing.assert_array_equal(from_ordinal(got, F16).astype(np.float64), FINITE16.astype(np.float64))


def oracle16(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Representable float16 values walked from a to b: their positions on the sorted lattice, subtracted."""
    index = lambda x: np.searchsorted(LATTICE16, x.astype(np.float64))  # noqa: E731
    return index(b) - index(a)


def pairs16():
    rng = np.random.default_rng(1)
    neighbours = np.stack([LATTICE16[:-1], LATTICE16[1:]], axis=1)
    powers = LATTICE16[(LATTICE16 > 0) & (np.frexp(LATTICE16)[0] == 0.5)]
    below = LATTICE16[np.searchsorted(LATTICE16, powers) - 1]
    tiny = LATTICE16[np.abs(LATTICE16) < 2.0**-13]  # subnormals and the first normals, through zero
    edges = np.concatenate([np.stack([powers, below], axis=1), np.stack([-powers, -below], axis=1),
                            np.stack([below[:-1], 2 * powers[:-1]], axis=1)])
    both = np.concatenate([neighbours, edges, np.stack(np.meshgrid(tiny[::5], tiny[::7]), axis=-1).reshape(-1, 2),
                           rng.choice(LATTICE16, size=(100_000, 2)),
                           [[0.0, -0.0], [LATTICE16[0], LATTICE16[-1]]]])
    both = np.concatenate([both, both[:, ::-1]])
    return both[:, 0].astype(np.float16), both[:, 1].astype(np.float16)


def test_float16_delta_w_counts_the_values_walked_and_equals_delta_over_ulp_within_a_binade():
    a, b = pairs16()
    steps = delta_w_lattice(a, b, F16)
    np.testing.assert_array_equal(steps, oracle16(a, b))
    ratio = (b.astype(np.float64) - a.astype(np.float64)) / ulp(a, lattice=F16)
    same = ~crossed_binade(a, b, F16)
    np.testing.assert_array_equal(ratio[same], steps[same])
    assert (~same).sum() > 1000


def test_float16_spacings_against_nextafter_for_every_value():
    x = FINITE16[np.abs(FINITE16) < np.finfo(np.float16).max]
    up = np.nextafter(x, np.float16(np.inf))
    down = np.nextafter(x, np.float16(-np.inf))
    np.testing.assert_array_equal(ordinal(up, F16) - ordinal(x, F16), 1)
    np.testing.assert_array_equal(ordinal(x, F16) - ordinal(down, F16), 1)
    np.testing.assert_array_equal(spacing_toward(x, np.ones(x.size), F16), up.astype(np.float64) - x)
    np.testing.assert_array_equal(spacing_toward(x, -np.ones(x.size), F16), x.astype(np.float64) - down)
    positive = x[x > 0]
    np.testing.assert_array_equal(ulp(positive, lattice=F16),
                                  np.nextafter(positive, np.float16(np.inf)).astype(np.float64) - positive)
    for downward, neighbour in ((True, down), (False, up)):
        half = np.ldexp(1.0, half_spacing_exponent(x.view(np.uint16), np.full(x.size, downward), F16))
        np.testing.assert_array_equal(half, np.abs(neighbour.astype(np.float64) - x) / 2)
    # the exponent field is frexp's, biased, for normal values
    normal = positive[positive >= np.finfo(np.float16).tiny]
    np.testing.assert_array_equal(exponent(normal, F16), np.frexp(normal.astype(np.float64))[1] - 1 + 15)


# -- float32: nextafter walks from random and edge values ---------------------------------------------------

def edge32() -> np.ndarray:
    info = np.finfo(np.float32)
    powers = np.ldexp(np.float32(1), np.arange(-149, 128)).astype(np.float32)
    around = np.concatenate([powers, np.nextafter(powers, np.float32(np.inf)),
                             np.nextafter(powers, np.float32(0))])
    values = np.concatenate([[0.0, info.smallest_subnormal, info.smallest_normal,
                              np.nextafter(info.smallest_normal, np.float32(0)), info.max,
                              np.nextafter(info.max, np.float32(0)), 1.0, 3.0, 0.1], around]).astype(np.float32)
    return np.concatenate([values, -values, [np.float32(-0.0)]]).astype(np.float32)


def random32(n: int, seed: int = 2) -> np.ndarray:
    bits = np.random.default_rng(seed).integers(0, 1 << 32, size=n, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    return values[np.isfinite(values)]


def walked(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Each x moved |k| representable float32 values up (k > 0) or down, by nextafter one value at a time."""
    y = x.copy()
    for i in range(int(np.abs(k).max())):
        moving = np.abs(k) > i
        y[moving] = np.nextafter(y[moving], np.where(k[moving] > 0, np.float32(np.inf), np.float32(-np.inf)))
    return y


def test_float32_neighbours_are_one_ordinal_apart_for_random_and_edge_values():
    x = np.concatenate([edge32(), random32(200_000)])
    with np.errstate(over="ignore"):  # past ±max lies ±inf, as intended
        up = np.nextafter(x, np.float32(np.inf))
        down = np.nextafter(x, np.float32(-np.inf))
    ordinals = ordinal(x, F32)
    assert ordinals.dtype == np.int64
    # past the largest finite value lies infinity, the next pattern: its ordinal follows too
    np.testing.assert_array_equal(ordinal(up, F32) - ordinals, 1)
    np.testing.assert_array_equal(ordinals - ordinal(down, F32), 1)
    assert ordinal(np.float32([-0.0]), F32)[0] == 0 == ordinal(np.float32([0.0]), F32)[0]
    np.testing.assert_array_equal(from_ordinal(ordinals, F32), np.where(x == 0, np.float32(0), x))


def test_float32_ordinals_order_as_the_values_do():
    x = np.concatenate([edge32(), random32(100_000, seed=3)])
    order = np.argsort(x.astype(np.float64), kind="stable")
    values, ordinals = x[order].astype(np.float64), ordinal(x[order], F32)
    np.testing.assert_array_equal(np.sign(np.diff(ordinals)), np.sign(np.diff(values)))


def test_float32_delta_w_is_the_number_of_nextafter_steps_walked():
    rng = np.random.default_rng(4)
    x = np.concatenate([edge32(), random32(20_000, seed=5)])
    x = x[np.abs(x) < np.nextafter(np.finfo(np.float32).max, np.float32(0)) / 2]
    k = rng.integers(-300, 301, size=x.size)
    y = walked(x, k)
    steps = delta_w_lattice(x, y, F32)
    np.testing.assert_array_equal(steps, k)
    series = delta_w_lattice_series(np.stack([x, y, x]), lattice=F32)
    np.testing.assert_array_equal(series, np.stack([k, -k]))
    ratio = (y.astype(np.float64) - x.astype(np.float64)) / ulp(x, lattice=F32)
    same = ~crossed_binade(x, y, F32)
    np.testing.assert_array_equal(ratio[same], k[same])


def test_float32_step_counts_beyond_int32_are_held_exactly():
    top = np.float32([np.finfo(np.float32).max])
    steps = delta_w_lattice(-top, top, F32)
    assert steps.dtype == np.int64 and steps[0] == 2 * 0x7F7FFFFF > np.iinfo(np.int32).max


def test_float32_spacings_against_nextafter():
    x = np.concatenate([edge32(), random32(100_000, seed=6)])
    x = x[np.abs(x) < np.finfo(np.float32).max]
    up = np.nextafter(x, np.float32(np.inf)).astype(np.float64)
    down = np.nextafter(x, np.float32(-np.inf)).astype(np.float64)
    np.testing.assert_array_equal(spacing_toward(x, np.ones(x.size), F32), up - x)
    np.testing.assert_array_equal(spacing_toward(x, -np.ones(x.size), F32), x - down)
    positive = x[x > 0]
    np.testing.assert_array_equal(ulp(positive, lattice=F32),
                                  np.nextafter(positive, np.float32(np.inf)).astype(np.float64) - positive)
    assert ulp(np.float32([0.0]), np.float32, F32)[0] == np.finfo(np.float32).smallest_subnormal
    for downward, neighbour in ((True, down), (False, up)):
        half = np.ldexp(1.0, half_spacing_exponent(x.view(np.uint32), np.full(x.size, downward), F32))
        np.testing.assert_array_equal(half, np.abs(neighbour - x) / 2)


def test_non_finite_values_are_named_in_their_own_type():
    w = np.float32([[1.0, 2.0], [1.0, np.inf]])
    with pytest.raises(NonFiniteError, match=r"W is inf at step 4, element \(1,\)"):
        delta_w_lattice_series(w, first_step=3, lattice=F32)
    w16 = np.float16([[1.0, np.nan]])
    with pytest.raises(NonFiniteError, match="W is nan at step 0"):
        delta_w_lattice_series(w16, lattice=F16)
    with pytest.raises(TypeError, match="expected float32 values or uint32 bit patterns"):
        ordinal(np.float16([1.0]), F32)
