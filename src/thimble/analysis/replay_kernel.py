"""The replay's per-element counting, compiled: one pass over each element of a block of steps.

For every step of a block and every element, from bf16 bit patterns: does the replayed W, exp_avg,
exp_avg_sq equal the recorded one; does the replay, the criterion, the recording leave W where it
was; where do criterion and recording disagree; is the update exactly half a spacing (a tie); and
which power-of-two bin its ratio |update| / half-spacing falls into. ``thimble.analysis.replay.step_statistics``
computes the same with numpy, array by array (a dozen passes over memory: 7x the time, 21 against 3 ms per
thimble_7 step on one core); it stays the
reference that the tests hold this kernel to, and the path that lists disagreements element by element.

The kernel is numba-compiled (``nogil``: the replay splits a block's steps across its threads) and
cached on disk, so only the first replay of an install compiles it (a few seconds).
"""

from __future__ import annotations

import llvmlite.ir
import numba
import numpy as np
from numba.extending import intrinsic

from thimble.numerics.lattice import EXPONENT_BIAS, EXPONENT_SHIFT, MAGNITUDE_BITS, MANTISSA_BITS, SIGN_BIT

#: per-step counts, in this order (the kernel's ``counts`` columns)
COUNT_COLUMNS = ("W_mismatches", "momentum_mismatches", "variance_mismatches", "replay_frozen",
                 "predicted_frozen", "observed_frozen", "criterion_disagreements", "ties")
#: log2-ratio histogram bins: floor(log2 ratio) clipped to [RATIO_LOW, RATIO_HIGH] (thimble.analysis.replay.RATIO_EDGES)
RATIO_LOW, RATIO_HIGH = -25, 8

# the lattice's uint16 masks as Python ints for the compiled kernels (here and thimble.analysis.drivers): numba
# compiles a module's globals into a kernel as constants of their own type, and Python ints behave as literals do
BF16_SIGN = int(SIGN_BIT)
BF16_MAGNITUDE = int(MAGNITUDE_BITS)
BF16_MANTISSA = int(MANTISSA_BITS)
#: the smallest magnitude in a binade whose lower neighbour is normal too (exponent field 2)
BF16_SECOND_NORMAL_BINADE = 2 << EXPONENT_SHIFT
#: log2 of half the spacing in the binade of exponent field e is e minus this (numerics.lattice.ulp)
BF16_HALF_SPACING_OFFSET = EXPONENT_BIAS + EXPONENT_SHIFT + 1


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bits are ``bits`` (uint32): a bit cast, no conversion."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvmlite.ir.FloatType())
    return numba.types.float32(numba.types.uint32), codegen


@intrinsic
def _bits_from_float32(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvmlite.ir.IntType(32))
    return numba.types.uint32(numba.types.float32), codegen


def compiled(function):
    """numba-compiled, releasing the GIL; cached on disk where numba finds a writable cache directory
    (beside the package, or NUMBA_CACHE_DIR), else compiled once per process. The drivers' pass
    (``thimble.analysis.drivers``) is compiled the same way."""
    try:
        return numba.njit(nogil=True, cache=True, error_model="numpy")(function)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return numba.njit(nogil=True, error_model="numpy")(function)


@compiled
def _same_lattice_point(a, b):
    """Equal bf16 bits, or both zero (±0 are one lattice point)."""
    return a == b or ((a | b) & BF16_MAGNITUDE) == 0


@compiled
def _count_steps(w, m, v, replayed_w, replayed_m, replayed_v, pre_rounding, counts, histograms):
    """Count steps ``0 .. len(pre_rounding)`` of a block into ``counts`` (steps, 8) and ``histograms``
    (steps, bins). ``w``, ``m``, ``v`` (uint16, one more row than steps) are the recorded rows t-1 and t;
    the ``replayed_*`` (uint16) the optimizer's results; ``pre_rounding`` (float32) the criterion's sums.
    Arrays are flattened per step: (rows, elements).

    The element loop has no branches (selects only), so LLVM vectorizes it; the histogram, a scatter,
    is a second loop over the bins it wrote, into four interleaved tallies (no store-to-load stall).
    """
    steps, elements = pre_rounding.shape
    bins = np.empty(elements, np.uint8)
    bin_count = RATIO_HIGH - RATIO_LOW + 1
    two_to_64 = np.float32(2.0**64)
    one = np.float32(1.0)
    for step in range(steps):
        w_mismatch = m_mismatch = v_mismatch = replay_frozen = predicted_count = observed_count = 0
        disagreements = ties = 0
        for j in range(elements):
            before = np.uint32(w[step, j])
            after = np.uint32(w[step + 1, j])
            replayed = np.uint32(replayed_w[step, j])
            w_mismatch += replayed != after
            m_mismatch += replayed_m[step, j] != m[step + 1, j]
            v_mismatch += replayed_v[step, j] != v[step + 1, j]
            replay_frozen += _same_lattice_point(replayed, before)
            observed = _same_lattice_point(after, before)
            observed_count += observed

            # floor(log2(|update| / half the spacing towards the move)), as thimble.numerics.lattice.log2_ratio_floor
            update = pre_rounding[step, j] - _float32_from_bits(before << np.uint32(16))
            bits = _bits_from_float32(update)
            field = np.int32((bits >> np.uint32(23)) & np.uint32(0xFF))
            # a subnormal update (below 2**-126) times 2**64 is normal and exact: its exponent, less 64
            subnormal = field == 0
            scaled = _bits_from_float32(update * (two_to_64 if subnormal else one))
            floor = np.int32((scaled >> np.uint32(23)) & np.uint32(0xFF)) - (191 if subnormal else 127)
            mantissa_zero = (scaled & np.uint32(0x7FFFFF)) == 0
            magnitude = before & np.uint32(BF16_MAGNITUDE)
            w_field = np.int32(max(magnitude >> np.uint32(EXPONENT_SHIFT), np.uint32(1)))
            downward = bits >= np.uint32(0x80000000)
            negative = before >= np.uint32(BF16_SIGN)
            # towards zero from a binade's bottom the spacing halves
            finer = (magnitude != 0) & (downward != negative) & ((magnitude & np.uint32(BF16_MANTISSA)) == 0) \
                & (magnitude >= np.uint32(BF16_SECOND_NORMAL_BINADE))
            floor -= w_field - np.int32(finer) - BF16_HALF_SPACING_OFFSET
            floor = min(max(floor, -199), 199)
            floor = -200 if update == 0 else floor
            floor = 200 if field == 255 else floor
            tie = mantissa_zero & (floor == 0)
            predicted = (floor < 0) | (tie & ((before & np.uint32(1)) == 0))
            predicted_count += predicted
            disagreements += predicted != observed
            ties += tie
            bins[j] = min(max(floor, RATIO_LOW), RATIO_HIGH) - RATIO_LOW
        tallies = np.zeros((4, bin_count), np.int64)
        quarter = elements // 4
        for j in range(quarter):
            tallies[0, bins[j]] += 1
            tallies[1, bins[quarter + j]] += 1
            tallies[2, bins[2 * quarter + j]] += 1
            tallies[3, bins[3 * quarter + j]] += 1
        for j in range(4 * quarter, elements):
            tallies[0, bins[j]] += 1
        for b in range(bin_count):
            histograms[step, b] += tallies[0, b] + tallies[1, b] + tallies[2, b] + tallies[3, b]
        counts[step, 0] = w_mismatch
        counts[step, 1] = m_mismatch
        counts[step, 2] = v_mismatch
        counts[step, 3] = replay_frozen
        counts[step, 4] = predicted_count
        counts[step, 5] = observed_count
        counts[step, 6] = disagreements
        counts[step, 7] = ties


def count_steps(w: np.ndarray, m: np.ndarray, v: np.ndarray, replayed: tuple[np.ndarray, np.ndarray, np.ndarray],
                pre_rounding: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-step counts (``COUNT_COLUMNS``) and ratio histograms of a run of steps: the arguments of
    ``thimble.analysis.replay.step_statistics``, the same results."""
    steps = pre_rounding.shape[0]
    flat = [np.ascontiguousarray(x).reshape(len(x), -1) for x in (w, m, v, *replayed)]
    counts = np.zeros((steps, len(COUNT_COLUMNS)), dtype=np.int64)
    histograms = np.zeros((steps, RATIO_HIGH - RATIO_LOW + 1), dtype=np.int64)
    _count_steps(*flat, np.ascontiguousarray(pre_rounding, dtype=np.float32).reshape(steps, -1), counts, histograms)
    return dict(zip(COUNT_COLUMNS, counts.T)), histograms
