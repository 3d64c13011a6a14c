"""What drives the freeze: the update ratio split into its causes, per step and group, from the recording.

The lab's claim (lab notes, 2025-11-23): "it's really the variance term in the AdamW algorithm that drives
the onset of fimbulwinter". AdamW's update at step t is u = −lr·m̂/(√v̂+ε), with m̂ = exp_avg[t]/(1−β1^t)
and v̂ = exp_avg_sq[t]/(1−β2^t); an element cannot move when |u| is below h, half the bf16 spacing of
W[t−1] toward the move (to the next representable value in the direction of u). In log2,

    log2(|u|/h) = log2(lr) + log2|m̂| − log2(√v̂+ε) − log2(h)

exactly, so the mean over a group's elements splits the same way. The denominator splits once more:
bf16's exp_avg_sq cannot decay (``mul_(0.999)`` rounds back onto a normal value), so beside it runs the
exponential average AdamW would hold in exact arithmetic, v ← β2·v + (1−β2)·g², in float64 from v = 0
before step 1, of the recorded gradients. The gap between the two denominators is ``v_stall_bits``.

Steps pair as the training records them (``thimble.training.train``, the seed notebook): the row of step t holds
grad_W[t] (taken before the optimizer step), then W[t], exp_avg[t] and exp_avg_sq[t] after it. So update
t acts on W[t−1] with the moments of row t, and W[t] is where it landed.

From step 1 to the onset (the first step more than half of a group's elements stay put), the fall of the
mean ratio from its peak is split exactly into three terms: the weights reaching coarser binades
(``spacing``), the gradient statistics as exact AdamW would see them (``statistics``), and bf16's
exp_avg_sq stalled above the exact average (``v_stall``). The largest is the driver.

Everything here is for the bf16 update rule (round to nearest; ``thimble.update_rules``); for the other
rules ``not_applicable`` says why the split does not answer the question.

Every recorded tensor is analysed the same way, one after another, viewed as rows x columns
(``thimble.analysis.tensors``) in its groups of rows: the embedding's dead, live and all tokens, any other
tensor's all. The top level of the answer is the embedding's; every tensor's is under ``tensors``.

The per-element work is one compiled pass (numba, releasing the GIL; rows split across threads);
``element_terms`` is its numpy reference, which computes the ratio directly from u, for the tests.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from thimble.analysis.replay_kernel import (
    BF16_HALF_SPACING_OFFSET,
    BF16_MAGNITUDE,
    BF16_MANTISSA,
    BF16_SECOND_NORMAL_BINADE,
    BF16_SIGN,
    compiled,
)
from thimble.analysis.tensors import has_token_groups, row_groups, row_shape
from thimble.errors import DataError
from thimble.numerics.bf16 import BFLOAT16
from thimble.numerics.lattice import EXPONENT_SHIFT, MAGNITUDE_BITS, NONFINITE_MAGNITUDE, half_spacing_exponent
from thimble.sizes import DRIVERS_BLOCK_STEPS
from thimble.update_rules import hyperparameters, rule_of

log = logging.getLogger(__name__)

#: freeze_drivers.csv's columns after ``step`` and ``group`` (means in log2 units, bits)
COLUMNS = ("mean_log2_ratio", "mean_log2_abs_m_hat", "mean_log2_denominator", "mean_log2_half_spacing",
           "mean_log2_exact_denominator", "v_stall_bits", "frozen_share", "median_abs_w", "elements")
#: the three terms the drop of the mean ratio splits into, in the order ``driver`` breaks ties
TERMS = ("spacing", "statistics", "v_stall")
#: sums the kernel keeps per step and row, in this order: COLUMNS begins with their means
SUMS = ("ratio", "log2_abs_m_hat", "log2_denominator", "log2_half_spacing", "log2_exact_denominator")
#: bf16 magnitudes (sign bit off): the bins of the |W| histograms the medians come from
MAGNITUDES = int(MAGNITUDE_BITS) + 1
#: significant digits the log2 means are written with: float64 means of log2 hold ~15, whose last ones
#: depend on the CPU's log2 (numpy's SIMD kernels), so the files are the same on every machine
SIGNIFICANT_DIGITS = 12
#: the columns written to SIGNIFICANT_DIGITS (the shares and medians are exact as they are)
LOG2_COLUMNS = COLUMNS[:6]
#: steps decoded and analysed at a time
BLOCK_ROWS = DRIVERS_BLOCK_STEPS
with np.errstate(invalid="ignore"):  # the patterns past the finite ones are NaN
    #: the value of every bf16 magnitude, indexed by its bits
    MAGNITUDE_VALUES = np.arange(MAGNITUDES, dtype=np.uint16).view(BFLOAT16).astype(np.float64)


def not_applicable(update_rule: str) -> str | None:
    """Why the decomposition does not answer the freeze question under ``update_rule``; None for bf16."""
    if update_rule == "bf16":
        return None
    why = {
        "stochastic_rounding": "the update is rounded up or down at random with the probability of its distance, "
                               "so an update below half a spacing still moves the weight in expectation; "
                               "|u| against h does not decide whether an element moves",
        "kahan": "the compensation buffer carries what rounding threw away into the next step, so updates "
                 "below half a spacing add up and move the weight; |u| against h does not decide it",
        "fp32_master": "AdamW updates float32 master weights with float32 moments: the update is compared with "
                       "float32's spacing, not bf16's, and exp_avg_sq decays as in exact arithmetic",
    }
    return why.get(update_rule, f"the decomposition is defined for update_rule bf16, not {update_rule}")


# -- the numpy reference ------------------------------------------------------------------------------

def bias_corrections(step: int, beta1: float, beta2: float) -> tuple[float, float]:
    """1 − β1^t and 1 − β2^t as torch forms them (Python floats, the step count as a float)."""
    return 1 - beta1 ** float(step), 1 - beta2 ** float(step)


def exact_ema(grads: np.ndarray, beta2: float) -> np.ndarray:
    """The exact exponential average of squared gradients after each row of ``grads`` (rows 1.., ...):
    v ← β2·v + (1−β2)·g² in float64, from v = 0 before step 1."""
    v = np.zeros(grads.shape[1:])
    out = np.empty(grads.shape, dtype=np.float64)
    for row, g in enumerate(grads):
        g = np.asarray(g, dtype=np.float64)
        v = beta2 * v + (1 - beta2) * (g * g)
        out[row] = v
    return out


def element_terms(w_before: np.ndarray, m: np.ndarray, v: np.ndarray, v_exact: np.ndarray, step: int,
                  hyper: dict) -> dict[str, np.ndarray]:
    """Per element of one step t, from bf16 bit patterns (``w_before`` W[t−1], ``m`` and ``v`` the moments
    of row t) and the exact average ``v_exact`` after step t (float64): the terms of log2(|u|/h), with
    ``ratio`` formed directly from u = −lr·m̂/(√v̂+ε) and h (float64), and ``included`` (m ≠ 0)."""

    lr, (beta1, beta2), eps = hyper["lr"], hyper["betas"], hyper["eps"]
    c1, c2 = bias_corrections(step, beta1, beta2)
    m_value = m.view(BFLOAT16).astype(np.float64)
    v_value = v.view(BFLOAT16).astype(np.float64)
    m_hat, v_hat = m_value / c1, v_value / c2
    denominator = np.sqrt(v_hat) + eps
    update = -lr * m_hat / denominator
    exponent = half_spacing_exponent(w_before, update < 0).astype(np.int64)
    half = np.ldexp(1.0, exponent)
    included = m_value != 0
    with np.errstate(divide="ignore"):
        return {"ratio": np.log2(np.abs(update) / half), "log2_abs_m_hat": np.log2(np.abs(m_hat)),
                "log2_denominator": np.log2(denominator), "log2_half_spacing": exponent.astype(np.float64),
                "log2_exact_denominator": np.log2(np.sqrt(v_exact / c2) + eps), "included": included}


# -- the compiled pass ---------------------------------------------------------------------------------

@compiled
def _row_pass(w_before, w_after, m, v, log2_exact_denominator, part, columns, log2_abs_magnitude, log2_c1,
              log2_denominator_table, log2_lr, sums, counts, histograms, bins):
    """One step over one span of rows, from bf16 bits: ``w_before`` W[t−1], ``w_after`` W[t], ``m`` and ``v``
    the moments of row t (n,), n = rows x ``columns``; ``log2_exact_denominator`` (n,) float64 from the exact
    average; ``part`` (rows,) the part of its groups each row is in (``RowParts``); ``log2_c1`` the step's
    log2(1 − β1^t); ``log2_denominator_table`` (2^15,) log2(√v̂+ε) at each bf16 magnitude of v at this step
    (read only at the magnitudes ``v`` holds).

    Adds into ``sums`` (rows, 5: SUMS) and ``counts`` (rows, 2: included, frozen) each row's elements in order,
    and into ``histograms`` (parts, 2^15) the |W[t−1]| magnitudes of each part's elements; widens ``bins``
    (2: lowest, highest) to the magnitudes counted, so that the caller reads and clears only those bins.
    Returns the number of non-finite W or moments met (the caller names the steps).
    """
    bad = 0
    for row in range(part.size):
        side = part[row]
        ratio_sum = m_sum = denominator_sum = half_sum = exact_sum = 0.0
        included = frozen = 0
        for i in range(row * columns, (row + 1) * columns):
            before, after = w_before[i], w_after[i]
            if ((before & BF16_MAGNITUDE) >= NONFINITE_MAGNITUDE
                    or (after & BF16_MAGNITUDE) >= NONFINITE_MAGNITUDE):
                bad += 1
                continue
            histograms[side, before & BF16_MAGNITUDE] += 1
            bins[0] = min(bins[0], before & BF16_MAGNITUDE)
            bins[1] = max(bins[1], before & BF16_MAGNITUDE)
            if before == after or ((before | after) & BF16_MAGNITUDE) == 0:  # ±0 are one lattice point
                frozen += 1
            mb = m[i]
            magnitude = mb & BF16_MAGNITUDE
            if magnitude == 0:
                continue
            vb = v[i] & BF16_MAGNITUDE
            if magnitude >= NONFINITE_MAGNITUDE or vb >= NONFINITE_MAGNITUDE:
                bad += 1
                continue
            log2_m_hat = log2_abs_magnitude[magnitude] - log2_c1
            log2_denominator = log2_denominator_table[vb]
            # half the spacing toward the move, as thimble.numerics.lattice.half_spacing_exponent: u's sign is
            # opposite to m's; toward zero from a binade's bottom the spacing halves
            field = max(np.int32((before & BF16_MAGNITUDE) >> EXPONENT_SHIFT), 1)
            toward_zero = (before & BF16_MAGNITUDE) != 0 and (mb < BF16_SIGN) != (before >= BF16_SIGN)
            if (toward_zero and (before & BF16_MANTISSA) == 0
                    and (before & BF16_MAGNITUDE) >= BF16_SECOND_NORMAL_BINADE):
                field -= 1
            log2_half = np.float64(field - BF16_HALF_SPACING_OFFSET)
            ratio_sum += log2_lr + log2_m_hat - log2_denominator - log2_half
            m_sum += log2_m_hat
            denominator_sum += log2_denominator
            half_sum += log2_half
            exact_sum += log2_exact_denominator[i]
            included += 1
        sums[row, 0] += ratio_sum
        sums[row, 1] += m_sum
        sums[row, 2] += denominator_sum
        sums[row, 3] += half_sum
        sums[row, 4] += exact_sum
        counts[row, 0] += included
        counts[row, 1] += frozen
    return bad


def magnitude_log2_table() -> np.ndarray:
    """log2 of every bf16 magnitude (sign bit off), indexed by its bits: -inf at 0, NaN past the finite ones."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log2(MAGNITUDE_VALUES)


def denominator_log2_table(c2: float, eps: float, magnitudes: np.ndarray | None = None) -> np.ndarray:
    """log2(√(v/c2) + ε) of every bf16 magnitude v, indexed by its bits (NaN past the finite ones); of the
    ``magnitudes`` (bits) alone when given, in their order (numpy's log2 gives each value the same bits
    whatever the array around it, as the split of the exact average across threads relies on too)."""
    values = MAGNITUDE_VALUES if magnitudes is None else MAGNITUDE_VALUES[magnitudes]
    with np.errstate(invalid="ignore"):
        return np.log2(np.sqrt(values / c2) + eps)


def medians_from_histograms(histograms: np.ndarray, first_bin: int = 0) -> np.ndarray:
    """The median |W| of each row of ``histograms`` (rows, counts of the bf16 magnitudes ``first_bin`` on: all
    2^15 from 0, or the bins that hold the counts), exactly: the middle value, or the mean of the two middle
    values for an even count (numpy's median); NaN when empty."""
    values = MAGNITUDE_VALUES[first_bin:]
    cumulative = np.cumsum(histograms, axis=1)
    out = np.full(len(histograms), np.nan)
    for row, counts in enumerate(cumulative):
        total = int(counts[-1]) if len(counts) else 0
        if total == 0:
            continue
        low, high = np.searchsorted(counts, [(total - 1) // 2, total // 2], side="right")
        out[row] = (values[low] + values[high]) / 2
    return out


class RowParts:
    """A tensor's groups of rows (``thimble.analysis.tensors.row_groups``: the embedding's dead, live and all,
    or all alone) cut into disjoint parts, each group the union of some of them.

    The pass sums each part's rows and counts each part's |W| histogram once; a group's totals are its parts'
    added in order, so a group that is one part (dead, live, another tensor's all) is its rows' sum itself and
    the embedding's all is dead's plus live's.
    """

    def __init__(self, groups: dict[str, np.ndarray]):
        masks = np.stack([np.asarray(mask, dtype=np.bool_) for mask in groups.values()])  # (groups, rows)
        #: the groups' names in order, and the number of rows in each
        self.names = tuple(groups)
        self.sizes = {group: int(mask.sum()) for group, mask in zip(self.names, masks)}
        # a part: the rows in the same groups; numbered in the order of their first row
        _, first_rows, part = np.unique(masks.T, axis=0, return_index=True, return_inverse=True)
        order = np.argsort(first_rows, kind="stable")
        renumber = np.empty_like(order)
        renumber[order] = np.arange(len(order))
        #: (rows,) the part of each row
        self.part = np.ascontiguousarray(renumber[np.reshape(part, -1)], dtype=np.intp)
        self.rows = masks.shape[1]
        #: per part, its rows; per group, the parts it is the union of
        self.part_masks = [self.part == index for index in range(len(order))]
        self.members = {group: tuple(index for index, rows in enumerate(self.part_masks) if mask[rows].all())
                        for group, mask in zip(self.names, masks)}

    @property
    def count(self) -> int:
        return len(self.part_masks)


class DriverPass:
    """The compiled pass over blocks of steps of one tensor, viewed as rows x ``columns``
    (``thimble.analysis.tensors``), its exact average and buffers kept from block to block.

    Rows are split across ``pool``'s threads; each row's elements are summed in order by one thread,
    so the results do not depend on the thread count.
    """

    def __init__(self, tensor: str, groups: dict[str, np.ndarray], columns: int, hyper: dict, pool,
                 block_rows: int = BLOCK_ROWS):
        from thimble.util.workers import thread_spans

        self.tensor, self.parts, self.columns, self.pool = tensor, RowParts(groups), columns, pool
        self.lr, (self.beta1, self.beta2), self.eps = hyper["lr"], hyper["betas"], hyper["eps"]
        rows = self.parts.rows
        self.spans = thread_spans(rows, pool.threads)
        self.v_exact = np.zeros(rows * columns, dtype=np.float64)  # v = 0 before step 1
        self.log2_abs_magnitude = magnitude_log2_table()
        self.sums = np.zeros((block_rows, rows, len(SUMS)), np.float64)
        self.counts = np.zeros((block_rows, rows, 2), np.int64)
        # all zero between blocks: each block clears the bins it counted (a tensor's |W| spans a few binades)
        self.histograms = [np.zeros((block_rows, self.parts.count, MAGNITUDES), np.int64) for _ in self.spans]
        self.bins = [np.empty((block_rows, 2), np.int64) for _ in self.spans]
        self.tables = np.empty((block_rows, MAGNITUDES), np.float64)
        # a tensor of fewer elements than bf16 has magnitudes needs log2(√v̂+ε) at the few its v holds
        self.table_at_present = rows * columns < MAGNITUDES

    def _span(self, span: tuple[int, int], histograms: np.ndarray, bins: np.ndarray, w_previous, w, m, v, g,
              log2_c1, tables, c2) -> int:
        """The block's steps over the rows ``span`` (one thread): the exact average advanced and its
        denominators formed by numpy (vectorized), then the compiled pass; returns the non-finite count."""
        a, b = span
        columns = self.columns
        cols = slice(a * columns, b * columns)
        v_exact = self.v_exact[cols]
        square = np.empty(v_exact.shape, np.float64)
        exact = np.empty(v_exact.shape, np.float64)
        bins[:, 0], bins[:, 1] = MAGNITUDES, -1
        bad = 0
        for r in range(len(w)):
            # v ← β2·v + (1−β2)·g², each product and the sum rounded once in float64 (g² is exact)
            np.multiply(v_exact, self.beta2, out=v_exact)
            np.copyto(square, (g[r, cols].astype(np.uint32) << 16).view(np.float32))
            np.multiply(square, square, out=square)
            np.multiply(square, 1 - self.beta2, out=square)
            np.add(v_exact, square, out=v_exact)
            np.divide(v_exact, c2[r], out=exact)
            np.sqrt(exact, out=exact)
            np.add(exact, self.eps, out=exact)
            np.log2(exact, out=exact)
            bad += _row_pass(w_previous[cols] if r == 0 else w[r - 1, cols], w[r, cols], m[r, cols], v[r, cols],
                             exact, self.parts.part[a:b], columns, self.log2_abs_magnitude, log2_c1[r], tables[r],
                             math.log2(self.lr), self.sums[r, a:b], self.counts[r, a:b], histograms[r], bins[r])
        return bad

    def _name_non_finite(self, first_step: int, w_previous, w, m, v) -> None:
        """Raise a DataError naming the first NaN or Inf of the block (tensor, step, row and column: for the
        embedding token and coordinate)."""
        row_word, column_word = ("token", "coordinate") if has_token_groups(self.tensor) else ("row", "column")
        value_name = "W" if has_token_groups(self.tensor) else "value"
        for name, bits, first in ((value_name, w_previous[None], first_step - 1), (value_name, w, first_step),
                                  ("exp_avg", m, first_step), ("exp_avg_sq", v, first_step)):
            where = np.argwhere((bits & MAGNITUDE_BITS) >= NONFINITE_MAGNITUDE)
            if where.size:
                row, element = (int(x) for x in where[0])
                value = float(bits[row, element].view(BFLOAT16))
                raise DataError(f"{self.tensor}: {name} is {value} at step {first + row}, "
                                f"{row_word} {element // self.columns}, {column_word} {element % self.columns}: "
                                "the bf16 spacing and AdamW's update are undefined there, so the freeze drivers "
                                "cannot be formed")
        raise AssertionError("the compiled pass met a non-finite value that the check does not find")

    def block(self, first_step: int, w_previous: np.ndarray, w: np.ndarray, m: np.ndarray, v: np.ndarray,
              g: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """Per group, the columns of steps ``first_step ..`` (one per row of the (steps, rows·columns) bit
        blocks)."""
        rows = len(w)
        steps = np.arange(first_step, first_step + rows)
        corrections = np.array([bias_corrections(step, self.beta1, self.beta2) for step in steps])
        log2_c1, c2 = np.log2(corrections[:, 0]), np.ascontiguousarray(corrections[:, 1])
        tables = self.tables[:rows]
        for r, c in enumerate(c2):
            if self.table_at_present:
                present = np.unique(v[r] & BF16_MAGNITUDE)
                tables[r, present] = denominator_log2_table(c, self.eps, present)
            else:
                tables[r] = denominator_log2_table(c, self.eps)
        sums, counts = self.sums[:rows], self.counts[:rows]
        sums.fill(0)
        counts.fill(0)
        futures = [self.pool.submit(self._span, span, histograms[:rows], bins[:rows], w_previous, w, m, v, g,
                                    log2_c1, tables, c2)
                   for span, histograms, bins in zip(self.spans, self.histograms, self.bins)]
        bad = sum(future.result() for future in futures)
        if bad:
            self._name_non_finite(first_step, w_previous, w, m, v)
        # the bins any step of any span counted: every count of the block lies in them
        low = min(int(bins[:rows, 0].min()) for bins in self.bins)
        high = max(int(bins[:rows, 1].max()) for bins in self.bins) + 1
        histogram = self.histograms[0][:rows, :, low:high].copy()
        for histograms in self.histograms[1:]:
            histogram += histograms[:rows, :, low:high]
        for histograms in self.histograms:
            histograms[:rows, :, low:high] = 0
        return self._group_columns(steps, sums, counts, histogram, low)

    def _group_columns(self, steps: np.ndarray, sums: np.ndarray, counts: np.ndarray, histogram: np.ndarray,
                       first_bin: int) -> dict[str, dict[str, np.ndarray]]:
        """Per group, the columns of ``steps`` from the rows' ``sums`` and ``counts`` and the parts'
        ``histogram`` of |W[t−1]| (steps, parts, bins of the magnitudes ``first_bin`` on)."""
        parts = self.parts
        part_totals = [(sums[:, mask].sum(axis=1), counts[:, mask].sum(axis=1)) for mask in parts.part_masks]
        out = {}
        for group in parts.names:
            members = parts.members[group]
            if members:
                group_sums, group_counts = part_totals[members[0]]
                group_histogram = histogram[:, members[0]]
                for index in members[1:]:
                    group_sums, group_counts = group_sums + part_totals[index][0], group_counts + part_totals[index][1]
                    group_histogram = group_histogram + histogram[:, index]
            else:  # a group without rows (the embedding's dead group when every token occurs)
                group_sums, group_counts = np.zeros(sums.shape[::2]), np.zeros(counts.shape[::2], np.int64)
                group_histogram = np.zeros((len(steps), histogram.shape[2]), np.int64)
            included = group_counts[:, 0]
            size = parts.sizes[group]
            with np.errstate(invalid="ignore", divide="ignore"):
                means = group_sums / included[:, None]
                frozen = group_counts[:, 1] / (size * self.columns) if size else np.full(len(steps), np.nan)
            columns = {"step": steps, **dict(zip(COLUMNS[: len(SUMS)], means.T))}
            columns["v_stall_bits"] = columns["mean_log2_denominator"] - columns["mean_log2_exact_denominator"]
            columns["frozen_share"] = frozen
            columns["median_abs_w"] = medians_from_histograms(group_histogram, first_bin)
            columns["elements"] = included
            out[group] = columns
        return out


# -- the per-group answer ------------------------------------------------------------------------------

def significant(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to SIGNIFICANT_DIGITS significant digits (NaN stays NaN)."""
    return np.array([float(f"{value:.{SIGNIFICANT_DIGITS}g}") for value in np.asarray(values, dtype=np.float64)])


def _number(value) -> float | None:
    return None if value is None or not np.isfinite(value) else float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def drivers_of(columns: dict[str, np.ndarray]) -> dict:
    """The onset of one group's freeze and what drove it, from its freeze_drivers.csv columns (rows by step).

    ``onset_step``: the first step more than half of the group's elements stay put; ``peak_step``: the step
    of the largest mean ratio from step 1 to the onset (the first on ties); ``drop_bits``: the mean ratio at
    the peak minus at the onset, split into ``spacing_bits`` (the rise of the mean log2 half spacing),
    ``statistics_bits`` (the fall of mean log2|m̂| − mean log2 exact denominator) and ``v_stall_bits`` (the
    rise of the stall), which sum to it up to float rounding (``residual_bits``); ``driver``: the largest.
    """
    steps = np.asarray(columns["step"])
    ratio = np.asarray(columns["mean_log2_ratio"], dtype=np.float64)
    spacing = np.asarray(columns["mean_log2_half_spacing"], dtype=np.float64)
    statistics = (np.asarray(columns["mean_log2_abs_m_hat"], dtype=np.float64)
                  - np.asarray(columns["mean_log2_exact_denominator"], dtype=np.float64))
    stall = np.asarray(columns["v_stall_bits"], dtype=np.float64)
    frozen = np.asarray(columns["frozen_share"], dtype=np.float64)
    result = {"onset_step": None, "peak_step": None, "drop_bits": None, "spacing_bits": None,
              "statistics_bits": None, "v_stall_bits": None, "residual_bits": None, "driver": None,
              "claim_supported": None, "v_stall_bits_last": _number(stall[-1]) if len(stall) else None}
    onset_rows = np.flatnonzero(frozen > 0.5)
    if not onset_rows.size:
        return result
    onset = int(onset_rows[0])
    before = ratio[: onset + 1]
    if not np.isfinite(before).any():
        return {**result, "onset_step": int(steps[onset])}
    peak = int(np.nanargmax(before))
    terms = {"spacing": spacing[onset] - spacing[peak], "statistics": statistics[peak] - statistics[onset],
             "v_stall": stall[onset] - stall[peak]}
    drop = ratio[peak] - ratio[onset]
    driver = max(TERMS, key=lambda term: terms[term]) if peak != onset else None
    return {**result, "onset_step": int(steps[onset]), "peak_step": int(steps[peak]), "drop_bits": _number(drop),
            **{f"{term}_bits": _number(value) for term, value in terms.items()},
            "residual_bits": _number(drop - sum(terms.values())), "driver": driver,
            "claim_supported": None if driver is None else driver == "v_stall"}


def answer(group: str, drivers: dict) -> str:
    """One sentence: which term drove the group's onset and how much the stall adds by the end."""
    last = drivers["v_stall_bits_last"]
    stall = "" if last is None else f"; by the last step bf16's exp_avg_sq holds the denominator {last:.2f} bits " \
                                    "above exact AdamW's"
    if drivers["onset_step"] is None:
        return f"{group}: never more than half of its elements frozen at one step, so no onset{stall}"
    if drivers["driver"] is None:
        return f"{group}: more than half frozen already at step {drivers['onset_step']} (no drop to split){stall}"
    terms = ", ".join(f"{term} {drivers[f'{term}_bits']:.2f}" for term in TERMS)
    return (f"{group}: the onset at step {drivers['onset_step']} was driven by {drivers['driver']} (the mean "
            f"log2 ratio fell {drivers['drop_bits']:.2f} bits from its peak at step {drivers['peak_step']}: "
            f"{terms}); the lab's claim (v_stall) is {'supported' if drivers['claim_supported'] else 'not supported'}"
            f"{stall}")


DEFINITION = ("per step t: u = −lr·m̂/(√v̂+ε) from the recorded bf16 exp_avg[t], exp_avg_sq[t], and h = half the bf16 "
              "spacing of W[t−1] toward u; means over the group's elements with exp_avg ≠ 0; the exact "
              "denominator from v ← β2·v + (1−β2)·g² (float64, v = 0 before step 1) of the recorded grad_W; "
              "onset: the first step more than half of the group's elements have W[t] = W[t−1]; peak: the largest "
              "mean log2(|u|/h) from step 1 to the onset; drop_bits = spacing_bits + statistics_bits + "
              "v_stall_bits (residual_bits: float rounding); the lab's claim is supported where the driver is "
              "v_stall")


def as_written(parts: dict[str, list[dict]]) -> dict[str, dict[str, np.ndarray]]:
    """Each group's columns over every step, joined from its blocks' ``parts``, the log2 means rounded as
    freeze_drivers.csv holds them (the answer is computed from the table as written)."""
    tables = {group: {name: np.concatenate([part[name] for part in group_parts]) for name in ("step", *COLUMNS)}
              for group, group_parts in parts.items()}
    for table in tables.values():
        table.update({name: significant(table[name]) for name in LOG2_COLUMNS})
    return tables


def step_major(tensor: str, tables: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """freeze_drivers.csv's rows of one tensor from its groups' tables: each step's groups together (the
    embedding's dead, live and all), in the order of ``tables``."""
    groups = list(tables)
    steps = tables[groups[0]]["step"]
    frame = {"tensor": np.full(len(steps) * len(groups), tensor, dtype=object),
             "step": np.repeat(steps, len(groups)), "group": np.tile(np.array(groups, dtype=object), len(steps))}
    frame.update({name: np.stack([tables[group][name] for group in groups], axis=1).reshape(-1) for name in COLUMNS})
    return frame


def tensor_drivers(tables: dict[str, dict[str, np.ndarray]]) -> dict[str, dict]:
    """Per group of one tensor, from its tables as written: the onset, what drove it and the answer in words."""
    result = {group: drivers_of(table) for group, table in tables.items()}
    for group, drivers in result.items():
        drivers["answer"] = answer(group, drivers)
    return result


def drivers_summary(tables: dict[str, dict[str, np.ndarray]], update_rule: str, inputs_exact: bool,
                    weight_decay: float) -> dict:
    """freeze_drivers.json's top level from one tensor's groups' tables as written: per group, the onset, what
    drove it and the answer in words."""
    result = {"applies": True, "update_rule": update_rule, "inputs_exact": inputs_exact,
              "weight_decay": weight_decay, "definition": DEFINITION, **tensor_drivers(tables)}
    if weight_decay:
        result["note"] = (f"weight_decay {weight_decay}: the decoupled decay W·(1 − lr·λ) is applied "
                          "before the update and is not part of u")
    return result


# -- file I/O edge -------------------------------------------------------------------------------------

#: the datasets of a recorded parameter the pass reads, by the seed's role names (``RecordedParam.roles``)
ROLES = ("W", "momentum_W", "variance_W", "grad_W")


def group_blocks(handle, param, groups: dict[str, np.ndarray], hyper: dict, pool,
                 block_rows: int) -> dict[str, list[dict]]:
    """The compiled pass over one recorded parameter ``param`` (``RecordedParam``) of the open recording
    ``handle``, a block of steps at a time, its rows in ``groups``: per group, each block's columns."""
    from tqdm.auto import tqdm

    from thimble.record.reader import RecordedTensor, aligned_blocks

    roles = param.require_roles(handle.filename, ROLES, "the freeze drivers need its value, gradient and both "
                                                       "moments")
    tensors = {role: RecordedTensor.of_recording(handle, roles[role]) for role in ROLES}
    n_steps = tensors["W"].shape[0]
    _, columns = row_shape(param.shape)
    out: dict[str, list[dict]] = {group: [] for group in groups}
    analysis = DriverPass(param.name, groups, columns, hyper, pool, block_rows)
    previous = None
    with tqdm(total=n_steps - 1, desc=f"freeze drivers {param.name}", unit="step", mininterval=5) as bar:
        for first, block in aligned_blocks(tensors, block_rows, pool):
            block = {name: rows.reshape(len(rows), -1) for name, rows in block.items()}  # (steps, rows·columns)
            if previous is None:  # step 0: the initial W; its moments and gradient are empty
                previous = block["W"][0]
                block = {name: rows[1:] for name, rows in block.items()}
                first += 1
                if not len(block["W"]):
                    continue
            columns_of = analysis.block(first, previous, block["W"], block["momentum_W"], block["variance_W"],
                                        block["grad_W"])
            for group in groups:
                out[group].append(columns_of[group])
            previous = block["W"][-1].copy()
            bar.update(len(block["W"]))
    return out


def tensor_tables(recording: str, hyper: dict, threads: int, block_rows: int):
    """Every recorded parameter one after another, the embedding first, then in the model's order: (its
    ``RecordedParam``, its groups' tables as written). Only one tensor's buffers are held at a time."""
    from thimble.analysis.tensors import recorded_params
    from thimble.record.format import open_h5, read_checked
    from thimble.util.workers import WorkerPool

    with open_h5(recording) as handle, WorkerPool(max(threads, 1)) as pool:
        params = sorted(recorded_params(handle), key=lambda param: not has_token_groups(param.name))
        dead = None
        if any(has_token_groups(param.name) for param in params):
            if "dead_mask" not in handle:
                raise DataError(f"{recording} has no dead_mask dataset: the embedding's dead and live groups come "
                                "from it; rechunk the stream again with thimble rechunk")
            dead = read_checked(handle["dead_mask"]).astype(bool)
        for param in params:
            groups = row_groups(param.name, row_shape(param.shape)[0], dead)
            yield param, as_written(group_blocks(handle, param, groups, hyper, pool, block_rows))


def write_drivers(recording: str, table_path: str, summary_path: str, threads: int = 1,
                  block_rows: int = BLOCK_ROWS) -> dict:
    """freeze_drivers.csv (per tensor, step and group) and its per-group answer (JSON, summary.json's
    ``drivers``): the top level for the embedding (the first recorded tensor when the embedding is not
    recorded, ``question_tensor``), every tensor's under ``tensors``."""
    import pandas as pd

    from thimble.record.format import open_h5
    from thimble.util.files import atomic_output, write_json
    from thimble.util.tables import write_csv

    with open_h5(recording) as handle:
        attrs = dict(handle.attrs)
    rule = rule_of(attrs)
    why = not_applicable(rule)
    if why is not None:
        write_csv(table_path, pd.DataFrame(columns=["tensor", "step", "group", *COLUMNS]))
        result = {"applies": False, "update_rule": rule, "why": why}
        log.info("freeze drivers: not computed for update rule %s: %s", rule, why)
        write_json(summary_path, result, indent=2)
        return result
    hyper = hyperparameters(attrs)
    inputs_exact = attrs.get("storage_dtype") != "float16"
    result, every = None, {}
    # the table is written a tensor at a time, so that only one tensor's tables are held
    with atomic_output(table_path) as tmp, open(tmp, "w", newline="") as table:
        for param, tables in tensor_tables(recording, hyper, threads, block_rows):
            name = param.name
            pd.DataFrame(step_major(name, tables)).to_csv(table, header=result is None, index=False)
            if result is None:  # the first tensor: the embedding when it is recorded
                result = drivers_summary(tables, rule, inputs_exact, hyper["weight_decay"])
                result["question_tensor"] = name
                every[name] = {group: result[group] for group in tables}
            else:
                every[name] = tensor_drivers(tables)
            log.info("freeze drivers: %s (%d x %d): %s", name, *row_shape(param.shape),
                     " | ".join(drivers["answer"] for drivers in every[name].values()))
        if result is None:
            raise DataError(f"{recording} records no parameter (its recorded_params attribute is empty)")
    result["tensors"] = every
    write_json(summary_path, result, indent=2)
    return result
