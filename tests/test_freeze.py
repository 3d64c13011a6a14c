"""Freeze/thaw tables and verdicts against hand-built W whose answers are known."""

import numpy as np
import pytest

from thimble.analysis.freeze import (MEASURES, completed_cycles, cooling, cycles_table, default_windows, displacement_table,
                            freeze_table, group_masks, lattice_position_table, open_run, runs, token_steps_from_w,
                            token_table, trend, verdict, window_stats, windowed_mean)
from thimble.numerics.lattice import from_ordinal, ordinal

# 3 tokens x 2 coordinates, steps 0..10; token 0 is the only dead token (a group with one token)
T, V, D = 10, 3, 2
DEAD = np.array([True, False, False])
#: every coordinate starts at 0x3F14 (0.578125, mantissa 20): the moves below stay inside [0.5, 1),
#: one binade, where motion equals |ΔW′|
START = np.uint16(0x3F14)


def build(moves: dict[int, dict[int, list[int]]]) -> np.ndarray:
    """ΔW′ (T+1, V, D) from {step: {token: [coordinate values]}}; everything else 0."""
    delta = np.zeros((T + 1, V, D), dtype=np.int32)
    for step, tokens in moves.items():
        for token, values in tokens.items():
            delta[step, token] = values
    return delta


def w_of(delta: np.ndarray, start=START) -> np.ndarray:
    """W's bit patterns walking ``delta`` from ``start``."""
    first = ordinal(np.full((V, D), start, np.uint16))
    return from_ordinal(first + np.cumsum(delta, axis=0)).view(np.uint16)


# steps 1-3: everyone hot/cold/solid; 4-5: all frozen; 6: token 2 moves one step; 7-10: all frozen
# (a run that ends at the last step). Token 0 (dead) moves only at steps 1 and 3.
DELTA = build({
    1: {0: [100, 0], 1: [-20, 3], 2: [1, -1]},
    2: {1: [20, 0], 2: [-1, 1]},        # token 1 and 2 undo step 1 in some coordinates
    3: {0: [5, 0], 1: [0, 8], 2: [9, 0]},
    6: {2: [0, 1]},
})
LOSSES = np.linspace(5, 4, T + 1)


@pytest.fixture
def tables():
    steps = token_steps_from_w(w_of(DELTA), group_masks(DEAD))
    groups = group_masks(DEAD)
    return steps, groups, freeze_table(steps, groups, LOSSES, solid_max=8, cold_max=64)


def test_token_steps_recompute_the_exact_lattice_displacement(tables):
    steps, _, _ = tables
    np.testing.assert_array_equal(steps.max_abs, np.abs(DELTA).max(axis=2))
    np.testing.assert_array_equal(steps.motion, steps.max_abs)  # one binade: motion is |ΔW′|
    np.testing.assert_array_equal(steps.start_spacings, steps.max_abs)
    assert steps.sign_crossings.sum() == steps.binade_crossings.sum() == 0


def test_freeze_table_counts_moves_phases_and_global_freeze(tables):
    steps, groups, columns = tables
    assert columns["step"].tolist() == list(range(1, T + 1))
    assert columns["all_moved_tokens"].tolist() == [3, 2, 3, 0, 0, 1, 0, 0, 0, 0]
    assert columns["dead_moved_tokens"].tolist() == [1, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    assert columns["all_globally_frozen"].tolist() == [False, False, False, True, True, False, True, True, True, True]
    assert columns["dead_globally_frozen"].tolist() == [False, True, False] + [True] * 7
    np.testing.assert_allclose(columns["live_frozen_token_share"], [0, 0, 0, 1, 1, 0.5, 1, 1, 1, 1])
    # elements moved: 5 of 6 at step 1, 3 at steps 2 and 3, 1 at step 6
    np.testing.assert_allclose(columns["all_frozen_element_share"], [1 / 6, 0.5, 0.5, 1, 1, 5 / 6, 1, 1, 1, 1])
    np.testing.assert_allclose(columns["dead_frozen_element_share"][:3], [0.5, 1, 0.5])
    # step 1: token 0 hot (100), token 1 cold (20), token 2 solid (1); step 3: 5 solid, 8 solid, 9 cold
    assert (columns["all_phase_hot"][0], columns["all_phase_cold"][0], columns["all_phase_solid"][0]) == (1, 1, 1)
    assert (columns["all_phase_solid"][2], columns["all_phase_cold"][2], columns["all_phase_frozen"][2]) == (2, 1, 0)
    assert columns["all_phase_frozen"][3] == 3 and columns["live_phase_solid"][5] == 1
    np.testing.assert_array_equal(columns["loss"], LOSSES[1:])


def test_cycles_count_completed_freeze_thaw_transitions_and_report_the_open_run(tables):
    _, _, columns = tables
    rows = [r for r in cycles_table(columns) if r["group"] == "all"]
    assert [(r["kind"], r["start"], r["end"], r["length"], r["thawed"]) for r in rows] == [
        ("not yet frozen", 1, 3, 3, None), ("freeze", 4, 5, 2, True), ("thaw", 6, 6, 1, None),
        ("freeze", 7, 10, 4, False)]
    dead = [(r["kind"], r["start"], r["end"]) for r in cycles_table(columns) if r["group"] == "dead"]
    assert dead == [("not yet frozen", 1, 1), ("freeze", 2, 2), ("thaw", 3, 3), ("freeze", 4, 10)]
    assert completed_cycles(columns["all_globally_frozen"]) == 1 and open_run(columns["all_globally_frozen"]) == 4
    assert completed_cycles(np.array([True, False, True, False])) == 2 and open_run(np.array([True, False])) == 0
    assert open_run(np.ones(5, bool)) == 5


def test_window_statistics_including_runs_cut_by_a_window_edge(tables):
    _, groups, columns = tables
    whole = window_stats(columns, groups, (1, 10))["all"]
    assert (whole["global_freeze_steps"], whole["steps"]) == (6, 10)
    assert whole["global_freeze_share"] == 0.6
    assert whole["freeze_thaw_cycles"] == 1 and whole["open_frozen_run"] == 4
    assert (whole["longest_frozen_run"], whole["longest_frozen_run_ended_at"]) == (4, 10)
    # window 5..8 cuts the run 4-5 to one step and the run 7-10 to two
    cut = window_stats(columns, groups, (5, 8))["all"]
    assert (cut["global_freeze_steps"], cut["freeze_thaw_cycles"], cut["open_frozen_run"]) == (3, 1, 2)
    assert (cut["longest_frozen_run"], cut["longest_frozen_run_ended_at"]) == (2, 8)
    # frozen share of tokens: 12 token-steps, 11 frozen (token 2 moves at step 6)
    assert cut["token_frozen_share"] == pytest.approx(11 / 12)
    assert cut["element_frozen_share"] == pytest.approx(23 / 24)
    dead = window_stats(columns, groups, (1, 10))["dead"]
    assert dead["tokens"] == 1 and dead["longest_frozen_run"] == 7 and dead["freeze_thaw_cycles"] == 1


def test_a_group_that_never_freezes():
    delta = np.ones((T + 1, V, D), dtype=np.int32)
    delta[0] = 0
    steps = token_steps_from_w(w_of(delta, np.uint16(0x3F01)), group_masks(DEAD))
    groups = group_masks(DEAD)
    columns = freeze_table(steps, groups, LOSSES, 8, 64)
    stats = window_stats(columns, groups, (1, T))
    for group in ("dead", "live", "all"):
        assert stats[group]["global_freeze_steps"] == 0 and stats[group]["freeze_thaw_cycles"] == 0
        assert stats[group]["longest_frozen_run"] == 0 and stats[group]["longest_frozen_run_ended_at"] is None
        assert stats[group]["token_frozen_share"] == 0.0 == stats[group]["element_frozen_share"]
    assert [r["kind"] for r in cycles_table(columns)] == ["not yet frozen"] * 3
    verdicts = cooling(columns, 2, 0.01)
    assert {verdicts[g][m]["verdict"] for g in ("dead", "live", "all") for m in MEASURES} == {"never frozen"}


def test_motion_crossings_and_powers_of_two():
    """A weight walking down through 0.5 (a binade edge, onto 2^-1) and one crossing zero."""
    w = np.zeros((3, 1, 2), np.uint16)
    w[0, 0] = [0x3F01, 0x0081]  # 0.50390625 (one step above 2^-1) and a tiny positive 2^-126 * 1.0078
    w[1, 0] = [0x3F00, 0x8081]  # 0.5 exactly (2^-1), and the tiny value's negative: through zero
    w[2, 0] = [0x3F00, 0x8081]  # both frozen
    steps = token_steps_from_w(w, group_masks(np.array([True])))
    assert steps.max_abs[1, 0] == 2 * 0x81  # through zero: 258 lattice points
    assert steps.sign_crossings[1, 0] == 1 and steps.binade_crossings[1, 0] == 0
    # the zero crossing moves 2|w|, i.e. 2 * 129 spacings of its larger end: not thousands
    assert steps.motion[1, 0] == pytest.approx(2 * 129)
    positions = lattice_position_table(steps)
    # step 2: both elements frozen, one of them exactly at 2^-1
    assert positions["dead_frozen_elements"].tolist() == [0, 2]
    assert positions["dead_at_power_of_two_share"][1] == 0.5 and positions["dead_at_2^-1_share"][1] == 0.5
    w[1, 0, 1] = 0x0080  # now the second coordinate stays positive and steps down into the subnormals' edge
    steps = token_steps_from_w(w[:2], group_masks(np.array([True])))
    assert steps.sign_crossings[1, 0] == 0 and steps.binade_crossings[1, 0] == 0  # 0x81 -> 0x80: same binade


def test_token_table(tables):
    steps, groups, _ = tables
    windows = default_windows(T, [[4, 7]])
    assert windows == {"all": (1, 10), "last_half": (6, 10), "last_third": (8, 10), "t4-7": (4, 7)}
    columns = token_table(steps, groups, windows)
    assert columns["group"].tolist() == ["dead", "live", "live"]
    assert columns["last_moved_step"].tolist() == [3, 3, 6]
    assert columns["longest_frozen_run"].tolist() == [7, 7, 4]
    np.testing.assert_allclose(columns["frozen_share_t4-7"], [1, 1, 0.75])


def test_displacement_classes_are_disjoint(tables):
    steps, groups, _ = tables
    columns = displacement_table(steps, groups)
    # step 2: token 1 undoes -20 with +20 (oscillatory); token 2 undoes [1,-1] with [-1,1] (oscillatory, not quantum)
    assert (columns["all_moves"][1], columns["all_oscillatory"][1], columns["all_quantum"][1],
            columns["all_other"][1]) == (3, 3, 0, 0)
    # step 1: 100 and -20 and 3 are other, 1 and -1 are quantum
    assert (columns["all_quantum"][0], columns["all_other"][0]) == (2, 3)
    # step 6: a single step from rest is quantum
    assert columns["live_quantum"][5] == 1 and columns["dead_moves"][5] == 0
    for group in ("dead", "live", "all"):
        total = columns[f"{group}_oscillatory"] + columns[f"{group}_quantum"] + columns[f"{group}_other"]
        np.testing.assert_array_equal(total, columns[f"{group}_moves"])


def test_runs_and_windowed_mean():
    flags = np.array([True, True, False, True])
    assert runs(flags, np.arange(1, 5)) == [(True, 1, 2), (False, 3, 3), (True, 4, 4)]
    centers, fractions = windowed_mean(np.array([1, 1, 0, 0, 1, 0, 1], bool), np.arange(1, 8), 2)
    assert centers.tolist() == [1.5, 3.5, 5.5] and fractions.tolist() == [1.0, 0.0, 0.5]


CENTERS = np.arange(10) * 500.0


@pytest.mark.parametrize("series, ever_frozen, expected", [
    (0.5 + CENTERS / 10000 + np.tile([0.001, -0.001], 5), True, "still cooling"),
    (0.9 - CENTERS / 10000 + np.tile([0.001, -0.001], 5), True, "thawing"),
    (0.64 + np.tile([0.0001, -0.0001], 5), True, "stabilised"),
    (np.ones(10), True, "stabilised"),                  # fully frozen: the ground state
    (np.zeros(10), True, "thawing"),                    # froze once, gone back to nothing
    (np.zeros(10), False, "never frozen"),              # the all-zero regression is not "stabilised"
    (np.array([0.2, 0.9, 0.1, 0.8, 0.3, 0.95, 0.1, 0.7, 0.2, 0.9]), True, "inconclusive"),
])
def test_each_verdict_on_a_series_with_a_known_answer(series, ever_frozen, expected):
    assert verdict(trend(series, CENTERS), series, ever_frozen, 0.01) == expected


def test_too_few_windows_are_inconclusive():
    fit = trend(np.array([0.5, 0.6, 0.7]), CENTERS[:3])
    assert fit["ci95"] is None and verdict(fit, np.array([0.5, 0.6, 0.7]), True, 0.01) == "inconclusive"


def test_cooling_fits_the_last_half_of_each_measure():
    # 400 steps: the dead group freezes more and more (still cooling), the live group never
    step = np.arange(1, 401)
    rng = np.random.default_rng(0)
    frozen = rng.random(400) < step / 400
    columns = {"step": step}
    for group, flags in (("dead", frozen), ("live", np.zeros(400, bool)), ("all", np.zeros(400, bool))):
        columns[f"{group}_globally_frozen"] = flags
        columns[f"{group}_frozen_token_share"] = flags.astype(float)
        columns[f"{group}_frozen_element_share"] = flags.astype(float)
    result = cooling(columns, 20, 0.01)
    assert result["dead"]["global_freeze"]["verdict"] == "still cooling"
    assert result["dead"]["global_freeze"]["trend_last_half"]["windows"] == 10
    assert result["live"]["token_frozen"]["verdict"] == "never frozen"
