"""Freeze/thaw analysis of the recorded W: tables, windows, and the verdicts.

A token is frozen at step t when ΔW′[t] is 0 in all D coordinates; a group
(dead, live, all) is globally frozen at t when every token in it is. Each group
is followed by three measures: the globally frozen share of steps, the share of
its tokens that are frozen, and the share of its elements (token x coordinate)
that are frozen.

A move's phase follows its *motion*: |ΔW| in units of the coarser of the two
lattice spacings at W[t-1] and W[t]. Within one binade this is |ΔW′| exactly;
a move across binades counts in the coarser binade's steps, and a move through
zero (which walks ~3e4 lattice points near 0) counts its size in the spacing
of its larger end, so a sign crossing of a tiny weight is not "hot". Phases of a
token: frozen (ΔW′ = 0), solid (motion up to solid_max), cold (up to cold_max),
hot (above). The lab's own coordinate, ΔW in units of the spacing at the
starting value W[t-1], is kept beside it; sign and binade crossings are counted
apart.

The core works on per-step, per-token summaries (``TokenSteps``) and per-step,
per-group counts, which one streaming pass over W produces; everything else is
pure functions of them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from thimble.numerics.bf16 import BFLOAT16
from thimble.numerics.lattice import (
    EXPONENT_BIAS,
    EXPONENT_SHIFT,
    MAGNITUDE_BITS,
    MANTISSA_BITS,
    SIGN_BIT,
    ordinal,
    ulp,
)
from thimble.outputs import DELTA_W_DATASET, FREEZE_OUTPUTS, TOKEN_TEXT_COLUMN
from thimble.update_rules import rule_of
from thimble.util.tables import write_csv

if TYPE_CHECKING:
    from thimble.record.reader import RecordedTensor

log = logging.getLogger(__name__)

GROUPS = ("dead", "live", "all")
PHASES = ("frozen", "solid", "cold", "hot")


class Measure(NamedTuple):
    """One measure of a group's freezing."""

    column: str  # freeze.csv's column behind it, per group ({group}_{column}): a flag or share per step
    label: str   # what it is, in words (the figures' axes)


#: the measures each group's verdict is given for
MEASURES = {"global_freeze": Measure("globally_frozen", "globally frozen share of steps"),
            "token_frozen": Measure("frozen_token_share", "frozen share of tokens"),
            "element_frozen": Measure("frozen_element_share", "frozen share of elements")}
#: each measure's key in a window's statistics (the summary's ``windows``): its mean over the window
WINDOW_SHARES = {name: f"{name}_share" for name in MEASURES}
VERDICTS = ("never frozen", "still cooling", "stabilised", "thawing", "inconclusive")
#: a trend needs at least this many windows in the last half (a t interval with 2 degrees of freedom)
MIN_TREND_WINDOWS = 4
#: biased exponent fields of bf16 (the k of ±2^k is the field minus EXPONENT_BIAS)
EXPONENT_FIELDS = (int(MAGNITUDE_BITS) >> EXPONENT_SHIFT) + 1


@dataclasses.dataclass
class TokenSteps:
    """Per-step summaries, rows t = 0..T (row 0 is the start: nothing moved)."""

    max_abs: np.ndarray        # (T+1, V) int32: largest |ΔW′| of each token (lattice steps)
    norm: np.ndarray           # (T+1, V) float32: L2 norm of each token's ΔW′ (lattice steps)
    oscillatory: np.ndarray    # (T+1, V) int32: coordinates with ΔW′[t] = -ΔW′[t-1] != 0 (an exact undo)
    quantum: np.ndarray        # (T+1, V) int32: other coordinates with |ΔW′| = 1 (one lattice step)
    moved: np.ndarray          # (T+1, V) int32: coordinates with ΔW′ != 0
    motion: np.ndarray         # (T+1, V) float32: largest |ΔW| / coarser endpoint spacing (phases)
    start_spacings: np.ndarray  # (T+1, V) float32: largest |ΔW| / spacing at W[t-1] (the lab's coordinate)
    sign_crossings: np.ndarray  # (T+1, V) int32: coordinates whose sign flipped (both ends nonzero)
    binade_crossings: np.ndarray  # (T+1, V) int32: other moves that changed the exponent
    # per step and side (0 dead, 1 live): frozen elements, and those sitting exactly at ±2^k by exponent field
    frozen_elements: np.ndarray  # (T+1, 2) int64
    frozen_at_power_of_two: np.ndarray  # (T+1, 2, EXPONENT_FIELDS) int64
    hidden: int = 1            # D: coordinates per token

    @property
    def last_step(self) -> int:
        return self.max_abs.shape[0] - 1


#: TokenSteps' per-token fields and their dtypes
TOKEN_FIELDS = {"max_abs": np.int32, "norm": np.float32, "oscillatory": np.int32, "quantum": np.int32,
                "moved": np.int32, "motion": np.float32, "start_spacings": np.float32, "sign_crossings": np.int32,
                "binade_crossings": np.int32}
#: the TokenSteps fields token_displacement.h5 holds beside the dead mask
DISPLACEMENT_FIELDS = ("max_abs", "norm", "motion", "start_spacings")


def summarise_block(delta: np.ndarray, previous: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per-row, per-token summaries of a block of ΔW′ rows (rows, V, D); ``previous`` is the row before."""
    magnitude = np.abs(delta.astype(np.int32))
    before = np.concatenate([previous[None], delta[:-1]]) if previous is not None else \
        np.concatenate([np.zeros_like(delta[:1]), delta[:-1]])
    nonzero = delta != 0
    undo = nonzero & (delta == -before)
    return {
        "max_abs": magnitude.max(axis=2),
        "norm": np.sqrt((magnitude.astype(np.float32) ** 2).sum(axis=2)),
        "oscillatory": np.count_nonzero(undo, axis=2).astype(np.int32),
        "quantum": np.count_nonzero((magnitude == 1) & ~undo, axis=2).astype(np.int32),
        "moved": np.count_nonzero(nonzero, axis=2).astype(np.int32),
    }


def summarise_w_block(bits: np.ndarray, previous: np.ndarray, previous_delta: np.ndarray | None,
                      dead: np.ndarray, delta: np.ndarray | None = None
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Summaries of W rows ``bits`` (rows, V, D) uint16 after the row ``previous`` (V, D).

    ``delta`` is ΔW′ of these rows (int32, as the lattice stage stored it), computed here from W when not
    given; ``previous_delta`` is ΔW′ of ``previous`` (for exact undos); ``dead`` (V,) marks the dead tokens.
    Returns the per-token fields of TokenSteps and the per-side (dead, live) element counts.
    """
    both = np.concatenate([previous[None], bits])
    if delta is None:
        signed = ordinal(both)
        delta = signed[1:] - signed[:-1]
    tokens = summarise_block(delta, previous_delta)
    before, after = both[:-1], both[1:]
    spacing_before, spacing_after = ulp(before, np.float32), ulp(after, np.float32)
    size = np.abs(after.view(BFLOAT16).astype(np.float32) - before.view(BFLOAT16).astype(np.float32))
    tokens["motion"] = (size / np.maximum(spacing_before, spacing_after)).max(axis=2)
    tokens["start_spacings"] = (size / spacing_before).max(axis=2)
    moved = delta != 0
    signs_differ = ((before ^ after) & SIGN_BIT) != 0
    crossed_sign = signs_differ & ((before & MAGNITUDE_BITS) != 0) & ((after & MAGNITUDE_BITS) != 0)
    crossed_binade = moved & ~crossed_sign & ((before >> EXPONENT_SHIFT) != (after >> EXPONENT_SHIFT))
    tokens["sign_crossings"] = np.count_nonzero(crossed_sign, axis=2).astype(np.int32)
    tokens["binade_crossings"] = np.count_nonzero(crossed_binade, axis=2).astype(np.int32)
    return tokens, frozen_counts(after, ~moved, dead)


def frozen_counts(after: np.ndarray, frozen: np.ndarray, dead: np.ndarray) -> dict[str, np.ndarray]:
    """Per row and side (0 dead, 1 live): the ``frozen`` elements of W rows ``after`` (rows, V, D), and those
    sitting exactly at ±2^k, by exponent field."""
    # exactly ±2^k: a normal value with a zero mantissa
    field = ((after & MAGNITUDE_BITS) >> EXPONENT_SHIFT).astype(np.int64)
    at_power = frozen & ((after & MANTISSA_BITS) == 0) & (field > 0)
    rows = len(after)
    counts = {"frozen_elements": np.zeros((rows, 2), np.int64),
              "frozen_at_power_of_two": np.zeros((rows, 2, EXPONENT_FIELDS), np.int64)}
    row_index = np.arange(rows)[:, None, None] * EXPONENT_FIELDS
    for side, mask in enumerate((dead, ~dead)):
        counts["frozen_elements"][:, side] = np.count_nonzero(frozen[:, mask], axis=(1, 2))
        selected = at_power[:, mask]
        keys = (row_index + field[:, mask])[selected]
        counts["frozen_at_power_of_two"][:, side] = np.bincount(
            keys, minlength=rows * EXPONENT_FIELDS).reshape(rows, EXPONENT_FIELDS)
    return counts


def token_steps_from_w(w_bits: np.ndarray, dead: np.ndarray) -> TokenSteps:
    """TokenSteps of a whole in-memory W (T+1, V, D) of bf16 bit patterns (row 0: nothing moved)."""
    tokens, counts = summarise_w_block(w_bits[1:], w_bits[0], None, np.asarray(dead, bool))
    zero_token = {name: np.zeros((1, *values.shape[1:]), values.dtype) for name, values in tokens.items()}
    zero_count = {name: np.zeros((1, *values.shape[1:]), values.dtype) for name, values in counts.items()}
    joined = {name: np.concatenate([zero_token[name], values]) for name, values in tokens.items()}
    joined.update({name: np.concatenate([zero_count[name], values]) for name, values in counts.items()})
    return TokenSteps(**joined, hidden=w_bits.shape[2])


def group_masks(dead_mask: np.ndarray) -> dict[str, np.ndarray]:
    dead = np.asarray(dead_mask, dtype=bool)
    return {"dead": dead, "live": ~dead, "all": np.ones_like(dead)}


def phase_of(max_abs: np.ndarray, motion: np.ndarray, solid_max: int, cold_max: int) -> np.ndarray:
    """Phase index (0 frozen, 1 solid, 2 cold, 3 hot): frozen when ΔW′ = 0, else by motion."""
    moving = np.digitize(motion, [solid_max, cold_max], right=True) + 1
    return np.where(max_abs == 0, 0, moving)


def runs(flags: np.ndarray, steps: np.ndarray) -> list[tuple[bool, int, int]]:
    """Maximal runs of equal values in ``flags`` as (value, first step, last step)."""
    if flags.size == 0:
        return []
    edges = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges - 1, [flags.size - 1]])
    return [(bool(flags[s]), int(steps[s]), int(steps[e])) for s, e in zip(starts, ends)]


def longest_true_run(flags: np.ndarray, steps: np.ndarray) -> tuple[int, int | None]:
    """(length, last step) of the longest run of True; the latest one on ties; (0, None) if none."""
    best = (0, None)
    for value, first, last in runs(flags, steps):
        if value and last - first + 1 >= best[0]:
            best = (last - first + 1, last)
    return best


def completed_cycles(flags: np.ndarray) -> int:
    """Freeze -> thaw transitions: frozen runs that ended in a thaw (an open final run is not one)."""
    flags = np.asarray(flags, dtype=bool)
    return int(np.count_nonzero(flags[:-1] & ~flags[1:]))


def open_run(flags: np.ndarray) -> int:
    """Length of the frozen run that reaches the last step (0 when the last step is not frozen)."""
    flags = np.asarray(flags, dtype=bool)
    if flags.size == 0 or not flags[-1]:
        return 0
    thawed = np.flatnonzero(~flags)
    return int(flags.size - 1 - thawed[-1]) if thawed.size else int(flags.size)


def freeze_table(steps: TokenSteps, groups: dict[str, np.ndarray], losses: np.ndarray, solid_max: int,
                 cold_max: int) -> dict[str, np.ndarray]:
    """Columns of freeze.csv, rows t = 1..T (shares are fractions 0-1)."""
    t = np.arange(1, steps.max_abs.shape[0])
    max_abs = steps.max_abs[1:]
    phase = phase_of(max_abs, steps.motion[1:], solid_max, cold_max)
    frozen_elements = {"dead": steps.frozen_elements[1:, 0], "live": steps.frozen_elements[1:, 1]}
    frozen_elements["all"] = frozen_elements["dead"] + frozen_elements["live"]
    columns: dict[str, np.ndarray] = {"step": t, "loss": losses[1:]}
    for group in GROUPS:
        mask = groups[group]
        size = int(mask.sum())
        moved = (max_abs[:, mask] > 0).sum(axis=1)
        columns[f"{group}_moved_tokens"] = moved
        columns[f"{group}_frozen_token_share"] = 1 - moved / size if size else np.full(t.size, np.nan)
        columns[f"{group}_frozen_element_share"] = (frozen_elements[group] / (size * steps.hidden) if size
                                                    else np.full(t.size, np.nan))
        columns[f"{group}_globally_frozen"] = moved == 0
        for index, name in enumerate(PHASES):
            columns[f"{group}_phase_{name}"] = (phase[:, mask] == index).sum(axis=1)
    return columns


def cycles_table(columns: dict[str, np.ndarray]) -> list[dict]:
    """freeze_cycles.csv: per group, the stretch before the first global freeze ('not yet frozen'),
    each globally frozen run ('freeze', ``thawed`` False for an open final run) and the thaws between."""
    rows = []
    for group in GROUPS:
        seen_freeze = False
        group_runs = runs(columns[f"{group}_globally_frozen"], columns["step"])
        for index, (frozen, first, last) in enumerate(group_runs):
            seen_freeze |= frozen
            kind = "freeze" if frozen else "thaw" if seen_freeze else "not yet frozen"
            rows.append({"group": group, "kind": kind, "start": first, "end": last, "length": last - first + 1,
                         "thawed": (index + 1 < len(group_runs)) if frozen else None})
    return rows


def default_windows(last_step: int, extra: list[list[int]]) -> dict[str, tuple[int, int]]:
    """Named inclusive windows: the whole run, its last half, its last third, and the config's."""
    windows = {
        "all": (1, last_step),
        "last_half": (last_step - last_step // 2 + 1, last_step),
        "last_third": (last_step - last_step // 3 + 1, last_step),
    }
    for start, end in extra:
        windows[f"t{start}-{end}"] = (start, end)
    return {name: (a, b) for name, (a, b) in windows.items() if a <= b}


def window_stats(columns: dict[str, np.ndarray], groups: dict[str, np.ndarray], window: tuple[int, int]) -> dict:
    """The seed's statistics for one window, per group; shares are fractions 0-1."""
    start, end = window
    t = columns["step"]
    inside = (t >= start) & (t <= end)
    out = {}
    for group in GROUPS:
        mean = {name: float(columns[f"{group}_{measure.column}"][inside].mean()) if inside.any() else None
                for name, measure in MEASURES.items()}
        globally = columns[f"{group}_globally_frozen"][inside]
        length, ended = longest_true_run(globally, t[inside])
        out[group] = {
            "tokens": int(groups[group].sum()),
            # the global freeze's share leads its own run statistics
            WINDOW_SHARES["token_frozen"]: mean["token_frozen"],
            WINDOW_SHARES["element_frozen"]: mean["element_frozen"],
            WINDOW_SHARES["global_freeze"]: mean["global_freeze"],
            "global_freeze_steps": int(globally.sum()),
            "steps": int(globally.size),
            "freeze_thaw_cycles": completed_cycles(globally),
            "open_frozen_run": open_run(globally),
            "longest_frozen_run": length,
            "longest_frozen_run_ended_at": ended,
        }
    return out


def token_table(steps: TokenSteps, groups: dict[str, np.ndarray], windows: dict[str, tuple[int, int]],
                token_text: list[str] | None = None) -> dict:
    """token_freeze.csv columns: one row per token (with its text as the tokenizer decodes it, when given)."""
    vocab = steps.max_abs.shape[1]
    frozen = steps.max_abs == 0
    t = np.arange(steps.max_abs.shape[0])
    moved_any = ~frozen[1:]
    last_moved = np.where(moved_any.any(axis=0), moved_any.shape[0] - np.argmax(moved_any[::-1], axis=0), 0)
    longest = np.empty(vocab, dtype=np.int64)
    for token in range(vocab):
        longest[token] = longest_true_run(frozen[1:, token], t[1:])[0]
    columns = {"token": np.arange(vocab)}
    if token_text is not None:
        columns[TOKEN_TEXT_COLUMN] = token_text
    columns["group"] = np.where(groups["dead"], "dead", "live")
    for name, (start, end) in windows.items():
        columns[f"frozen_share_{name}"] = frozen[start:end + 1].mean(axis=0)
    columns["last_moved_step"] = last_moved
    columns["longest_frozen_run"] = longest
    return columns


def displacement_table(steps: TokenSteps, groups: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """displacement_classes.csv: per step and group, coordinate moves that exactly undo the previous
    move ('oscillatory'), the other single lattice steps ('quantum'), the rest ('other'); and, counted
    apart, moves through zero (sign crossings) and other moves into another binade."""
    columns: dict[str, np.ndarray] = {"step": np.arange(1, steps.max_abs.shape[0])}
    for group in GROUPS:
        mask = groups[group]
        moved = steps.moved[1:, mask].sum(axis=1)
        oscillatory = steps.oscillatory[1:, mask].sum(axis=1)
        quantum = steps.quantum[1:, mask].sum(axis=1)
        columns[f"{group}_moves"] = moved
        columns[f"{group}_oscillatory"] = oscillatory
        columns[f"{group}_quantum"] = quantum
        columns[f"{group}_other"] = moved - oscillatory - quantum
        columns[f"{group}_sign_crossings"] = steps.sign_crossings[1:, mask].sum(axis=1)
        columns[f"{group}_binade_crossings"] = steps.binade_crossings[1:, mask].sum(axis=1)
    return columns


def lattice_position_table(steps: TokenSteps) -> dict[str, np.ndarray]:
    """lattice_positions.csv: per step and group, the share of frozen elements sitting exactly at
    ±2^k, in all and by k (the k that occur anywhere in the run)."""
    counts = steps.frozen_at_power_of_two[1:]
    frozen = steps.frozen_elements[1:]
    by_group = {"dead": (counts[:, 0], frozen[:, 0]), "live": (counts[:, 1], frozen[:, 1]),
                "all": (counts.sum(axis=1), frozen.sum(axis=1))}
    fields = np.flatnonzero(counts.sum(axis=(0, 1)))
    columns: dict[str, np.ndarray] = {"step": np.arange(1, steps.max_abs.shape[0])}
    with np.errstate(invalid="ignore", divide="ignore"):
        for group, (at_power, total) in by_group.items():
            columns[f"{group}_frozen_elements"] = total
            columns[f"{group}_at_power_of_two_share"] = np.where(total > 0, at_power.sum(axis=1) / total, np.nan)
            for field in fields:
                columns[f"{group}_at_2^{int(field) - EXPONENT_BIAS}_share"] = np.where(
                    total > 0, at_power[:, field] / total, np.nan)
    return columns


def trend(fractions: np.ndarray, centers: np.ndarray) -> dict:
    """Least-squares slope of fractions vs step with a 95% confidence interval (t distribution)."""
    from scipy import stats

    n = fractions.size
    if n < MIN_TREND_WINDOWS:
        return {"windows": int(n), "slope_per_1000_steps": None, "ci95": None}
    fit = stats.linregress(centers, fractions)
    t_crit = stats.t.ppf(0.975, n - 2)
    # a perfect fit (all windows equal, say) has no spread: its interval is the slope itself
    half = t_crit * fit.stderr if np.isfinite(fit.stderr) else 0.0
    return {"windows": int(n), "slope_per_1000_steps": 1000 * fit.slope,
            "ci95": [1000 * (fit.slope - half), 1000 * (fit.slope + half)], "intercept": fit.intercept}


def verdict(trend_fit: dict, last_half: np.ndarray, ever_frozen: bool, tolerance_per_1000: float) -> str:
    """The verdict on one measure of one group (the rule is VERDICT_RULE):

    'never frozen' when nothing in the group was ever frozen; 'stabilised' when the last half is fully
    frozen, or its trend is surely flat (95% CI within ±tolerance per 1000 steps) at a level above 0;
    'still cooling' when the trend is surely rising (CI above 0); 'thawing' when it is surely falling
    (CI below 0) or fell back to nothing; else (or with too few windows) 'inconclusive'.
    """
    if not ever_frozen:
        return "never frozen"
    if last_half.size and (last_half >= 1.0).all():
        return "stabilised"
    if trend_fit["ci95"] is None:
        return "inconclusive"
    low, high = trend_fit["ci95"]
    if low > 0:
        return "still cooling"
    if high < 0 or (last_half == 0).all():
        return "thawing"
    if -tolerance_per_1000 <= low and high <= tolerance_per_1000:
        return "stabilised"
    return "inconclusive"


def verdict_rule(tolerance_per_1000: float, window_steps: int) -> dict:
    return {
        "windows": f"each measure is averaged over consecutive windows of {window_steps} steps; the trend is a "
                   f"least-squares line through the windows whose centre lies in the last half of the run, "
                   f"with a 95% t confidence interval of its slope (at least {MIN_TREND_WINDOWS} windows)",
        "never frozen": "the measure is 0 at every step of the run",
        "stabilised": f"the last half is fully frozen, or the slope's 95% CI lies within ±{tolerance_per_1000} "
                      "per 1000 steps and the last half is not all 0 (a frozen ground state)",
        "still cooling": "the slope's 95% CI lies above 0",
        "thawing": "the slope's 95% CI lies below 0, or the measure fell back to 0 in every window of the last half",
        "inconclusive": "none of the above (a wide interval, or too few windows)",
        "tolerance_per_1000_steps": tolerance_per_1000,
        "window_steps": window_steps,
        "min_windows": MIN_TREND_WINDOWS,
    }


def windowed_mean(values: np.ndarray, steps: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values`` in consecutive windows of ``width`` steps; (centers, means)."""
    n = values.size // width
    if n == 0:
        return np.array([]), np.array([])
    means = np.asarray(values[: n * width], dtype=np.float64).reshape(n, width).mean(axis=1)
    centers = steps[: n * width].reshape(n, width).mean(axis=1)
    return centers, means


def cooling(columns: dict[str, np.ndarray], width: int, tolerance_per_1000: float) -> dict:
    """Per group and measure: the windowed series, the last half's trend, and the verdict."""
    last_step = int(columns["step"][-1])
    out = {}
    for group in GROUPS:
        out[group] = {}
        for name, measure in MEASURES.items():
            values = np.nan_to_num(np.asarray(columns[f"{group}_{measure.column}"], dtype=np.float64))
            centers, means = windowed_mean(values, columns["step"], width)
            half = centers > last_step / 2
            fit = trend(means[half], centers[half])
            out[group][name] = {
                "window_centers": centers.tolist(),
                "fractions": means.tolist(),
                "trend_last_half": fit,
                "verdict": verdict(fit, means[half], bool((values > 0).any()), tolerance_per_1000),
            }
    return out


def variance_table(token_mean: np.ndarray, changed: np.ndarray, hidden: int, groups: dict[str, np.ndarray],
                   beta1: float, beta2: float) -> dict[str, np.ndarray]:
    """exp_avg_sq.csv from each token's mean exp_avg_sq per step ``token_mean`` (T+1, V) and its elements that
    changed at the step ``changed`` (T+1, V) of ``hidden`` each: per step, the mean, median, 10th and 90th
    percentile over each group's token means; the share of the group's elements that changed; AdamW's bias
    corrections."""
    steps = np.arange(len(token_mean))
    columns = {"step": steps}
    for group in ("dead", "live"):
        values = token_mean[:, groups[group]]
        if values.shape[1] == 0:
            continue
        columns[f"{group}_mean"] = values.mean(axis=1)
        columns[f"{group}_median"] = np.median(values, axis=1)
        columns[f"{group}_p10"] = np.percentile(values, 10, axis=1)
        columns[f"{group}_p90"] = np.percentile(values, 90, axis=1)
        columns[f"{group}_changed_share"] = changed[:, groups[group]].sum(axis=1) / (values.shape[1] * hidden)
    # what AdamW divides by at step t (1 at t = 0, where nothing is divided)
    columns["bias_correction1"] = np.where(steps > 0, 1 - beta1 ** steps.astype(np.float64), 1.0)
    columns["bias_correction2"] = np.where(steps > 0, 1 - beta2 ** steps.astype(np.float64), 1.0)
    return columns


def freeze_tables(steps: TokenSteps, groups: dict[str, np.ndarray], losses: np.ndarray,
                  windows: dict[str, tuple[int, int]], analysis: dict, token_text: list[str] | None = None) -> dict:
    """The tables made of TokenSteps, by their names in FREEZE_OUTPUTS: all but ``variance`` (exp_avg_sq.csv,
    made of exp_avg_sq). ``analysis``: the experiment's analysis settings."""
    columns = freeze_table(steps, groups, losses, analysis["solid_max"], analysis["cold_max"])
    return {"freeze": columns, "cycles": cycles_table(columns), "tokens": token_table(steps, groups, windows, token_text),
            "classes": displacement_table(steps, groups), "lattice_positions": lattice_position_table(steps)}


def question_group(groups: dict[str, np.ndarray]) -> str:
    """The group the lab's question is about: the dead tokens, or all tokens when none is dead."""
    return "dead" if groups["dead"].any() else "all"


def freeze_summary(experiment: str, update_rule: str, delta_w_exact: bool, columns: dict[str, np.ndarray],
                   groups: dict[str, np.ndarray], windows: dict[str, tuple[int, int]], analysis: dict) -> dict:
    """summary.json up to its provenance, from freeze.csv's ``columns``: the thresholds and verdict rule, each
    window's statistics, each measure's cooling series and the verdicts."""
    width, tolerance = analysis["trend_window_steps"], analysis["verdict_tolerance_per_1000_steps"]
    series = cooling(columns, width, tolerance)
    return {
        "experiment": experiment,
        "update_rule": update_rule,
        "steps": int(columns["step"][-1]),
        # false for a float16 recording: ΔW′ of its stored values, not of what training held
        "delta_w_exact": delta_w_exact,
        "shares": "fractions 0-1",
        "thresholds": {"solid_max": analysis["solid_max"], "cold_max": analysis["cold_max"],
                       "phase_coordinate": "|ΔW| in units of the coarser lattice spacing of W[t-1] and W[t]"},
        "verdict_rule": verdict_rule(tolerance, width),
        "windows": {name: {"start": a, "end": b, **window_stats(columns, groups, (a, b))}
                    for name, (a, b) in windows.items()},
        "cooling": series,
        "verdicts": {group: {measure: series[group][measure]["verdict"] for measure in MEASURES} for group in GROUPS},
        # the lab's question: the global freeze
        "verdict": series[question_group(groups)]["global_freeze"]["verdict"],
    }


# -- file I/O edge -------------------------------------------------------------------------------

@dataclasses.dataclass
class Recorded:
    """What the freeze stage reads of a recording beside its per-step tensors."""

    losses: np.ndarray     # (T+1,)
    dead_mask: np.ndarray  # (V,) bool
    attrs: dict
    delta_w_exact: bool    # false for float16 storage


def read_recorded(recording: str, delta_path: str | None = None) -> Recorded:
    """The recording's losses, dead mask and attributes, and whether its ΔW′ is exact (as the lattice stage's
    file ``delta_path`` says, when given)."""
    from thimble.record.format import open_h5, read_checked

    with open_h5(recording) as handle:
        losses = read_checked(handle["losses"])
        dead_mask = read_checked(handle["dead_mask"]).astype(bool)
        attrs = dict(handle.attrs)
    exact = attrs.get("storage_dtype") != "float16"
    if delta_path is not None:
        with open_h5(delta_path) as handle:
            exact = bool(handle[DELTA_W_DATASET].attrs.get("exact", exact))
    return Recorded(losses, dead_mask, attrs, exact)


def read_token_steps(recording: str, dead: np.ndarray, block_rows: int = 16, threads: int = 1,
                     delta_path: str | None = None) -> TokenSteps:
    """One streaming pass over the recorded W (T+1, V, D): TokenSteps, in memory O(T x V).

    ΔW′ is read from ``delta_path`` (the lattice stage's file, every frame's checksum verified) beside W,
    which the phases, crossings and lattice positions need; without it, ΔW′ is computed from W.
    Tokens are split across ``threads`` (numpy releases the GIL in its loops).
    """
    import contextlib

    from tqdm.auto import tqdm

    from thimble.record.format import open_h5
    from thimble.record.reader import RecordedTensor
    from thimble.util.workers import WorkerPool, thread_spans

    with open_h5(recording) as handle, contextlib.ExitStack() as stack:
        n_steps, vocab, hidden = handle["W"].shape
        delta_w = deltas = None
        if delta_path is not None:
            delta_w = delta_w_of(stack.enter_context(open_h5(delta_path)), delta_path, handle)
            deltas = delta_w.in_order(block_rows)
        fields = {name: np.zeros((n_steps, vocab), dtype) for name, dtype in TOKEN_FIELDS.items()}
        fields["frozen_elements"] = np.zeros((n_steps, 2), np.int64)
        fields["frozen_at_power_of_two"] = np.zeros((n_steps, 2, EXPONENT_FIELDS), np.int64)
        bounds = thread_spans(vocab, threads)
        previous = previous_delta = None
        with WorkerPool(threads) as pool, tqdm(total=n_steps - 1, desc="freeze", unit="step", mininterval=5) as bar:
            for step, block in RecordedTensor.of_recording(handle, "W").blocks(block_rows):
                # int32, the type ΔW′ is computed in
                delta = None if deltas is None else \
                    deltas.read(step, step + len(block)).view(delta_w.dtype).astype(np.int32)
                if previous is None:  # step 0: nothing moved before it
                    previous, block, step = block[0], block[1:], step + 1
                    delta = None if delta is None else delta[1:]
                    if not len(block):
                        continue
                futures = {(a, b): pool.submit(summarise_w_block, block[:, a:b], previous[a:b],
                                               None if previous_delta is None else previous_delta[a:b], dead[a:b],
                                               None if delta is None else delta[:, a:b])
                           for a, b in bounds}
                rows = slice(step, step + len(block))
                for (a, b), future in futures.items():
                    tokens, counts = future.result()
                    for name, values in tokens.items():
                        fields[name][rows, a:b] = values
                    for name, values in counts.items():
                        fields[name][rows] += values
                previous_delta = delta[-1] if delta is not None else \
                    ordinal(block[-1]) - ordinal(block[-2] if len(block) > 1 else previous)
                previous = block[-1].copy()
                bar.update(len(block))
        if deltas is not None:
            deltas.finish()
    return TokenSteps(**fields, hidden=hidden)


def delta_w_of(handle, path: str, recording) -> RecordedTensor:
    """ΔW′ of the lattice stage's file ``handle`` (at ``path``), refused unless it was computed from the W of
    ``recording`` (its shape and resume key)."""
    from thimble.errors import DataError
    from thimble.record.reader import RecordedTensor

    dataset = handle[DELTA_W_DATASET]
    if dataset.shape != recording["W"].shape:
        raise DataError(f"{path}:/delta_w_lattice has shape {dataset.shape}, but W of {recording.filename} is "
                        f"{recording['W'].shape}: it was computed from another recording; rerun the lattice stage")
    made_from, current = handle.attrs.get("resume_key"), recording.attrs.get("resume_key")
    if made_from is not None and current is not None and made_from != current:
        raise DataError(f"{path} was computed from another recording than {recording.filename} (their settings "
                        "or inputs differ); rerun the lattice stage")
    return RecordedTensor(dataset)


def variance_by_group(recording: str, groups: dict[str, np.ndarray], block_rows: int = 16) -> dict[str, np.ndarray]:
    """exp_avg_sq.csv (``variance_table``) from one streaming pass over the recorded exp_avg_sq."""
    from thimble.record.format import open_h5
    from thimble.record.reader import RecordedTensor

    with open_h5(recording) as handle:
        n_steps, vocab, hidden = handle["variance_W"].shape
        beta1, beta2 = float(handle.attrs["adam_beta1"]), float(handle.attrs["adam_beta2"])
        token_mean = np.zeros((n_steps, vocab), dtype=np.float64)
        changed = np.zeros((n_steps, vocab), dtype=np.int32)
        previous = None
        for start, block in RecordedTensor.of_recording(handle, "variance_W").blocks(block_rows):
            values = block.view(BFLOAT16 if block.dtype.itemsize == 2 else np.float32)  # float32 under fp32_master
            token_mean[start: start + len(block)] = values.astype(np.float64).mean(axis=2)
            before = np.concatenate([block[:1] if previous is None else previous[None], block[:-1]])
            changed[start: start + len(block)] = np.count_nonzero(block != before, axis=2)
            previous = block[-1].copy()
    return variance_table(token_mean, changed, hidden, groups, beta1, beta2)


#: the freeze stage's tables, its .csv outputs, in FREEZE_OUTPUTS' order
TABLES = tuple(name for name, file in FREEZE_OUTPUTS.items() if file.endswith(".csv"))


def write_tables(tables: dict, outputs: dict[str, str]) -> list[str]:
    """Each of TABLES as CSV at its path in ``outputs``; returns the paths, in TABLES' order."""
    for name in TABLES:
        table = tables[name]
        # token texts may hold a carriage return, a NUL or a quote: quoted, they read back exactly
        write_csv(outputs[name], table, quote_text=isinstance(table, dict) and TOKEN_TEXT_COLUMN in table)
    return [outputs[name] for name in TABLES]


def write_token_steps(path: str, steps: TokenSteps, dead_mask: np.ndarray, computed_from: dict) -> None:
    """token_displacement.h5: DISPLACEMENT_FIELDS (gzip) and the dead mask, each with Fletcher32, which HDF5
    verifies on every chunk the figures read; ``computed_from`` (thimble.provenance) as a JSON attribute."""
    import h5py

    from thimble.util.files import atomic_output

    with atomic_output(path) as tmp, h5py.File(tmp, "w") as out:
        for name in DISPLACEMENT_FIELDS:
            out.create_dataset(name, data=getattr(steps, name), compression="gzip", compression_opts=1,
                               fletcher32=True)
        out.create_dataset("dead_mask", data=dead_mask, fletcher32=True)
        out.attrs["computed_from"] = json.dumps(computed_from, sort_keys=True)


def log_verdicts(summary: dict, question: str) -> None:
    """Each group's statistics over the whole run and its verdicts, then the answer for the ``question`` group."""
    whole = summary["windows"]["all"]
    for group in GROUPS:
        stats = whole[group]
        log.info("%s: globally frozen %.3f of steps (%d/%d), %d completed freeze/thaw cycles, open final run %d, "
                 "longest run %d%s; verdicts %s", group, stats["global_freeze_share"] or 0,
                 stats["global_freeze_steps"], stats["steps"], stats["freeze_thaw_cycles"], stats["open_frozen_run"],
                 stats["longest_frozen_run"], f" ending at {stats['longest_frozen_run_ended_at']}"
                 if stats["longest_frozen_run"] else "", summary["verdicts"][group])
    log.info("verdict (%s, global freeze): %s", question, summary["verdict"])


def analyse(recording: str, settings: dict, outputs: dict[str, str], delta_path: str | None = None,
            threads: int = 1, drivers_path: str | None = None, tokenizer_path: str | None = None) -> dict:
    """Write every freeze table and the summary of one experiment; return the summary.

    ``drivers_path`` (the freeze_drivers stage's JSON) goes into the summary as ``drivers``.
    ``tokenizer_path``: the dataset's tokenizer, for token_freeze.csv's token_text column. The summary's
    ``provenance`` names the recording read and the sha256 of every table (thimble.provenance).

    ΔW′ comes from ``delta_path`` (the lattice stage's file: its frames' checksums verified, and whether
    ΔW′ is exact, false for float16 storage); without it, the tables compute ΔW′ from W.
    """
    from thimble.config import settings_hash
    from thimble.data.tokenizer import token_texts
    from thimble.provenance import stage_provenance
    from thimble.util.files import write_json

    analysis = settings["analysis"]
    recorded = read_recorded(recording, delta_path)
    groups = group_masks(recorded.dead_mask)
    steps = read_token_steps(recording, recorded.dead_mask, threads=threads, delta_path=delta_path)
    windows = default_windows(steps.last_step, analysis["windows"])
    token_text = None if tokenizer_path is None else token_texts(tokenizer_path, len(recorded.dead_mask))
    tables = {**freeze_tables(steps, groups, recorded.losses, windows, analysis, token_text),
              "variance": variance_by_group(recording, groups)}
    provenance = stage_provenance(recording, recorded.attrs, settings_hash(settings), write_tables(tables, outputs))
    write_token_steps(outputs["token_steps"], steps, recorded.dead_mask, provenance["computed_from"])
    summary = {**freeze_summary(settings["name"], rule_of(recorded.attrs), recorded.delta_w_exact, tables["freeze"],
                                groups, windows, analysis),
               "provenance": provenance}
    if drivers_path is not None:
        summary["drivers"] = json.loads(Path(drivers_path).read_text())
    write_json(outputs["summary"], summary, indent=2)
    log_verdicts(summary, question_group(groups))
    return summary
