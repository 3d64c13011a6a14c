"""Freeze/thaw analysis of every recorded tensor: tables, windows, and the verdicts.

Each recorded tensor is seen as the embedding W is (``thimble.analysis.tensors``): rows x columns, its rows in
groups, the embedding's tokens in dead, live and all, any other tensor's rows in one group, all. The text below
speaks of W's tokens and their D coordinates; for another tensor read its rows and their columns.

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

The core works on per-step, per-token summaries (``TokenSteps``) and per-step
counts of each part of the rows (the groups that split them: the embedding's dead
and live tokens, another tensor's all), which one streaming pass over a tensor
produces; everything else is pure functions of them. The stage goes through the
tensors one after the other, so that memory follows the largest of them.

Each tensor is counted in its own lattice (``thimble.numerics.lattice``): bf16's for thimble's own training,
float16's or float32's for a parameter a ``thimble.Recorder`` loop kept in that type; spacings, binades and
the powers of two frozen elements sit at are the tensor's type's. A recorder's loop names the tensor whose rows
its dead and live masks group (``token_groups_param``), which takes the embedding's place; without token groups
every tensor is one group, all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from thimble.analysis.tensors import ALL
from thimble.numerics.lattice import BF16_LATTICE, EXPONENT_BIAS, EXPONENT_SHIFT, MAGNITUDE_BITS, Lattice, ordinal, ulp
from thimble.outputs import DELTA_W_DATASET, FREEZE_OUTPUTS, TOKEN_TEXT_COLUMN
from thimble.sizes import EMBEDDING
from thimble.update_rules import rule_of
from thimble.util.tables import write_csv

if TYPE_CHECKING:
    import h5py

    from thimble.record.format import RecordedParam
    from thimble.record.reader import RecordedTensor

log = logging.getLogger(__name__)

#: the embedding's groups of tokens (any other tensor has the one group ``all``)
GROUPS = ("dead", "live", ALL)
#: every table's first column: the parameter whose rows the row describes
TENSOR_COLUMN = "tensor"
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
#: biased exponent fields of bf16 (the k of ±2^k is the field minus EXPONENT_BIAS); another lattice has its own
#: (``Lattice.exponent_fields``)
EXPONENT_FIELDS = (int(MAGNITUDE_BITS) >> EXPONENT_SHIFT) + 1
#: the largest |ΔW′| a token's ``max_abs`` holds: a float32 tensor's moves may be longer (up to 2^32 steps, through
#: zero), and count there as this (only zero and the phases' motion, kept apart, decide anything)
MAX_ABS_LIMIT = np.iinfo(np.int32).max


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
    # per step and part (``parts``): frozen elements, and those sitting exactly at ±2^k by exponent field
    frozen_elements: np.ndarray  # (T+1, P) int64
    frozen_at_power_of_two: np.ndarray  # (T+1, P, exponent fields of the tensor's lattice) int64
    parts: tuple[str, ...]     # the groups that split the tokens (``partition``): the embedding's dead, live
    hidden: int = 1            # D: coordinates per token
    exponent_bias: int = EXPONENT_BIAS  # of the tensor's lattice: the k of ±2^k is the field minus it

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
    wide = delta.dtype.itemsize > 4  # float32's step counts
    magnitude = np.abs(delta.astype(np.int64 if wide else np.int32))
    before = np.concatenate([previous[None], delta[:-1]]) if previous is not None else \
        np.concatenate([np.zeros_like(delta[:1]), delta[:-1]])
    nonzero = delta != 0
    undo = nonzero & (delta == -before)
    largest = magnitude.max(axis=2)
    return {
        "max_abs": np.minimum(largest, MAX_ABS_LIMIT).astype(np.int32) if wide else largest,
        "norm": np.sqrt((magnitude.astype(np.float32) ** 2).sum(axis=2)),
        "oscillatory": np.count_nonzero(undo, axis=2).astype(np.int32),
        "quantum": np.count_nonzero((magnitude == 1) & ~undo, axis=2).astype(np.int32),
        "moved": np.count_nonzero(nonzero, axis=2).astype(np.int32),
    }


def summarise_w_block(bits: np.ndarray, previous: np.ndarray, previous_delta: np.ndarray | None,
                      parts: list[np.ndarray], delta: np.ndarray | None = None, lattice: Lattice = BF16_LATTICE
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Summaries of W rows ``bits`` (rows, V, D), bit patterns of ``lattice`` (bf16's: uint16), after the row
    ``previous`` (V, D).

    ``delta`` is ΔW′ of these rows (the lattice's ordinal type, int32 for bf16, as the lattice stage stored it),
    computed here from W when not given; ``previous_delta`` is ΔW′ of ``previous`` (for exact undos); ``parts``:
    a (V,) mask of each part of the tokens (``partition``). Returns the per-token fields of TokenSteps and the
    per-part element counts.
    """
    both = np.concatenate([previous[None], bits])
    if delta is None:
        signed = ordinal(both, lattice)
        delta = signed[1:] - signed[:-1]
    tokens = summarise_block(delta, previous_delta)
    before, after = both[:-1], both[1:]
    # a 16-bit lattice's moves in float32 (as for bf16); float32's in float64, where a difference of two float32
    # values a few binades apart is exact
    real = np.float32 if lattice.bits.itemsize == 2 else np.float64
    spacing_before, spacing_after = ulp(before, real, lattice), ulp(after, real, lattice)
    size = np.abs(after.view(lattice.values).astype(real) - before.view(lattice.values).astype(real))
    tokens["motion"] = (size / np.maximum(spacing_before, spacing_after)).max(axis=2)
    tokens["start_spacings"] = (size / spacing_before).max(axis=2)
    if real is np.float64:
        with np.errstate(over="ignore"):  # a float32 weight leaving 0 walks past float32's range of spacings: inf
            tokens["motion"] = tokens["motion"].astype(np.float32)
            tokens["start_spacings"] = tokens["start_spacings"].astype(np.float32)
    moved = delta != 0
    signs_differ = ((before ^ after) & lattice.sign_bit) != 0
    crossed_sign = signs_differ & ((before & lattice.magnitude_bits) != 0) & ((after & lattice.magnitude_bits) != 0)
    crossed_binade = moved & ~crossed_sign & ((before >> lattice.exponent_shift) != (after >> lattice.exponent_shift))
    tokens["sign_crossings"] = np.count_nonzero(crossed_sign, axis=2).astype(np.int32)
    tokens["binade_crossings"] = np.count_nonzero(crossed_binade, axis=2).astype(np.int32)
    return tokens, frozen_counts(after, ~moved, parts, lattice)


def frozen_counts(after: np.ndarray, frozen: np.ndarray, parts: list[np.ndarray],
                  lattice: Lattice = BF16_LATTICE) -> dict[str, np.ndarray]:
    """Per row and part (a (V,) mask each): the ``frozen`` elements of W rows ``after`` (rows, V, D; bit patterns
    of ``lattice``), and those sitting exactly at ±2^k, by exponent field."""
    # exactly ±2^k: a normal value with a zero mantissa
    field = ((after & lattice.magnitude_bits) >> lattice.exponent_shift).astype(np.int64)
    at_power = frozen & ((after & lattice.mantissa_bits) == 0) & (field > 0)
    rows, fields = len(after), lattice.exponent_fields
    counts = {"frozen_elements": np.zeros((rows, len(parts)), np.int64),
              "frozen_at_power_of_two": np.zeros((rows, len(parts), fields), np.int64)}
    row_index = np.arange(rows)[:, None, None] * fields
    for side, mask in enumerate(parts):
        counts["frozen_elements"][:, side] = np.count_nonzero(frozen[:, mask], axis=(1, 2))
        selected = at_power[:, mask]
        keys = (row_index + field[:, mask])[selected]
        counts["frozen_at_power_of_two"][:, side] = np.bincount(
            keys, minlength=rows * fields).reshape(rows, fields)
    return counts


def token_steps_from_w(w_bits: np.ndarray, groups: dict[str, np.ndarray],
                       lattice: Lattice = BF16_LATTICE) -> TokenSteps:
    """TokenSteps of a whole in-memory W (T+1, V, D) of bit patterns of ``lattice`` (bf16's by default; row 0:
    nothing moved), its tokens in ``groups``."""
    parts = partition(groups)
    tokens, counts = summarise_w_block(w_bits[1:], w_bits[0], None, list(parts.values()), lattice=lattice)
    zero_token = {name: np.zeros((1, *values.shape[1:]), values.dtype) for name, values in tokens.items()}
    zero_count = {name: np.zeros((1, *values.shape[1:]), values.dtype) for name, values in counts.items()}
    joined = {name: np.concatenate([zero_token[name], values]) for name, values in tokens.items()}
    joined.update({name: np.concatenate([zero_count[name], values]) for name, values in counts.items()})
    return TokenSteps(**joined, parts=tuple(parts), hidden=w_bits.shape[2], exponent_bias=lattice.exponent_bias)


def group_masks(dead_mask: np.ndarray) -> dict[str, np.ndarray]:
    """The embedding's groups of tokens by the recording's dead mask."""
    dead = np.asarray(dead_mask, dtype=bool)
    return {"dead": dead, "live": ~dead, ALL: np.ones_like(dead)}


def partition(groups: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The groups that split the tokens, each token in one: all but ``all`` when there are others (the
    embedding's dead and live), else ``all``. Every group is a part or ``all``, the union of the parts."""
    parts = {name: np.asarray(mask, bool) for name, mask in groups.items() if name != ALL} or \
        {ALL: np.asarray(groups[ALL], bool)}
    if ALL not in groups or (np.sum(list(parts.values()), axis=0) != 1).any():
        raise ValueError(f"the groups {', '.join(groups)} do not split the tokens into parts beside {ALL!r}")
    return parts


def groups_of_parts(parts: tuple[str, ...]) -> tuple[str, ...]:
    """The groups of tokens split into ``parts``: the parts and their union ``all``."""
    return parts if parts == (ALL,) else (*parts, ALL)


def of_group(counts: np.ndarray, parts: tuple[str, ...], group: str) -> np.ndarray:
    """A group's counts from ``counts`` by part (steps, P, ...): its part's, or the sum of all the parts."""
    return counts[:, parts.index(group)] if group in parts else counts.sum(axis=1)


def groups_of(columns: dict[str, np.ndarray]) -> list[str]:
    """The groups of freeze.csv's ``columns``, in their order."""
    suffix = f"_{MEASURES['global_freeze'].column}"
    return [name[:-len(suffix)] for name in columns if name.endswith(suffix)]


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
    columns: dict[str, np.ndarray] = {"step": t, "loss": losses[1:]}
    for group, mask in groups.items():
        frozen_elements = of_group(steps.frozen_elements[1:], steps.parts, group)
        size = int(mask.sum())
        moved = (max_abs[:, mask] > 0).sum(axis=1)
        columns[f"{group}_moved_tokens"] = moved
        columns[f"{group}_frozen_token_share"] = 1 - moved / size if size else np.full(t.size, np.nan)
        columns[f"{group}_frozen_element_share"] = (frozen_elements / (size * steps.hidden) if size
                                                    else np.full(t.size, np.nan))
        columns[f"{group}_globally_frozen"] = moved == 0
        for index, name in enumerate(PHASES):
            columns[f"{group}_phase_{name}"] = (phase[:, mask] == index).sum(axis=1)
    return columns


def cycles_table(columns: dict[str, np.ndarray]) -> list[dict]:
    """freeze_cycles.csv: per group, the stretch before the first global freeze ('not yet frozen'),
    each globally frozen run ('freeze', ``thawed`` False for an open final run) and the thaws between."""
    rows = []
    for group in groups_of(columns):
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
    for group in groups:
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
    for group, mask in groups.items():
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


@dataclasses.dataclass
class PowerCounts:
    """Per step t = 1..T and part of the tokens: the frozen elements, and those sitting exactly at ±2^k for
    each k that occurs (the rest are 0): what lattice_positions.csv is made of, kept small. k is the power itself
    (the biased exponent field less the lattice's bias), so that tensors of different lattices share columns."""

    frozen: np.ndarray     # (T, P) int64
    at_power: np.ndarray   # (T, P, K) int64, by k of ``exponents``
    exponents: np.ndarray  # (K,) the k of ±2^k, ascending
    parts: tuple[str, ...]

    @classmethod
    def of(cls, steps: TokenSteps) -> PowerCounts:
        counts = steps.frozen_at_power_of_two[1:]
        fields = np.flatnonzero(counts.sum(axis=(0, 1)))
        return cls(steps.frozen_elements[1:], counts[:, :, fields], fields - steps.exponent_bias, steps.parts)

    def table(self, exponents: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """lattice_positions.csv's columns with a column for each k of ``exponents`` (default: the k that occur;
        a k that does not occur is 0 wherever an element is frozen)."""
        exponents = self.exponents if exponents is None else np.asarray(exponents)
        counts = np.zeros((*self.at_power.shape[:2], len(exponents)), np.int64)
        counts[:, :, np.searchsorted(exponents, self.exponents)] = self.at_power
        columns: dict[str, np.ndarray] = {"step": np.arange(1, len(self.frozen) + 1)}
        with np.errstate(invalid="ignore", divide="ignore"):
            for group in groups_of_parts(self.parts):
                at_power, total = of_group(counts, self.parts, group), of_group(self.frozen, self.parts, group)
                columns[f"{group}_frozen_elements"] = total
                columns[f"{group}_at_power_of_two_share"] = np.where(total > 0, at_power.sum(axis=1) / total,
                                                                     np.nan)
                for index, power in enumerate(exponents):
                    columns[f"{group}_at_2^{int(power)}_share"] = np.where(
                        total > 0, at_power[:, index] / total, np.nan)
        return columns


def lattice_position_table(steps: TokenSteps) -> dict[str, np.ndarray]:
    """lattice_positions.csv: per step and group, the share of frozen elements sitting exactly at
    ±2^k, in all and by k (the k that occur anywhere in the run)."""
    return PowerCounts.of(steps).table()


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
    for group in groups_of(columns):
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
                   beta1: float | np.ndarray, beta2: float | np.ndarray,
                   counts: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """exp_avg_sq.csv from each token's mean exp_avg_sq per step ``token_mean`` (T+1, V) and its elements that
    changed at the step ``changed`` (T+1, V) of ``hidden`` each: per step, the mean, median, 10th and 90th
    percentile over the token means of each part of ``groups`` (``partition``: the embedding's dead and live
    tokens, another tensor's all) that has tokens; the share of the part's elements that changed; AdamW's bias
    corrections, of the betas (each a number, or one per step) and the optimizer's step ``counts`` (T+1,) (by
    default the step itself; 1 where there is no count, NaN or 0)."""
    steps = np.arange(len(token_mean))
    columns = {"step": steps}
    for group, mask in partition(groups).items():
        values = token_mean[:, mask]
        if values.shape[1] == 0:
            continue
        columns[f"{group}_mean"] = values.mean(axis=1)
        columns[f"{group}_median"] = np.median(values, axis=1)
        columns[f"{group}_p10"] = np.percentile(values, 10, axis=1)
        columns[f"{group}_p90"] = np.percentile(values, 90, axis=1)
        columns[f"{group}_changed_share"] = changed[:, mask].sum(axis=1) / (values.shape[1] * hidden)
    # what AdamW divides by at step t (1 at t = 0, where nothing is divided)
    counts = steps.astype(np.float64) if counts is None else np.asarray(counts, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # NaN > 0: no count
        counted = counts > 0
    columns["bias_correction1"] = np.where(counted, 1 - beta1 ** counts, 1.0)
    columns["bias_correction2"] = np.where(counted, 1 - beta2 ** counts, 1.0)
    return columns


def tensor_tables(steps: TokenSteps, groups: dict[str, np.ndarray], losses: np.ndarray, analysis: dict) -> dict:
    """One tensor's tables made of its TokenSteps, by their names in FREEZE_OUTPUTS: ``freeze``, ``cycles``,
    ``classes``, and ``lattice_positions`` as its PowerCounts (whose columns the stage widens to every tensor's
    k). ``analysis``: the experiment's analysis settings."""
    columns = freeze_table(steps, groups, losses, analysis["solid_max"], analysis["cold_max"])
    return {"freeze": columns, "cycles": cycles_table(columns), "classes": displacement_table(steps, groups),
            "lattice_positions": PowerCounts.of(steps)}


def merged_columns(orders: list[list[str]]) -> list[str]:
    """The union of several tables' columns, the first table's in its order, each column another table adds
    placed before the next of its own columns already there (at the end when none is)."""
    merged: list[str] = []
    for order in orders:
        for index, column in enumerate(order):
            if column in merged:
                continue
            following = next((other for other in order[index + 1:] if other in merged), None)
            merged.insert(merged.index(following) if following is not None else len(merged), column)
    return merged


#: the nullable pandas type of each numpy kind, where a column some tensors lack is empty: integers and flags
#: keep printing as integers and flags beside the empty fields
NULLABLE = {"i": "Int", "u": "UInt", "f": "Float"}


def stack_tables(tables: dict[str, dict | list[dict]]):
    """One table (a pandas DataFrame) of the rows of every tensor's table, by tensor name in their order, each row
    led by its tensor's name (TENSOR_COLUMN). A column that some tensors' tables lack (another tensor's groups) is
    empty in their rows; the values of the others print as in a table of their tensor alone."""
    import pandas as pd

    frames = {name: pd.DataFrame(table) for name, table in tables.items()}
    columns = merged_columns([list(frame.columns) for frame in frames.values()])
    for name, frame in frames.items():
        for column in frame.columns:
            dtype = frame[column].dtype
            if any(column not in other.columns for other in frames.values()) and dtype.kind in "iufb":
                frame[column] = frame[column].astype(
                    "boolean" if dtype.kind == "b" else f"{NULLABLE[dtype.kind]}{8 * dtype.itemsize}")
        frame.insert(0, TENSOR_COLUMN, name)
    stacked = pd.concat(frames.values(), ignore_index=True) if len(frames) > 1 else next(iter(frames.values()))
    return stacked.reindex(columns=[TENSOR_COLUMN, *columns])


def empty_table(columns: list[str]):
    """A table (a pandas DataFrame) of no rows, its columns TENSOR_COLUMN and ``columns``."""
    import pandas as pd

    return pd.DataFrame(columns=[TENSOR_COLUMN, *columns])


def widened_lattice_positions(counts: dict[str, PowerCounts]) -> dict[str, dict[str, np.ndarray]]:
    """Each tensor's lattice_positions.csv columns with a column for every k that occurs in any tensor: 0 where
    none of the tensor's frozen elements sits at ±2^k, so that every tensor's rows give every k's share."""
    exponents = np.unique(np.concatenate([count.exponents for count in counts.values()])) if counts \
        else np.array([])
    return {name: count.table(exponents) for name, count in counts.items()}


def question_group(groups: dict[str, np.ndarray]) -> str:
    """The group the lab's question is about: the dead tokens, or all tokens when none is dead (or the tensor
    has no dead tokens: any but the embedding)."""
    return "dead" if "dead" in groups and groups["dead"].any() else ALL


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
        "verdicts": {group: {measure: series[group][measure]["verdict"] for measure in MEASURES} for group in groups},
        # the lab's question: the global freeze
        "verdict": series[question_group(groups)]["global_freeze"]["verdict"],
    }


# -- file I/O edge -------------------------------------------------------------------------------

@dataclasses.dataclass
class Recorded:
    """What the freeze stage reads of a recording beside its per-step tensors."""

    losses: np.ndarray     # (T+1,)
    dead_mask: np.ndarray | None  # (V,) bool; None for a recorder's recording without token groups
    attrs: dict
    delta_w_exact: bool    # false for float16 storage
    #: the recorded parameters, the embedding first, then the others in the model's order
    params: list[RecordedParam]
    #: the parameter whose rows the dead mask groups (``thimble.analysis.tensors.token_groups_param``): the
    #: embedding, or what a recorder's loop gave token groups for (None: none)
    grouped: str | None = EMBEDDING


def question_tensor(params: list[RecordedParam], grouped: str | None = EMBEDDING) -> str:
    """The tensor summary.json's top level describes: the embedding (the tensor with token groups, ``grouped``),
    or the first recorded tensor without it."""
    names = [param.name for param in params]
    return grouped if grouped in names else names[0]


def read_recorded(recording: str, delta_path: str | None = None) -> Recorded:
    """The recording's losses, dead mask, attributes and recorded parameters, and whether its ΔW′ is exact (as
    the lattice stage's file ``delta_path`` says of the question tensor, when given)."""
    from thimble.analysis.tensors import recorded_params, token_groups_param
    from thimble.errors import DataError
    from thimble.record.format import open_h5, read_checked

    with open_h5(recording) as handle:
        losses = read_checked(handle["losses"])
        attrs = dict(handle.attrs)
        params = recorded_params(handle)
        grouped = token_groups_param(attrs)
        if "dead_mask" in handle:
            dead_mask = read_checked(handle["dead_mask"]).astype(bool)
        elif grouped is None:  # a recorder's loop that gave no token groups
            dead_mask = None
        else:
            raise DataError(f"{recording} has no dead_mask dataset: {grouped}'s dead and live groups come from it; "
                            "rechunk the stream again")
    if not params:
        raise DataError(f"{recording} records no parameter (its attribute recorded_params is empty)")
    question = question_tensor(params, grouped)
    params = sorted(params, key=lambda param: param.name != question)  # stable: the others in the model's order
    exact = attrs.get("storage_dtype") != "float16"
    if delta_path is not None:
        with open_h5(delta_path) as handle:
            exact = bool(delta_w_dataset(handle, delta_path, question).attrs.get("exact", exact))
    return Recorded(losses, dead_mask, attrs, exact, params, grouped)


def read_token_steps(recording: str, groups: dict[str, np.ndarray], block_rows: int = 16, threads: int = 1,
                     delta_path: str | None = None, name: str | None = None) -> TokenSteps:
    """One streaming pass over a recorded tensor (T+1, *shape) seen as (T+1, rows, columns): TokenSteps, its rows
    as the tokens, in ``groups``; in memory O(T x rows).

    ``name``: the recorded parameter, the embedding by default, read in its own lattice
    (``thimble.analysis.tensors.stored_lattice``). ΔW′ is read from ``delta_path`` (the lattice stage's file,
    every frame's checksum verified) beside the values, which the phases, crossings and lattice positions need;
    without it, ΔW′ is computed from the values. Rows are split across ``threads`` (numpy releases the GIL in its
    loops).
    """
    import contextlib

    from tqdm.auto import tqdm

    from thimble.analysis.tensors import row_shape, stored_lattice
    from thimble.record.format import RecordLayout, open_h5
    from thimble.record.reader import RecordedTensor
    from thimble.util.workers import WorkerPool, thread_spans

    name = EMBEDDING if name is None else name
    parts = partition(groups)
    with open_h5(recording) as handle, contextlib.ExitStack() as stack:
        param = recorded_param(RecordLayout.of_file(handle), name, recording)
        lattice = stored_lattice(handle.attrs, param)
        values = RecordedTensor.of_recording(handle, param.roles()["W"])
        n_steps, (vocab, hidden) = values.shape[0], row_shape(param.shape)
        delta_w = deltas = None
        if delta_path is not None:
            delta_w = delta_w_of(stack.enter_context(open_h5(delta_path)), delta_path, handle, param)
            deltas = delta_w.in_order(block_rows)
        fields = {field: np.zeros((n_steps, vocab), dtype) for field, dtype in TOKEN_FIELDS.items()}
        fields["frozen_elements"] = np.zeros((n_steps, len(parts)), np.int64)
        fields["frozen_at_power_of_two"] = np.zeros((n_steps, len(parts), lattice.exponent_fields), np.int64)
        bounds = thread_spans(vocab, threads)
        previous = previous_delta = None
        with WorkerPool(threads) as pool, tqdm(total=n_steps - 1, desc=f"freeze {name}", unit="step",
                                               mininterval=5) as bar:
            for step, block in values.blocks(block_rows):
                block = block.reshape(len(block), vocab, hidden)
                # the type ΔW′ is computed in: int32, int64 for float32's lattice
                delta = None if deltas is None else deltas.read(step, step + len(block)).view(delta_w.dtype).astype(
                    lattice.ordinal_dtype).reshape(block.shape)
                if previous is None:  # step 0: nothing moved before it
                    previous, block, step = block[0], block[1:], step + 1
                    delta = None if delta is None else delta[1:]
                    if not len(block):
                        continue
                futures = {(a, b): pool.submit(summarise_w_block, block[:, a:b], previous[a:b],
                                               None if previous_delta is None else previous_delta[a:b],
                                               [mask[a:b] for mask in parts.values()],
                                               None if delta is None else delta[:, a:b], lattice)
                           for a, b in bounds}
                rows = slice(step, step + len(block))
                for (a, b), future in futures.items():
                    tokens, counts = future.result()
                    for field, part in tokens.items():
                        fields[field][rows, a:b] = part
                    for field, part in counts.items():
                        fields[field][rows] += part
                previous_delta = delta[-1] if delta is not None else \
                    ordinal(block[-1], lattice) - ordinal(block[-2] if len(block) > 1 else previous, lattice)
                previous = block[-1].copy()
                bar.update(len(block))
        if deltas is not None:
            deltas.finish()
    return TokenSteps(**fields, parts=tuple(parts), hidden=hidden, exponent_bias=lattice.exponent_bias)


def recorded_param(layout, name: str, recording: str) -> RecordedParam:
    """The recorded parameter ``name`` of a recording's ``layout``, or a DataError naming what it records."""
    from thimble.errors import DataError

    if name not in layout.params:
        raise DataError(f"{recording} does not record {name} (it records {', '.join(layout.params)})")
    return layout.params[name]


def delta_w_dataset(handle: h5py.File, path: str, name: str) -> h5py.Dataset:
    """ΔW′ of the recorded parameter ``name`` in the lattice stage's file ``handle`` (at ``path``):
    ``params/<name>/delta_w_lattice``; in a file written before ``params/``, the embedding's at the root."""
    from thimble.errors import DataError
    from thimble.record.format import param_dataset

    stored = param_dataset(name, DELTA_W_DATASET)
    if stored in handle:
        return handle[stored]
    if name == EMBEDDING and DELTA_W_DATASET in handle:
        return handle[DELTA_W_DATASET]
    raise DataError(f"{path} holds no ΔW′ of {name} ({stored}): it was computed from another recording, or "
                    "before every recorded tensor had its ΔW′; rerun the lattice stage")


def delta_w_of(handle: h5py.File, path: str, recording: h5py.File, param: RecordedParam) -> RecordedTensor:
    """ΔW′ of ``param`` in the lattice stage's file ``handle`` (at ``path``), refused unless it was computed
    from the values of ``recording`` (their shape and its resume key)."""
    from thimble.errors import DataError
    from thimble.record.format import check_own_folder
    from thimble.record.reader import RecordedTensor

    check_own_folder(handle)  # ΔW′ carries its recording's attributes, the experiment among them
    dataset, values = delta_w_dataset(handle, path, param.name), recording[param.roles()["W"]]
    if dataset.shape != values.shape:
        raise DataError(f"{path}:{dataset.name} has shape {dataset.shape}, but {param.name} of "
                        f"{recording.filename} is {values.shape}: it was computed from another recording; rerun "
                        "the lattice stage")
    made_from, current = handle.attrs.get("resume_key"), recording.attrs.get("resume_key")
    if made_from is not None and current is not None and made_from != current:
        raise DataError(f"{path} was computed from another recording than {recording.filename} (their settings "
                        "or inputs differ); rerun the lattice stage")
    return RecordedTensor(dataset)


def variance_by_group(recording: str, groups: dict[str, np.ndarray], block_rows: int = 16,
                      name: str | None = None) -> dict[str, np.ndarray] | None:
    """exp_avg_sq.csv (``variance_table``) of the recorded parameter ``name`` (the embedding by default), its
    rows in ``groups``, from one streaming pass over its recorded exp_avg_sq; None when its optimizer keeps no
    exp_avg_sq (a recorder's SGD, say).

    The bias corrections are AdamW's of the seed's settings, or for a recorder's recording of the betas and the
    parameter's step count as each step used them (its per-step tables)."""
    from thimble.analysis.tensors import row_shape, step_settings, stored_lattice
    from thimble.record.format import RecordLayout, made_by_recorder, open_h5
    from thimble.record.reader import RecordedTensor

    name = EMBEDDING if name is None else name
    with open_h5(recording) as handle:
        param = recorded_param(RecordLayout.of_file(handle), name, recording)
        role = "variance_W"
        if role not in param.roles():
            return None
        variance = RecordedTensor.of_recording(handle, param.roles()[role])
        # float32 under fp32_master, and a recorder's float32 or float16 moments in their own type
        value_type = stored_lattice(handle.attrs, param, "exp_avg_sq").values
        n_steps, (vocab, hidden) = variance.shape[0], row_shape(param.shape)
        if made_by_recorder(handle.attrs):
            settings = step_settings(handle, name)
            missing = np.full(n_steps, np.nan)
            beta1, beta2 = (settings.get(key) if settings.get(key) is not None else missing
                            for key in ("betas.0", "betas.1"))
            counts = settings.counts
        else:
            beta1, beta2 = float(handle.attrs["adam_beta1"]), float(handle.attrs["adam_beta2"])
            counts = None
        token_mean = np.zeros((n_steps, vocab), dtype=np.float64)
        changed = np.zeros((n_steps, vocab), dtype=np.int32)
        previous = None
        for start, block in variance.blocks(block_rows):
            block = block.reshape(len(block), vocab, hidden)
            values = block.view(value_type)
            token_mean[start: start + len(block)] = values.astype(np.float64).mean(axis=2)
            before = np.concatenate([block[:1] if previous is None else previous[None], block[:-1]])
            changed[start: start + len(block)] = np.count_nonzero(block != before, axis=2)
            previous = block[-1].copy()
    return variance_table(token_mean, changed, hidden, groups, beta1, beta2, counts)


#: the freeze stage's tables, its .csv outputs, in FREEZE_OUTPUTS' order
TABLES = tuple(name for name, file in FREEZE_OUTPUTS.items() if file.endswith(".csv"))


def write_tables(tables: dict, outputs: dict[str, str]) -> list[str]:
    """Each of TABLES as CSV at its path in ``outputs``; returns the paths, in TABLES' order."""
    for name in TABLES:
        table = tables[name]
        # token texts may hold a carriage return, a NUL or a quote: quoted, they read back exactly
        write_csv(outputs[name], table, quote_text=TOKEN_TEXT_COLUMN in table)
    return [outputs[name] for name in TABLES]


#: token_displacement.h5's note when the embedding is not recorded (its datasets then hold no token)
NO_TOKENS_NOTE = ("the embedding (transformer.wte.weight) is not recorded: no tensor's rows are tokens, so "
                  "token_freeze.csv and token_displacement.h5 hold no token; every recorded tensor is in the other "
                  "tables")
#: the same note for a recorder's recording whose loop gave no token groups
NO_TOKEN_GROUPS_NOTE = ("the loop gave thimble.Recorder no token_groups=: no tensor's rows are tokens in dead and "
                        "live groups, so token_freeze.csv and token_displacement.h5 hold no token; every recorded "
                        "tensor is in the other tables, as one group, all")


def update_rule_of(attrs) -> str:
    """What updates the recorded weights, as summary.json names it: the seed's update rule, or the optimizer's class
    of a recorder's recording (``torch.optim.adamw.AdamW``)."""
    from thimble.record.format import made_by_recorder

    if made_by_recorder(attrs):
        return str(attrs.get("optimizer_class", "unknown optimizer"))
    return rule_of(attrs)


def write_token_steps(path: str, steps: TokenSteps, dead_mask: np.ndarray, computed_from: dict,
                      note: str | None = None) -> None:
    """token_displacement.h5: DISPLACEMENT_FIELDS (gzip) and the dead mask, each with Fletcher32, which HDF5
    verifies on every chunk the figures read; ``computed_from`` (thimble.provenance) as a JSON attribute, and
    ``note`` as one when given."""
    import h5py

    from thimble.util.files import atomic_output

    with atomic_output(path) as tmp, h5py.File(tmp, "w") as out:
        for name in DISPLACEMENT_FIELDS:
            out.create_dataset(name, data=getattr(steps, name), compression="gzip", compression_opts=1,
                               fletcher32=True)
        out.create_dataset("dead_mask", data=dead_mask, fletcher32=True)
        out.attrs["computed_from"] = json.dumps(computed_from, sort_keys=True)
        if note is not None:
            out.attrs["note"] = note


def no_token_steps(n_steps: int) -> TokenSteps:
    """TokenSteps of no token over ``n_steps`` rows (the token outputs of a recording without the embedding)."""
    return TokenSteps(**{name: np.zeros((n_steps, 0), dtype) for name, dtype in TOKEN_FIELDS.items()},
                      frozen_elements=np.zeros((n_steps, 1), np.int64),
                      frozen_at_power_of_two=np.zeros((n_steps, 1, EXPONENT_FIELDS), np.int64), parts=(ALL,))


def tensor_summary(summary: dict, columns: dict[str, np.ndarray], shape: tuple[int, int],
                   drivers: dict | None) -> dict:
    """A tensor's entry of summary.json's ``tensors``, from its freeze_summary, its freeze.csv ``columns``, its
    (rows, columns) ``shape`` and its freeze_drivers.json entry ``drivers`` (by group; None without one)."""
    frozen = np.asarray(columns[f"{ALL}_{MEASURES['global_freeze'].column}"], bool)
    elements = summary["cooling"][ALL]["element_frozen"]["fractions"]
    driven = (drivers or {}).get(ALL) or {}
    return {
        "rows": shape[0],
        "columns": shape[1],
        "groups": list(summary["verdicts"]),
        "verdict": summary["verdict"],
        "verdicts": summary["verdicts"],
        "global_freeze_share": summary["windows"]["all"][ALL][WINDOW_SHARES["global_freeze"]],
        "first_global_freeze_step": int(columns["step"][frozen][0]) if frozen.any() else None,
        "frozen_element_share_last_window": elements[-1] if elements else None,
        "onset_step": driven.get("onset_step"),
        "driver": driven.get("driver"),
    }


def log_verdicts(summary: dict, question: str) -> None:
    """Each group's statistics over the whole run and its verdicts, then the answer for the ``question`` group."""
    whole = summary["windows"]["all"]
    for group in summary["verdicts"]:
        stats = whole[group]
        log.info("%s: globally frozen %.3f of steps (%d/%d), %d completed freeze/thaw cycles, open final run %d, "
                 "longest run %d%s; verdicts %s", group, stats["global_freeze_share"] or 0,
                 stats["global_freeze_steps"], stats["steps"], stats["freeze_thaw_cycles"], stats["open_frozen_run"],
                 stats["longest_frozen_run"], f" ending at {stats['longest_frozen_run_ended_at']}"
                 if stats["longest_frozen_run"] else "", summary["verdicts"][group])
    log.info("verdict (%s, global freeze): %s", question, summary["verdict"])


def analyse(recording: str, settings: dict, outputs: dict[str, str], delta_path: str | None = None,
            threads: int = 1, drivers_path: str | None = None, tokenizer_path: str | None = None) -> dict:
    """Write every freeze table and the summary of one experiment, for every recorded tensor; return the summary.

    The tensors are read one after the other (memory follows the largest), the embedding first. Each table holds
    the rows of every tensor, led by its name; token_freeze.csv and token_displacement.h5 are the embedding's
    tokens' (with no token when it is not recorded). The summary's top level describes ``question_tensor`` (the
    embedding, or the first recorded tensor without it) as it always described W; ``tensors`` gives each
    tensor's verdicts and headline numbers.

    ``drivers_path`` (the freeze_drivers stage's JSON) goes into the summary as ``drivers``, and each tensor's
    onset and driver (group all) from its ``tensors``. ``tokenizer_path``: the dataset's tokenizer, for
    token_freeze.csv's token_text column (without it the tokens are their ids alone, as for a recorder's loop
    that has no tokenizer). The summary's ``provenance`` names the recording read and the sha256 of every table
    (thimble.provenance).

    A recording made by ``thimble.Recorder`` is read as the seed's is: its tensor with token groups
    (``token_groups_param``) in the embedding's place, each tensor in its own lattice, exp_avg_sq.csv's bias
    corrections from its per-step settings (a tensor whose optimizer keeps no exp_avg_sq has no rows there). Its
    summary's ``update_rule`` is the optimizer's class, and it says ``recorded_by`` and each tensor's ``dtype`` (of its
    values) and ``dtypes`` (of each recorded tensor: value, grad, the optimizer's state).

    ΔW′ comes from ``delta_path`` (the lattice stage's file: its frames' checksums verified, and whether
    ΔW′ is exact, false for float16 storage); without it, the tables compute ΔW′ from the values.
    """
    from thimble.analysis.tensors import (
        has_token_groups,
        row_groups,
        row_shape,
        stored_lattice,
    )
    from thimble.config import settings_hash
    from thimble.data.tokenizer import token_texts
    from thimble.provenance import computed_from, stage_provenance
    from thimble.record.format import RECORDER, made_by_recorder
    from thimble.util.files import write_json

    analysis = settings["analysis"]
    recorded = read_recorded(recording, delta_path)
    drivers = None if drivers_path is None else json.loads(Path(drivers_path).read_text())
    driven = (drivers or {}).get("tensors") or {}
    source = computed_from(recording, recorded.attrs)
    question = recorded.params[0].name
    recorder = made_by_recorder(recorded.attrs)
    rule = update_rule_of(recorded.attrs)
    by_tensor: dict[str, dict] = {}
    entries: dict[str, dict] = {}
    top = top_groups = token_rows = None
    for index, param in enumerate(recorded.params, 1):
        shape = row_shape(param.shape)
        groups = row_groups(param.name, shape[0], recorded.dead_mask, recorded.grouped)
        log.info("tensor %d/%d: %s, %d rows x %d columns, groups %s", index, len(recorded.params), param.name,
                 *shape, ", ".join(groups))
        steps = read_token_steps(recording, groups, threads=threads, delta_path=delta_path, name=param.name)
        windows = default_windows(steps.last_step, analysis["windows"])
        tables = {**tensor_tables(steps, groups, recorded.losses, analysis),
                  "variance": variance_by_group(recording, groups, name=param.name)}
        if has_token_groups(param.name, recorded.grouped):
            token_text = None if tokenizer_path is None else token_texts(tokenizer_path, shape[0])
            token_rows = {param.name: token_table(steps, groups, windows, token_text)}
            write_token_steps(outputs["token_steps"], steps, recorded.dead_mask, source)
        del steps  # the next tensor's take its place
        summary = freeze_summary(settings["name"], rule, recorded.delta_w_exact, tables["freeze"], groups, windows,
                                 analysis)
        entries[param.name] = tensor_summary(summary, tables["freeze"], shape, driven.get(param.name))
        if recorder:  # the lattice its ΔW′ counts in, and the dtype of each of its recorded tensors
            entries[param.name]["dtype"] = stored_lattice(recorded.attrs, param).name
            entries[param.name]["dtypes"] = dict(param.dtypes)
        by_tensor[param.name] = tables
        if param.name == question:
            top, top_groups = summary, groups
        entry = entries[param.name]
        log.info("%s: verdict %s (global freeze of %s); all its rows globally frozen at %.3f of steps, first at "
                 "step %s", param.name, summary["verdict"], question_group(groups), entry["global_freeze_share"] or 0,
                 entry["first_global_freeze_step"])
    if token_rows is None:
        note = NO_TOKEN_GROUPS_NOTE if recorder and recorded.grouped is None else NO_TOKENS_NOTE
        log.warning("%s", note)
        empty = no_token_steps(len(recorded.losses))
        windows = default_windows(empty.last_step, analysis["windows"])
        token_rows = {recorded.grouped or EMBEDDING: token_table(empty, group_masks(np.zeros(0, bool)), windows,
                                                                 None if tokenizer_path is None else [])}
        write_token_steps(outputs["token_steps"], empty, np.zeros(0, bool), source, note=note)
    counts = widened_lattice_positions({name: tables["lattice_positions"] for name, tables in by_tensor.items()})
    stacked = {name: stack_tables({tensor: tables[name] for tensor, tables in by_tensor.items()})
               for name in ("freeze", "cycles", "classes")}
    variances = {tensor: tables["variance"] for tensor, tables in by_tensor.items() if tables["variance"] is not None}
    if len(variances) < len(by_tensor):
        log.info("exp_avg_sq.csv: no rows of %s, whose optimizer keeps no exp_avg_sq",
                 ", ".join(name for name in by_tensor if name not in variances))
    stacked["variance"] = stack_tables(variances) if variances else empty_table(["step"])
    stacked["lattice_positions"] = stack_tables(counts)
    stacked["tokens"] = stack_tables(token_rows)
    provenance = stage_provenance(recording, recorded.attrs, settings_hash(settings), write_tables(stacked, outputs))
    summary = {**top, "question_tensor": question, "tensors": entries, "provenance": provenance}
    if recorder:
        summary["recorded_by"] = RECORDER
    if drivers is not None:
        summary["drivers"] = drivers
    write_json(outputs["summary"], summary, indent=2)
    log_verdicts(top, question_group(top_groups))
    return summary
