"""The replay's per-element counting, compiled: one pass over each element of a block of steps.

For every step of a block and every element, from bf16 bit patterns: does the replayed W, exp_avg,
exp_avg_sq equal the recorded one; does the replay, the criterion, the recording leave W where it
was; where do criterion and recording disagree; is the update exactly half a spacing (a tie); and
which power-of-two bin its ratio |update| / half-spacing falls into. ``thimble.replay.step_statistics``
computes the same with numpy, array by array (a dozen passes over memory, ~4x the time); it stays the
reference that the tests hold this kernel to, and the path that lists disagreements element by element.

The kernel is numba-compiled (``nogil``: the replay splits a block's steps across its threads) and
cached on disk, so only the first replay on a machine compiles it (a few seconds).
"""

from __future__ import annotations

import math

import llvmlite.ir
import numba
import numpy as np
from numba.extending import intrinsic

#: per-step counts, in this order (the kernel's ``counts`` columns)
COUNT_COLUMNS = ("W_mismatches", "momentum_mismatches", "variance_mismatches", "replay_frozen",
                 "predicted_frozen", "observed_frozen", "criterion_disagreements", "ties")
#: log2-ratio histogram bins: floor(log2 ratio) clipped to [RATIO_LOW, RATIO_HIGH] (thimble.replay.RATIO_EDGES)
RATIO_LOW, RATIO_HIGH = -25, 8


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


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _same_lattice_point(a, b):
    """Equal bf16 bits, or both zero (±0 are one lattice point)."""
    return a == b or ((a | b) & 0x7FFF) == 0


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _count_steps(w, m, v, replayed_w, replayed_m, replayed_v, pre_rounding, counts, histograms):
    """Count steps ``0 .. len(pre_rounding)`` of a block into ``counts`` (steps, 8) and ``histograms``
    (steps, bins). ``w``, ``m``, ``v`` (uint16, one more row than steps) are the recorded rows t-1 and t;
    the ``replayed_*`` (uint16) the optimizer's results; ``pre_rounding`` (float32) the criterion's sums.
    Arrays are flattened per step: (rows, elements)."""
    steps, elements = pre_rounding.shape
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

            # floor(log2(|update| / half the spacing towards the move)), as thimble.adamw.log2_ratio_floor
            update = pre_rounding[step, j] - _float32_from_bits(before << np.uint32(16))
            bits = _bits_from_float32(update)
            field = np.int32((bits >> np.uint32(23)) & np.uint32(0xFF))
            mantissa_zero = (bits & np.uint32(0x7FFFFF)) == 0
            floor = field - 127
            if field == 0 and not mantissa_zero:  # a subnormal update: below 2**-126, rare
                fraction, exponent = math.frexp(np.float64(update))
                floor = exponent - 1
                mantissa_zero = abs(fraction) == 0.5
            magnitude = before & np.uint32(0x7FFF)
            w_field = np.int32(max(magnitude >> np.uint32(7), np.uint32(1)))
            downward = bits >= np.uint32(0x80000000)
            negative = before >= np.uint32(0x8000)
            if magnitude != 0 and downward != negative and (magnitude & np.uint32(0x7F)) == 0 \
                    and magnitude >= np.uint32(0x100):
                w_field -= 1  # towards zero from a binade's bottom the spacing halves
            floor -= w_field - 135
            floor = min(max(floor, -199), 199)
            if update == 0:
                floor = -200
            if field == 255:
                floor = 200
            tie = mantissa_zero and floor == 0
            predicted = floor < 0 or (tie and (before & np.uint32(1)) == 0)
            predicted_count += predicted
            disagreements += predicted != observed
            ties += tie
            histograms[step, min(max(floor, RATIO_LOW), RATIO_HIGH) - RATIO_LOW] += 1
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
    ``thimble.replay.step_statistics``, the same results."""
    steps = pre_rounding.shape[0]
    flat = [np.ascontiguousarray(x).reshape(len(x), -1) for x in (w, m, v, *replayed)]
    counts = np.zeros((steps, len(COUNT_COLUMNS)), dtype=np.int64)
    histograms = np.zeros((steps, RATIO_HIGH - RATIO_LOW + 1), dtype=np.int64)
    _count_steps(*flat, np.ascontiguousarray(pre_rounding, dtype=np.float32).reshape(steps, -1), counts, histograms)
    return dict(zip(COUNT_COLUMNS, counts.T)), histograms
