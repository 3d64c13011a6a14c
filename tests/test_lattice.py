"""ΔW′ against an oracle that enumerates every bf16 value."""

import numpy as np
import pytest

from thimble.numerics.bf16 import BFLOAT16, all_bfloat16
from thimble.numerics.lattice import (NonFiniteError, crossed_binade, delta_w_lattice, delta_w_lattice_series, from_ordinal,
                             ordinal, spacing_toward, ulp)

ALL = all_bfloat16()
FINITE = ALL[np.isfinite(ALL.astype(np.float32))]
# the lattice: distinct finite values in increasing order (+0 and -0 are one point)
LATTICE = np.unique(FINITE.astype(np.float64))


def oracle_steps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Representable values walked from a to b: difference of positions on the sorted lattice."""
    index = lambda x: np.searchsorted(LATTICE, x.astype(np.float64))  # noqa: E731
    position_a, position_b = index(a), index(b)
    assert (LATTICE[position_a] == a.astype(np.float64)).all() and (LATTICE[position_b] == b.astype(np.float64)).all()
    return position_b - position_a


def test_ordinal_is_the_position_on_the_lattice_for_all_65536_patterns():
    zero_position = np.searchsorted(LATTICE, 0.0)
    expected = np.searchsorted(LATTICE, FINITE.astype(np.float64)) - zero_position
    np.testing.assert_array_equal(ordinal(FINITE), expected)
    assert ordinal(np.array([0x8000], dtype=np.uint16)).item() == 0 == ordinal(np.array([0], dtype=np.uint16)).item()
    # from_ordinal inverts it (up to the sign of zero)
    back = from_ordinal(ordinal(FINITE))
    np.testing.assert_array_equal(back.astype(np.float64), FINITE.astype(np.float64))


def adversarial_pairs():
    values = FINITE.astype(np.float64)
    pairs = []
    neighbours = np.stack([LATTICE[:-1], LATTICE[1:]], axis=1)
    pairs.append(neighbours)  # every pair of neighbours, both directions below
    powers = np.array([2.0**e for e in range(-133, 128) if 2.0**e <= LATTICE.max()])
    powers = powers[np.isin(powers, LATTICE)]
    for sign in (1, -1):
        p = sign * powers
        below = LATTICE[np.searchsorted(LATTICE, p) - 1] if sign > 0 else LATTICE[np.searchsorted(LATTICE, p) + 1]
        pairs.append(np.stack([p, below], axis=1))       # binade edge, one step down into the finer binade
        doubled = p * 2
        keep = np.abs(doubled) <= LATTICE.max()
        pairs.append(np.stack([below[keep], doubled[keep]], axis=1))  # across two binades
    tiny = LATTICE[np.abs(LATTICE) < 1e-37]              # subnormals and the smallest normals, through zero
    pairs.append(np.stack(np.meshgrid(tiny[::7], tiny[::11]), axis=-1).reshape(-1, 2))
    pairs.append(np.array([[0.0, -0.0], [-0.0, 0.0], [LATTICE[0], LATTICE[-1]], [0.02, -0.02], [-1e-8, 3e-8]]))
    rng = np.random.default_rng(0)
    pairs.append(rng.choice(values, size=(200_000, 2)))
    both = np.concatenate(pairs)
    both = np.concatenate([both, both[:, ::-1]])
    return both[:, 0].astype(BFLOAT16), both[:, 1].astype(BFLOAT16)


def test_delta_w_lattice_counts_the_values_walked():
    a, b = adversarial_pairs()
    assert (a.astype(np.float64) == a.astype(np.float64)).all()
    steps = delta_w_lattice(a, b)
    assert steps.dtype == np.int32
    np.testing.assert_array_equal(steps, oracle_steps(a, b))


def test_delta_w_lattice_equals_delta_over_ulp_within_a_binade_and_not_across():
    a, b = adversarial_pairs()
    steps = delta_w_lattice(a, b)
    ratio = (b.astype(np.float64) - a.astype(np.float64)) / ulp(a)
    crossed = crossed_binade(a, b)
    same = ~crossed
    np.testing.assert_array_equal(ratio[same], steps[same])
    # across binades the float ratio is not the step count for a real share of the moves
    assert crossed.sum() > 1000 and (ratio[crossed] != steps[crossed]).mean() > 0.5


def test_spacing_toward_halves_below_a_power_of_two():
    one = np.array([1.0], dtype=BFLOAT16)
    assert spacing_toward(one, np.array([1]))[0] == 2.0**-7
    assert spacing_toward(one, np.array([-1]))[0] == 2.0**-8
    assert ulp(one)[0] == 2.0**-7


def test_series_and_nonfinite_errors_name_step_and_element():
    w = np.array([[1.0, 2.0], [1.0078125, 2.0], [1.0, -2.0]], dtype=BFLOAT16)
    np.testing.assert_array_equal(delta_w_lattice_series(w), [[1, 0], [-1, -2 * int(ordinal(w[1:2, 1])[0])]])
    previous = np.array([1.0, 2.0], dtype=BFLOAT16)
    assert delta_w_lattice_series(w, previous).shape == (3, 2)
    bad = w.copy()
    bad[2, 1] = np.nan
    with pytest.raises(NonFiniteError, match=r"step 12, element \(1,\)"):
        delta_w_lattice_series(bad, first_step=10)
    bad[2, 1] = np.inf
    with pytest.raises(NonFiniteError, match="inf at step 2"):
        delta_w_lattice_series(bad)


def test_exp_avg_sq_mul_beta2_cannot_change_a_normal_bf16_value():
    """The claim behind the variance figure's note, checked on every positive normal bf16 value."""
    import torch

    normal = FINITE[(FINITE.astype(np.float64) >= 2.0**-126)]
    values = torch.from_numpy(normal.view(np.int16).copy()).view(torch.bfloat16)
    decayed = values.clone().mul_(0.999)
    assert torch.equal(decayed.view(torch.int16), values.view(torch.int16))
    assert len(normal) == 0x7F80 - 0x80  # every positive normal pattern was checked
