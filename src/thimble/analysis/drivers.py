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

A loop recorded by ``thimble.Recorder`` is analysed where its optimizer is torch's Adam or AdamW and the tensor
has both moments (exp_avg, exp_avg_sq): with the lr, betas and eps each step used (its ``hyperparameters``
table: a schedule changes lr, so the drop gains a fourth term, ``learning_rate``, the fall of log2 lr), the
tensor's own step count in the bias corrections, and the spacing of each tensor's own lattice (a float32
parameter's, whose float32 exp_avg_sq decays, so its v_stall stays near 0). A step where the optimizer did not
step the tensor, or stepped it with lr 0, forms no update to split: its row is empty. Elsewhere (SGD, an
optimizer of another kind, a tensor without the moments) freeze_drivers.json says for which tensors the split
does not apply, and why.

The per-element work is one compiled pass (numba, releasing the GIL; rows split across threads);
``element_terms`` is its numpy reference, which computes the ratio directly from u, for the tests.
"""

from __future__ import annotations

import dataclasses
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
from thimble.numerics.lattice import (
    BF16_LATTICE,
    EXPONENT_SHIFT,
    MAGNITUDE_BITS,
    NONFINITE_MAGNITUDE,
    Lattice,
    half_spacing_exponent,
)
from thimble.sizes import DRIVERS_BLOCK_STEPS, EMBEDDING
from thimble.update_rules import hyperparameters, rule_of

log = logging.getLogger(__name__)

#: freeze_drivers.csv's columns after ``step`` and ``group`` (means in log2 units, bits)
COLUMNS = ("mean_log2_ratio", "mean_log2_abs_m_hat", "mean_log2_denominator", "mean_log2_half_spacing",
           "mean_log2_exact_denominator", "v_stall_bits", "frozen_share", "median_abs_w", "elements")
#: the three terms the drop of the mean ratio splits into, in the order ``driver`` breaks ties
TERMS = ("spacing", "statistics", "v_stall")
#: a recorder's recording: lr may change at every step, and its fall is a fourth term (the column ``log2_lr``)
LR_TERM = "learning_rate"
LR_COLUMN = "log2_lr"
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


# -- AdamW's settings at each step ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepUpdate:
    """AdamW's settings of one step of one tensor."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    count: float           # the tensor's step count after the step: its bias corrections' power
    stepped: bool          # the optimizer stepped the tensor (torch skips one without a gradient)
    coupled_decay: float   # Adam's (not AdamW's) weight decay, added to the gradient as λ·W before the moments

    @property
    def forms_update(self) -> bool:
        """Whether the step formed an update of the tensor to split (stepped, with lr above 0)."""
        return self.stepped and self.lr > 0


class UpdateSettings:
    """AdamW's settings of one tensor at every step: the seed's constant ones (``hyper``, as
    ``thimble.update_rules.hyperparameters`` gives them; the step count is the step), or a recorder's per step
    (``of_steps``)."""

    def __init__(self, hyper: dict, per_step: dict[str, np.ndarray] | None = None):
        self.hyper, self.per_step = hyper, per_step

    @classmethod
    def of_steps(cls, settings, adam_l2: bool) -> UpdateSettings:
        """From a recorder's ``thimble.analysis.tensors.StepSettings``; ``adam_l2``: torch's Adam without
        decoupled decay, whose weight decay joins the gradient."""
        n_steps = len(settings.counts)
        nothing = np.full(n_steps, np.nan)

        def column(key: str, default: np.ndarray = nothing) -> np.ndarray:
            values = settings.get(key)
            return default if values is None else values

        decay = column("weight_decay", np.zeros(n_steps))
        return cls({}, {"lr": column("lr"), "beta1": column("betas.0"), "beta2": column("betas.1"),
                        "eps": column("eps"), "count": settings.counts, "stepped": settings.stepped,
                        "coupled_decay": decay if adam_l2 else np.zeros(n_steps)})

    def at(self, step: int) -> StepUpdate:
        if self.per_step is None:
            lr, (beta1, beta2), eps = self.hyper["lr"], self.hyper["betas"], self.hyper["eps"]
            return StepUpdate(lr, beta1, beta2, eps, float(step), True, 0.0)
        row = {key: values[step] for key, values in self.per_step.items()}
        return StepUpdate(float(row["lr"]), float(row["beta1"]), float(row["beta2"]), float(row["eps"]),
                          float(row["count"]), bool(row["stepped"]), float(row["coupled_decay"]))


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


def group_columns(parts: RowParts, columns: int, steps: np.ndarray, sums: np.ndarray, counts: np.ndarray,
                  medians: dict[str, np.ndarray], updates: list[StepUpdate] | None = None
                  ) -> dict[str, dict[str, np.ndarray]]:
    """Per group of ``parts``, the columns of ``steps`` from the rows' ``sums`` (steps, rows, SUMS) and ``counts``
    (steps, rows, 2: included, frozen) and the group's median |W[t−1]| (``medians``). With ``updates`` (a
    recorder's recording: each step's settings) the column ``log2_lr`` too, and a step that formed no update
    (``StepUpdate.forms_update``) has no elements, NaN means and a NaN frozen share."""
    part_totals = [(sums[:, mask].sum(axis=1), counts[:, mask].sum(axis=1)) for mask in parts.part_masks]
    formed = None if updates is None else np.array([update.forms_update for update in updates])
    out = {}
    for group in parts.names:
        members = parts.members[group]
        if members:
            group_sums, group_counts = part_totals[members[0]]
            for index in members[1:]:
                group_sums, group_counts = group_sums + part_totals[index][0], group_counts + part_totals[index][1]
        else:  # a group without rows (the embedding's dead group when every token occurs)
            group_sums, group_counts = np.zeros(sums.shape[::2]), np.zeros(counts.shape[::2], np.int64)
        included = group_counts[:, 0]
        size = parts.sizes[group]
        with np.errstate(invalid="ignore", divide="ignore"):
            means = group_sums / included[:, None]
            frozen = group_counts[:, 1] / (size * columns) if size else np.full(len(steps), np.nan)
        table = {"step": steps, **dict(zip(COLUMNS[: len(SUMS)], means.T))}
        table["v_stall_bits"] = table["mean_log2_denominator"] - table["mean_log2_exact_denominator"]
        table["frozen_share"] = frozen
        table["median_abs_w"] = medians[group]
        table["elements"] = included
        if formed is not None:
            for name in (*COLUMNS[: len(SUMS)], "v_stall_bits", "frozen_share"):
                table[name] = np.where(formed, table[name], np.nan)
            table["elements"] = np.where(formed, included, 0)
            table[LR_COLUMN] = np.array([math.log2(update.lr) if update.forms_update else np.nan
                                         for update in updates])
        out[group] = table
    return out


def _log2_lr(update: StepUpdate) -> float:
    """log2 lr of a step that forms an update; a placeholder (0) for one that forms none, whose row is dropped."""
    return math.log2(update.lr) if update.forms_update else 0.0


class DriverPass:
    """The compiled pass over blocks of steps of one tensor of bf16 values and moments, viewed as rows x
    ``columns`` (``thimble.analysis.tensors``), its exact average and buffers kept from block to block.

    Rows are split across ``pool``'s threads; each row's elements are summed in order by one thread,
    so the results do not depend on the thread count. ``hyper``: AdamW's settings (the seed's, a dict), or an
    ``UpdateSettings`` of each step's (a recorder's recording); ``grouped``: the tensor with token groups.
    """

    def __init__(self, tensor: str, groups: dict[str, np.ndarray], columns: int, hyper: dict | UpdateSettings,
                 pool, block_rows: int = BLOCK_ROWS, grouped: str | None = EMBEDDING):
        from thimble.util.workers import thread_spans

        self.tensor, self.parts, self.columns, self.pool = tensor, RowParts(groups), columns, pool
        self.grouped = grouped
        #: a recorder's settings per step (their rows and log2_lr are written); None for the seed's
        self.per_step = hyper if isinstance(hyper, UpdateSettings) else None
        self.settings = self.per_step or UpdateSettings(hyper)
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
              log2_c1, tables, c2, updates: list[StepUpdate]) -> int:
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
        for r, update in enumerate(updates):
            before = w_previous[cols] if r == 0 else w[r - 1, cols]
            if update.stepped:  # a step that skipped the tensor leaves its moments, and the exact average, as they were
                # v ← β2·v + (1−β2)·g², each product and the sum rounded once in float64 (g² is exact)
                np.multiply(v_exact, update.beta2, out=v_exact)
                np.copyto(square, (g[r, cols].astype(np.uint32) << 16).view(np.float32))
                if update.coupled_decay:  # Adam's decay joins the gradient the moments see: g + λ·W[t−1]
                    square += update.coupled_decay * (before.astype(np.uint32) << 16).view(np.float32).astype(
                        np.float64)
                np.multiply(square, square, out=square)
                np.multiply(square, 1 - update.beta2, out=square)
                np.add(v_exact, square, out=v_exact)
            np.divide(v_exact, c2[r], out=exact)
            np.sqrt(exact, out=exact)
            np.add(exact, update.eps, out=exact)
            np.log2(exact, out=exact)
            bad += _row_pass(before, w[r, cols], m[r, cols], v[r, cols],
                             exact, self.parts.part[a:b], columns, self.log2_abs_magnitude, log2_c1[r], tables[r],
                             _log2_lr(update), self.sums[r, a:b], self.counts[r, a:b], histograms[r], bins[r])
        return bad

    def block(self, first_step: int, w_previous: np.ndarray, w: np.ndarray, m: np.ndarray, v: np.ndarray,
              g: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """Per group, the columns of steps ``first_step ..`` (one per row of the (steps, rows·columns) bit
        blocks)."""
        rows = len(w)
        steps = np.arange(first_step, first_step + rows)
        updates = [self.settings.at(int(step)) for step in steps]
        corrections = np.array([bias_corrections(update.count, update.beta1, update.beta2) for update in updates])
        log2_c1, c2 = np.log2(corrections[:, 0]), np.ascontiguousarray(corrections[:, 1])
        tables = self.tables[:rows]
        for r, (c, update) in enumerate(zip(c2, updates)):
            if self.table_at_present:
                present = np.unique(v[r] & BF16_MAGNITUDE)
                tables[r, present] = denominator_log2_table(c, update.eps, present)
            else:
                tables[r] = denominator_log2_table(c, update.eps)
        sums, counts = self.sums[:rows], self.counts[:rows]
        sums.fill(0)
        counts.fill(0)
        futures = [self.pool.submit(self._span, span, histograms[:rows], bins[:rows], w_previous, w, m, v, g,
                                    log2_c1, tables, c2, updates)
                   for span, histograms, bins in zip(self.spans, self.histograms, self.bins)]
        bad = sum(future.result() for future in futures)
        if bad:
            name_non_finite(self.tensor, self.grouped, self.columns, first_step, w_previous, w, m, v)
        # the bins any step of any span counted: every count of the block lies in them
        low = min(int(bins[:rows, 0].min()) for bins in self.bins)
        high = max(int(bins[:rows, 1].max()) for bins in self.bins) + 1
        histogram = self.histograms[0][:rows, :, low:high].copy()
        for histograms in self.histograms[1:]:
            histogram += histograms[:rows, :, low:high]
        for histograms in self.histograms:
            histograms[:rows, :, low:high] = 0
        return group_columns(self.parts, self.columns, steps, sums, counts, self._medians(histogram, low),
                             None if self.per_step is None else updates)

    def _medians(self, histogram: np.ndarray, first_bin: int) -> dict[str, np.ndarray]:
        """Each group's median |W[t−1]| from the parts' ``histogram`` (steps, parts, bins of the magnitudes
        ``first_bin`` on)."""
        medians = {}
        for group in self.parts.names:
            members = self.parts.members[group]
            if members:
                group_histogram = histogram[:, members[0]]
                for index in members[1:]:
                    group_histogram = group_histogram + histogram[:, index]
            else:
                group_histogram = np.zeros((histogram.shape[0], histogram.shape[2]), np.int64)
            medians[group] = medians_from_histograms(group_histogram, first_bin)
        return medians


def name_non_finite(tensor: str, grouped: str | None, columns: int, first_step: int, w_previous, w, m, v,
                    lattices: dict[str, Lattice] | None = None) -> None:
    """Raise a DataError naming the first NaN or Inf of a block of bit patterns (tensor, step, row and column:
    for the embedding token and coordinate); ``lattices`` of its ``value``, ``exp_avg`` and ``exp_avg_sq`` by
    state key (bf16's by default)."""
    lattices = lattices or {}
    row_word, column_word = ("token", "coordinate") if has_token_groups(tensor, grouped) else ("row", "column")
    value_name = "W" if has_token_groups(tensor, grouped) else "value"
    for name, key, bits, first in ((value_name, "value", w_previous[None], first_step - 1),
                                   (value_name, "value", w, first_step),
                                   ("exp_avg", "exp_avg", m, first_step), ("exp_avg_sq", "exp_avg_sq", v, first_step)):
        lattice = lattices.get(key, BF16_LATTICE)
        where = np.argwhere((bits & lattice.magnitude_bits) >= lattice.nonfinite_magnitude)
        if where.size:
            row, element = (int(x) for x in where[0])
            value = float(bits[row, element].view(lattice.values))
            raise DataError(f"{tensor}: {name} is {value} at step {first + row}, "
                            f"{row_word} {element // columns}, {column_word} {element % columns}: "
                            f"the {lattice.label} spacing and AdamW's update are undefined there, so the freeze "
                            "drivers cannot be formed")
    raise AssertionError("the pass met a non-finite value that the check does not find")


def exact_median(values: np.ndarray) -> float:
    """numpy's median of ``values`` (the middle value, or the mean of the two middle values in float64), found
    by partitioning them in their own type: a float32 tensor's magnitudes are not copied to float64."""
    n = values.size
    if n == 0:
        return math.nan
    low, high = (n - 1) // 2, n // 2
    middle = np.partition(values, [low, high])
    return (float(middle[low]) + float(middle[high])) / 2


class LatticePass:
    """The pass of ``DriverPass`` in numpy, for a tensor whose values or moments are not all bf16 (a recorder's
    float16 or float32 parameter): each in its own lattice, the spacing that of W's. Same columns; each row's
    sums are numpy's (pairwise) over the row, the medians numpy's over the group's elements. Rows are taken a
    span of about ``SPAN_ELEMENTS`` elements at a time, so that the float64 temporaries stay small."""

    #: elements formed in float64 at a time
    SPAN_ELEMENTS = 1 << 20

    def __init__(self, tensor: str, groups: dict[str, np.ndarray], columns: int, settings: UpdateSettings,
                 lattices: dict[str, Lattice], grouped: str | None = None):
        """``lattices``: of the tensor's ``value``, ``grad``, ``exp_avg`` and ``exp_avg_sq``."""
        self.tensor, self.parts, self.columns, self.settings = tensor, RowParts(groups), columns, settings
        self.lattices, self.grouped = lattices, grouped
        rows = self.parts.rows
        self.v_exact = np.zeros(rows * columns, dtype=np.float64)  # v = 0 before step 1
        self.row_masks = {group: np.isin(self.parts.part, members) for group, members in self.parts.members.items()}
        step = max(1, self.SPAN_ELEMENTS // max(columns, 1))
        self.spans = [(a, min(a + step, rows)) for a in range(0, rows, step)]

    def _values(self, role: str, bits: np.ndarray) -> np.ndarray:
        return bits.view(self.lattices[role].values).astype(np.float64)

    def block(self, first_step: int, w_previous: np.ndarray, w: np.ndarray, m: np.ndarray, v: np.ndarray,
              g: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        rows, width = self.parts.rows, self.columns
        steps = np.arange(first_step, first_step + len(w))
        updates = [self.settings.at(int(step)) for step in steps]
        sums = np.zeros((len(w), rows, len(SUMS)), np.float64)
        counts = np.zeros((len(w), rows, 2), np.int64)
        medians = {group: np.full(len(w), np.nan) for group in self.parts.names}
        lattice = self.lattices["value"]
        for key, bits in (("value", w_previous[None]), ("value", w), ("exp_avg", m), ("exp_avg_sq", v)):
            if ((bits & self.lattices[key].magnitude_bits) >= self.lattices[key].nonfinite_magnitude).any():
                name_non_finite(self.tensor, self.grouped, width, first_step, w_previous, w, m, v,
                                self.lattices)
        for r, update in enumerate(updates):
            before_row, after_row = (w_previous if r == 0 else w[r - 1]), w[r]
            c1, c2 = bias_corrections(update.count, update.beta1, update.beta2)
            for a, b in self.spans:
                cols = slice(a * width, b * width)
                before, after = before_row[cols], after_row[cols]
                if update.stepped:  # a step that skipped the tensor leaves the exact average as it was
                    gradient = self._values("grad", g[r, cols])
                    if update.coupled_decay:  # Adam's decay joins the gradient the moments see
                        gradient += update.coupled_decay * self._values("value", before)
                    self.v_exact[cols] = update.beta2 * self.v_exact[cols] + (1 - update.beta2) * (gradient * gradient)
                m_value, v_value = self._values("exp_avg", m[r, cols]), self._values("exp_avg_sq", v[r, cols])
                included = m_value != 0
                with np.errstate(divide="ignore", invalid="ignore"):
                    log2_m_hat = np.log2(np.abs(m_value)) - math.log2(c1)
                    log2_denominator = np.log2(np.sqrt(v_value / c2) + update.eps)
                    log2_exact = np.log2(np.sqrt(self.v_exact[cols] / c2) + update.eps)
                # u = −lr·m̂/(√v̂+ε) moves W down where m > 0
                log2_half = half_spacing_exponent(before, m_value > 0, lattice).astype(np.float64)
                ratio = _log2_lr(update) + log2_m_hat - log2_denominator - log2_half
                for column, term in enumerate((ratio, log2_m_hat, log2_denominator, log2_half, log2_exact)):
                    sums[r, a:b, column] = np.where(included, term, 0.0).reshape(b - a, width).sum(axis=1)
                frozen = (before == after) | (((before | after) & lattice.magnitude_bits) == 0)  # ±0: one point
                counts[r, a:b, 0] = included.reshape(b - a, width).sum(axis=1)
                counts[r, a:b, 1] = frozen.reshape(b - a, width).sum(axis=1)
            magnitude = np.abs(before_row.view(lattice.values)).reshape(rows, width)
            for group, mask in self.row_masks.items():
                medians[group][r] = exact_median(magnitude[mask].reshape(-1))
        return group_columns(self.parts, width, steps, sums, counts, medians, updates)


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
    rise of the stall), and where the table has the column ``log2_lr`` (a recorder's lr per step)
    ``learning_rate_bits`` (its fall), which sum to it up to float rounding (``residual_bits``); ``driver``: the
    largest. Steps without a frozen share (a recorder's steps that formed no update) are never the onset.
    """
    steps = np.asarray(columns["step"])
    ratio = np.asarray(columns["mean_log2_ratio"], dtype=np.float64)
    spacing = np.asarray(columns["mean_log2_half_spacing"], dtype=np.float64)
    statistics = (np.asarray(columns["mean_log2_abs_m_hat"], dtype=np.float64)
                  - np.asarray(columns["mean_log2_exact_denominator"], dtype=np.float64))
    stall = np.asarray(columns["v_stall_bits"], dtype=np.float64)
    frozen = np.asarray(columns["frozen_share"], dtype=np.float64)
    terms_of = TERMS if LR_COLUMN not in columns else (*TERMS, LR_TERM)
    result = {"onset_step": None, "peak_step": None, "drop_bits": None, "spacing_bits": None,
              "statistics_bits": None, "v_stall_bits": None, "residual_bits": None, "driver": None,
              "claim_supported": None, "v_stall_bits_last": _number(stall[-1]) if len(stall) else None}
    if LR_COLUMN in columns:
        result[f"{LR_TERM}_bits"] = None
        formed = np.flatnonzero(np.isfinite(stall))
        result["v_stall_bits_last"] = _number(stall[formed[-1]]) if formed.size else None
    with np.errstate(invalid="ignore"):  # NaN: a step that formed no update
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
    if LR_COLUMN in columns:
        log2_lr = np.asarray(columns[LR_COLUMN], dtype=np.float64)
        terms[LR_TERM] = log2_lr[peak] - log2_lr[onset]
    drop = ratio[peak] - ratio[onset]
    driver = max(terms_of, key=lambda term: terms[term]) if peak != onset else None
    return {**result, "onset_step": int(steps[onset]), "peak_step": int(steps[peak]), "drop_bits": _number(drop),
            **{f"{term}_bits": _number(value) for term, value in terms.items()},
            "residual_bits": _number(drop - sum(terms.values())), "driver": driver,
            "claim_supported": None if driver is None else driver == "v_stall"}


def answer(group: str, drivers: dict, moments: str = "bf16", optimizer: str = "AdamW") -> str:
    """One sentence: which term drove the group's onset and how much the stall adds by the end (``moments``: the
    lattice exp_avg_sq is kept in; ``optimizer``: whose exact arithmetic it is held against)."""
    last = drivers["v_stall_bits_last"]
    stall = "" if last is None else f"; by the last step {moments}'s exp_avg_sq holds the denominator {last:.2f} " \
                                    f"bits above exact {optimizer}'s"
    if drivers["onset_step"] is None:
        return f"{group}: never more than half of its elements frozen at one step, so no onset{stall}"
    if drivers["driver"] is None:
        return f"{group}: more than half frozen already at step {drivers['onset_step']} (no drop to split){stall}"
    terms = ", ".join(f"{term} {drivers[f'{term}_bits']:.2f}" for term in (*TERMS, LR_TERM)
                      if drivers.get(f"{term}_bits") is not None)
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


def table_columns(per_step_lr: bool) -> tuple[str, ...]:
    """freeze_drivers.csv's columns after ``step`` and ``group``: COLUMNS, and ``log2_lr`` where lr is a
    recorder's, per step."""
    return (*COLUMNS, LR_COLUMN) if per_step_lr else COLUMNS


def as_written(parts: dict[str, list[dict]]) -> dict[str, dict[str, np.ndarray]]:
    """Each group's columns over every step, joined from its blocks' ``parts``, the log2 means rounded as
    freeze_drivers.csv holds them (the answer is computed from the table as written)."""
    first = next(iter(parts.values()))[0] if parts and next(iter(parts.values())) else {}
    names = table_columns(LR_COLUMN in first)
    tables = {group: {name: np.concatenate([part[name] for part in group_parts]) for name in ("step", *names)}
              for group, group_parts in parts.items()}
    for table in tables.values():
        table.update({name: significant(table[name]) for name in LOG2_COLUMNS})
        if LR_COLUMN in table:
            table[LR_COLUMN] = significant(table[LR_COLUMN])
    return tables


def step_major(tensor: str, tables: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """freeze_drivers.csv's rows of one tensor from its groups' tables: each step's groups together (the
    embedding's dead, live and all), in the order of ``tables``."""
    groups = list(tables)
    steps = tables[groups[0]]["step"]
    frame = {"tensor": np.full(len(steps) * len(groups), tensor, dtype=object),
             "step": np.repeat(steps, len(groups)), "group": np.tile(np.array(groups, dtype=object), len(steps))}
    frame.update({name: np.stack([tables[group][name] for group in groups], axis=1).reshape(-1)
                  for name in table_columns(LR_COLUMN in tables[groups[0]])})
    return frame


def tensor_drivers(tables: dict[str, dict[str, np.ndarray]], moments: str = "bf16",
                   optimizer: str = "AdamW") -> dict[str, dict]:
    """Per group of one tensor, from its tables as written: the onset, what drove it and the answer in words
    (``answer``'s ``moments`` and ``optimizer``)."""
    result = {group: drivers_of(table) for group, table in tables.items()}
    for group, drivers in result.items():
        drivers["answer"] = answer(group, drivers, moments, optimizer)
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


#: each role's state key, by which a tensor's stored lattice is found (``thimble.analysis.tensors.stored_lattice``)
ROLE_KEYS = {"W": "value", "momentum_W": "exp_avg", "variance_W": "exp_avg_sq", "grad_W": "grad"}


def group_blocks(handle, param, groups: dict[str, np.ndarray], hyper: dict | UpdateSettings, pool,
                 block_rows: int, grouped: str | None = EMBEDDING,
                 exact_from_start: bool = False) -> dict[str, list[dict]]:
    """The pass over one recorded parameter ``param`` (``RecordedParam``) of the open recording ``handle``, a
    block of steps at a time, its rows in ``groups``: per group, each block's columns. The compiled pass where
    its value and moments are bf16, else ``LatticePass`` in their own lattices. ``exact_from_start``: the exact
    average starts from the recorded exp_avg_sq of step 0 (a recorder attached to an optimizer that already held
    its state), not from 0."""
    from tqdm.auto import tqdm

    from thimble.analysis.tensors import stored_lattice
    from thimble.record.reader import RecordedTensor, aligned_blocks

    roles = param.require_roles(handle.filename, ROLES, "the freeze drivers need its value, gradient and both "
                                                       "moments")
    tensors = {role: RecordedTensor.of_recording(handle, roles[role]) for role in ROLES}
    n_steps = tensors["W"].shape[0]
    _, columns = row_shape(param.shape)
    out: dict[str, list[dict]] = {group: [] for group in groups}
    lattices = {key: stored_lattice(handle.attrs, param, key) for key in ROLE_KEYS.values()}
    if all(lattice is BF16_LATTICE for lattice in lattices.values()):
        analysis = DriverPass(param.name, groups, columns, hyper, pool, block_rows, grouped)
    else:
        analysis = LatticePass(param.name, groups, columns, hyper, lattices, grouped)
    previous = None
    with tqdm(total=n_steps - 1, desc=f"freeze drivers {param.name}", unit="step", mininterval=5) as bar:
        for first, block in aligned_blocks(tensors, block_rows, pool):
            block = {name: rows.reshape(len(rows), -1) for name, rows in block.items()}  # (steps, rows·columns)
            if previous is None:  # step 0: the initial W; its moments and gradient are empty
                previous = block["W"][0]
                if exact_from_start:
                    analysis.v_exact[...] = block["variance_W"][0].view(lattices["exp_avg_sq"].values)
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


def tensor_tables(recording: str, hyper: dict | None, threads: int, block_rows: int):
    """Every recorded parameter one after another, the embedding first, then in the model's order: (its
    ``RecordedParam``, its groups' tables as written). Only one tensor's buffers are held at a time.

    ``hyper``: AdamW's settings (the seed's); None for a recorder's recording, whose settings are each step's and
    each tensor's: a tensor the split does not apply to comes as (its ``RecordedParam``, why, a string)."""
    from thimble.analysis.tensors import grouped_first, recorded_params, token_groups_param
    from thimble.record.format import open_h5, read_checked
    from thimble.util.workers import WorkerPool

    with open_h5(recording) as handle, WorkerPool(max(threads, 1)) as pool:
        grouped = token_groups_param(handle.attrs)
        params = grouped_first(recorded_params(handle), grouped)
        dead = None
        if any(has_token_groups(param.name, grouped) for param in params):
            if "dead_mask" not in handle:
                raise DataError(f"{recording} has no dead_mask dataset: {grouped}'s dead and live groups come from "
                                "it; rechunk the stream again with thimble rechunk")
            dead = read_checked(handle["dead_mask"]).astype(bool)
        for param in params:
            groups = row_groups(param.name, row_shape(param.shape)[0], dead, grouped)
            if hyper is not None:
                yield param, as_written(group_blocks(handle, param, groups, hyper, pool, block_rows))
                continue
            settings, why = recorder_settings(handle, param)
            if why is not None:
                yield param, why
                continue
            from_start = handle.attrs.get("initial_state") == "as_found"
            yield param, as_written(group_blocks(handle, param, groups, settings, pool, block_rows, grouped,
                                                 from_start))


#: the optimizers whose update the split is of, by their class (a recording's attribute optimizer_class)
ADAM_CLASSES = ("torch.optim.adamw.AdamW", "torch.optim.adam.Adam")


def recorder_settings(handle, param) -> tuple[UpdateSettings | None, str | None]:
    """A recorder's tensor's settings at each step, or why the split does not apply to it: its optimizer is not
    torch's Adam or AdamW, it has not both moments, amsgrad or maximize is on, or it was never stepped."""
    from thimble.analysis.tensors import step_settings

    optimizer = str(handle.attrs.get("optimizer_class", "an unnamed optimizer"))
    if optimizer not in ADAM_CLASSES:
        kind = ("SGD's update is lr times the gradient (or its momentum_buffer), with no denominator that "
                "could stall") if optimizer.endswith(".SGD") else f"{optimizer} forms its update otherwise"
        return None, (f"the split is of the update of torch's Adam and AdamW, u = −lr·m̂/(√v̂+ε), against half "
                      f"the spacing of W; {kind}")
    state = sorted(key for key in param.paths if key not in ("value", "grad"))
    missing = [key for key in ("exp_avg", "exp_avg_sq") if key not in param.paths]
    if missing:
        return None, (f"{param.name} is recorded without {' and '.join(missing)} (its optimizer state: "
                      f"{', '.join(state) or 'none'}), of which AdamW's update is made")
    settings = step_settings(handle, param.name)
    for flag, why in (("amsgrad", "amsgrad: the update divides by max_exp_avg_sq, the largest exp_avg_sq so "
                                  "far, not by exp_avg_sq"),
                      ("maximize", "maximize: the update ascends the gradient, u = +lr·m̂/(√v̂+ε)")):
        values = settings.get(flag)
        if values is not None and (values[1:] == 1).any():
            return None, why
    if not settings.stepped[1:].any():
        return None, (f"the optimizer never stepped {param.name} (it never had a gradient): no update was formed, "
                      "and it never moved")
    decoupled = settings.get("decoupled_weight_decay")
    adam_l2 = optimizer == "torch.optim.adam.Adam" and (decoupled is None or not (decoupled[1:] == 1).all())
    return UpdateSettings.of_steps(settings, adam_l2), None


def write_drivers(recording: str, table_path: str, summary_path: str, threads: int = 1,
                  block_rows: int = BLOCK_ROWS) -> dict:
    """freeze_drivers.csv (per tensor, step and group) and its per-group answer (JSON, summary.json's
    ``drivers``): the top level for the embedding (the first recorded tensor when the embedding is not
    recorded, ``question_tensor``), every tensor's under ``tensors``."""
    import pandas as pd

    from thimble.record.format import made_by_recorder, open_h5
    from thimble.util.files import atomic_output, write_json
    from thimble.util.tables import write_csv

    with open_h5(recording) as handle:
        attrs = dict(handle.attrs)
    if made_by_recorder(attrs):
        return write_recorder_drivers(recording, attrs, table_path, summary_path, threads, block_rows)
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


RECORDER_DEFINITION = (
    "per step t: u = −lr·m̂/(√v̂+ε) from the recorded exp_avg[t], exp_avg_sq[t] with the lr, betas and eps of the "
    "tensor's param group at step t (the recording's hyperparameters table) and its own step count in the bias "
    "corrections (param_steps), and h = half the spacing of W[t−1] toward u in W's own lattice (bf16, float16 or "
    "float32); means over the group's elements with exp_avg ≠ 0; the exact denominator from v ← β2·v + (1−β2)·g² "
    "(float64, from v = 0 before step 1, or from the recorded exp_avg_sq at step 0 when the optimizer already held "
    "state; with torch's Adam's coupled weight decay g + λ·W[t−1]) of the recorded gradients, advanced at the "
    "steps that stepped the tensor; a step that did not step the tensor, or used lr 0, forms no update: its row "
    "is empty (elements 0); onset: the first step more than half of the group's elements have W[t] = W[t−1]; "
    "peak: the largest mean log2(|u|/h) from step 1 to the onset; drop_bits = spacing_bits + statistics_bits + "
    "v_stall_bits + learning_rate_bits (the fall of log2 lr; residual_bits: float rounding); the lab's claim is "
    "supported where the driver is v_stall")


def write_recorder_drivers(recording: str, attrs: dict, table_path: str, summary_path: str, threads: int,
                           block_rows: int) -> dict:
    """``write_drivers`` for a loop recorded by ``thimble.Recorder``: each tensor the split applies to (torch's
    Adam or AdamW, both moments) with its per-step settings; freeze_drivers.json's ``not_applicable`` says for
    which tensors it does not, and why (``applies`` false, with ``why``, when it applies to none). The top level
    describes the question tensor (the one with token groups, else the first recorded) when the split applies to
    it; the table has the column ``log2_lr``."""
    import pandas as pd

    from thimble.analysis.tensors import stored_lattice
    from thimble.record.format import RECORDER as RECORDER_SOURCE
    from thimble.util.files import atomic_output, write_json

    optimizer = str(attrs.get("optimizer_class", "unknown optimizer"))
    result = {"applies": False, "recorded_by": RECORDER_SOURCE, "update_rule": optimizer, "inputs_exact": True,
              "definition": RECORDER_DEFINITION, "question_tensor": None}
    every, skipped = {}, {}
    with atomic_output(table_path) as tmp, open(tmp, "w", newline="") as table:
        header = True
        for param, tables in tensor_tables(recording, None, threads, block_rows):
            name = param.name
            if result["question_tensor"] is None:
                result["question_tensor"] = name
            if isinstance(tables, str):
                skipped[name] = tables
                log.info("freeze drivers: %s: not computed: %s", name, tables)
                continue
            pd.DataFrame(step_major(name, tables)).to_csv(table, header=header, index=False)
            header = False
            every[name] = tensor_drivers(tables, stored_lattice(attrs, param, "exp_avg_sq").label,
                                         optimizer.rsplit(".", 1)[-1])
            if name == result["question_tensor"]:
                result.update(every[name])
            log.info("freeze drivers: %s (%d x %d): %s", name, *row_shape(param.shape),
                     " | ".join(drivers["answer"] for drivers in every[name].values()))
        if header:  # no tensor the split applies to: the table's columns alone
            pd.DataFrame(columns=["tensor", "step", "group", *table_columns(True)]).to_csv(table, index=False)
    if result["question_tensor"] is None:
        raise DataError(f"{recording} records no parameter (its recorded_params attribute is empty)")
    result["applies"] = bool(every)
    if not every:
        reasons = list(dict.fromkeys(skipped.values()))
        result["why"] = reasons[0] if len(reasons) == 1 else "; ".join(f"{name}: {why}" for name, why in
                                                                      skipped.items())
    result["tensors"] = every
    if skipped:
        result["not_applicable"] = skipped
    if every and optimizer == "torch.optim.adamw.AdamW":
        result["note"] = ("AdamW's decoupled decay W·(1 − lr·λ) is applied before the update and is not part of u "
                          "(the weight_decay of each step is in the recording's hyperparameters table)")
    write_json(summary_path, result, indent=2)
    return result
