"""The replay's compiled counting kernel against its numpy reference, on every bf16 weight."""

import numpy as np
import pytest

from thimble.analysis.replay import RATIO_COLUMNS, step_statistics
from thimble.analysis.replay_kernel import COUNT_COLUMNS, count_steps

#: float32 bit offsets from a weight: exact ties (±0x8000 is half a bf16 spacing, at a binade's bottom
#: too), one float32 ulp either side of them, nothing, one ulp, a whole spacing and far moves
OFFSETS = (0, 1, -1, 0x7FFF, -0x7FFF, 0x8000, -0x8000, 0x8001, -0x8001, 0x10000, -0x10000, 0x1000000, -0x3000000,
           *(0x8000 >> shift for shift in range(1, 16)))  # ratios 2**-1 .. 2**-15


def every_weight_block(rng: np.random.Generator) -> tuple:
    """A block whose steps take every bf16 pattern as W[t-1], each with a pre-rounding sum at one of
    OFFSETS (one step per offset) plus random sums and subnormal updates around zero; W[t] and the
    replayed tensors are the recording's or a neighbour, at random."""
    weights = np.arange(1 << 16, dtype=np.uint32)
    sums = [((weights << 16) + np.uint32(offset & 0xFFFFFFFF)).astype(np.uint32) for offset in OFFSETS]
    sums.append(rng.integers(0, 1 << 32, size=weights.size, dtype=np.uint32))  # anything, NaNs included
    subnormal = rng.integers(0, 0x800000, size=weights.size, dtype=np.uint32)  # updates below 2**-126
    subnormal |= rng.integers(0, 2, size=weights.size, dtype=np.uint32) << 31
    sums.append(np.where(weights & 0x7F80 == 0, subnormal, sums[-1]))
    steps = len(sums)
    pre_rounding = np.stack(sums).view(np.float32)
    w = np.empty((steps + 1, weights.size), dtype=np.uint16)
    w[:-1] = weights
    w[-1] = rng.permutation(weights)
    after = pre_rounding.view(np.uint32) >> 16  # truncated: the neighbour below or the weight itself
    moved = rng.random(after.shape) < 0.5
    w[1:] = np.where(moved, after, w[1:]).astype(np.uint16)
    w[1:][rng.random(after.shape) < 0.05] ^= np.uint16(0x8000)  # sign flips
    w[1:, 0], w[1:, 0x8000] = 0x8000, 0  # -0 after +0 and +0 after -0: one lattice point, so not moved
    m = rng.integers(0, 1 << 16, size=w.shape, dtype=np.uint16)
    v = rng.integers(0, 1 << 16, size=w.shape, dtype=np.uint16)

    def replayed_of(recorded: np.ndarray) -> np.ndarray:
        out = recorded[1:].copy()
        out[rng.random(out.shape) < 0.01] ^= np.uint16(1)
        return out

    return w, m, v, (replayed_of(w), replayed_of(m), replayed_of(v)), pre_rounding


@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_counts_equal_the_numpy_reference_on_every_bf16_weight(seed):
    w, m, v, replayed, pre_rounding = every_weight_block(np.random.default_rng(seed))
    reference = step_statistics(w, m, v, replayed, pre_rounding)
    counts, histograms = count_steps(w, m, v, replayed, pre_rounding)
    assert set(counts) == set(COUNT_COLUMNS) == set(reference["columns"])
    for column in COUNT_COLUMNS:
        np.testing.assert_array_equal(counts[column], reference["columns"][column], err_msg=column)
    np.testing.assert_array_equal(histograms, reference["histograms"])
    assert histograms.shape == (len(pre_rounding), len(RATIO_COLUMNS))
    # the block exercises what it should: ties, disagreements, mismatches, and every ratio bin a float32
    # sum can reach: none below 2**-15, as the least nonzero update (a float32 ulp of w, or 2**-149 at
    # zero) is 2**-16 of w's bf16 spacing
    assert counts["ties"].sum() > 0 and counts["criterion_disagreements"].sum() > 0
    assert all(counts[column].sum() > 0 for column in COUNT_COLUMNS)
    assert (histograms.sum(axis=0)[-24:] > 0).all()


def test_kernel_takes_tensor_shaped_blocks():
    """Blocks of (steps, V, D) as the replay passes them, split across threads at any step."""
    rng = np.random.default_rng(2)
    w, m, v, replayed, pre_rounding = every_weight_block(rng)
    shaped = [x.reshape(len(x), 256, 256) for x in (w, m, v, *replayed, pre_rounding)]
    whole, whole_histograms = count_steps(*shaped[:3], tuple(shaped[3:6]), shaped[6])
    first, first_histograms = count_steps(*(x[:4] for x in shaped[:3]), tuple(x[:3] for x in shaped[3:6]),
                                          shaped[6][:3])
    rest, rest_histograms = count_steps(*(x[3:] for x in shaped[:3]), tuple(x[3:] for x in shaped[3:6]),
                                        shaped[6][3:])
    for column in COUNT_COLUMNS:
        np.testing.assert_array_equal(whole[column], np.concatenate([first[column], rest[column]]))
    np.testing.assert_array_equal(whole_histograms, np.concatenate([first_histograms, rest_histograms]))
