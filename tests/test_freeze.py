"""Freeze/thaw tables against hand-built ΔW′ whose statistics are known."""

import numpy as np
import pytest

from thimble.freeze import (cycles_table, default_windows, displacement_table, freeze_table, group_masks, runs,
                            token_steps_from_array, token_table, trend, verdict, window_stats,
                            windowed_global_freeze)

# 3 tokens x 2 coordinates, steps 0..10; token 0 is the only dead token (a group with one token)
T, V, D = 10, 3, 2
DEAD = np.array([True, False, False])


def build(moves: dict[int, dict[int, list[int]]]) -> np.ndarray:
    """ΔW′ (T+1, V, D) from {step: {token: [coordinate values]}}; everything else 0."""
    delta = np.zeros((T + 1, V, D), dtype=np.int16)
    for step, tokens in moves.items():
        for token, values in tokens.items():
            delta[step, token] = values
    return delta


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
    steps = token_steps_from_array(DELTA)
    groups = group_masks(DEAD)
    return steps, groups, freeze_table(steps, groups, LOSSES, solid_max=8, cold_max=64)


def test_freeze_table_counts_moves_phases_and_global_freeze(tables):
    steps, groups, columns = tables
    assert columns["step"].tolist() == list(range(1, T + 1))
    assert columns["all_moved_tokens"].tolist() == [3, 2, 3, 0, 0, 1, 0, 0, 0, 0]
    assert columns["dead_moved_tokens"].tolist() == [1, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    assert columns["all_globally_frozen"].tolist() == [False, False, False, True, True, False, True, True, True, True]
    assert columns["dead_globally_frozen"].tolist() == [False, True, False] + [True] * 7
    np.testing.assert_allclose(columns["live_frozen_fraction"], [0, 0, 0, 1, 1, 0.5, 1, 1, 1, 1])
    # step 1: token 0 hot (100), token 1 cold (20), token 2 solid (1); step 3: 5 solid, 8 solid, 9 cold
    assert (columns["all_hot"][0], columns["all_cold"][0], columns["all_solid"][0]) == (1, 1, 1)
    assert (columns["all_solid"][2], columns["all_cold"][2], columns["all_frozen"][2]) == (2, 1, 0)
    assert columns["all_frozen"][3] == 3 and columns["live_solid"][5] == 1
    np.testing.assert_array_equal(columns["loss"], LOSSES[1:])


def test_cycles_alternate_and_the_last_run_ends_at_the_last_step(tables):
    _, _, columns = tables
    rows = [r for r in cycles_table(columns) if r["group"] == "all"]
    assert [(r["kind"], r["start"], r["end"], r["length"]) for r in rows] == [
        ("thaw", 1, 3, 3), ("freeze", 4, 5, 2), ("thaw", 6, 6, 1), ("freeze", 7, 10, 4)]
    dead = [(r["kind"], r["start"], r["end"]) for r in cycles_table(columns) if r["group"] == "dead"]
    assert dead == [("thaw", 1, 1), ("freeze", 2, 2), ("thaw", 3, 3), ("freeze", 4, 10)]


def test_window_statistics_including_runs_cut_by_a_window_edge(tables):
    steps, groups, columns = tables
    whole = window_stats(columns, steps, groups, (1, 10))["all"]
    assert (whole["global_freeze_steps"], whole["steps"]) == (6, 10)
    assert whole["global_freeze_percent"] == 60.0
    assert whole["freeze_thaw_cycles"] == 2
    assert (whole["longest_frozen_run"], whole["longest_frozen_run_ended_at"]) == (4, 10)
    # window 5..8 cuts the run 4-5 to one step and the run 7-10 to two
    cut = window_stats(columns, steps, groups, (5, 8))["all"]
    assert (cut["global_freeze_steps"], cut["freeze_thaw_cycles"]) == (3, 2)
    assert (cut["longest_frozen_run"], cut["longest_frozen_run_ended_at"]) == (2, 8)
    # per-token frozen percentage: 12 token-steps, 11 frozen (token 2 moves at step 6)
    assert cut["token_frozen_percent"] == pytest.approx(100 * 11 / 12)
    dead = window_stats(columns, steps, groups, (1, 10))["dead"]
    assert dead["tokens"] == 1 and dead["longest_frozen_run"] == 7 and dead["freeze_thaw_cycles"] == 2


def test_no_frozen_step_at_all():
    delta = np.ones((T + 1, V, D), dtype=np.int16)
    delta[0] = 0
    steps = token_steps_from_array(delta)
    groups = group_masks(DEAD)
    columns = freeze_table(steps, groups, LOSSES, 8, 64)
    stats = window_stats(columns, steps, groups, (1, T))
    for group in ("dead", "live", "all"):
        assert stats[group]["global_freeze_steps"] == 0 and stats[group]["freeze_thaw_cycles"] == 0
        assert stats[group]["longest_frozen_run"] == 0 and stats[group]["longest_frozen_run_ended_at"] is None
        assert stats[group]["token_frozen_percent"] == 0.0
    assert [r["kind"] for r in cycles_table(columns)] == ["thaw"] * 3


def test_token_table(tables):
    steps, groups, _ = tables
    windows = default_windows(T, [[4, 7]])
    assert windows == {"all": (1, 10), "last_half": (6, 10), "last_third": (8, 10), "t4-7": (4, 7)}
    columns = token_table(steps, groups, windows)
    assert columns["group"].tolist() == ["dead", "live", "live"]
    assert columns["last_moved_step"].tolist() == [3, 3, 6]
    assert columns["longest_frozen_run"].tolist() == [7, 7, 4]
    np.testing.assert_allclose(columns["frozen_fraction_t4-7"], [1, 1, 0.75])


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


def test_runs_and_windowed_fraction():
    flags = np.array([True, True, False, True])
    assert runs(flags, np.arange(1, 5)) == [(True, 1, 2), (False, 3, 3), (True, 4, 4)]
    centers, fractions = windowed_global_freeze(np.array([1, 1, 0, 0, 1, 0, 1], bool), np.arange(1, 8), 2)
    assert centers.tolist() == [1.5, 3.5, 5.5] and fractions.tolist() == [1.0, 0.0, 0.5]


def test_verdicts():
    centers = np.arange(10) * 500.0
    rising = trend(0.5 + centers / 10000 + np.tile([0.001, -0.001], 5), centers)
    assert verdict(rising, 0.7) == "still cooling"
    flat = trend(0.64 + np.tile([0.0001, -0.0001], 5), centers)
    assert verdict(flat, 0.64) == "stabilised"
    noisy = trend(np.array([0.2, 0.9, 0.1, 0.8, 0.3, 0.95, 0.1, 0.7, 0.2, 0.9]), centers)
    assert verdict(noisy, 0.5) == "inconclusive"
    assert verdict(trend(np.ones(10), centers), 1.0) == "stabilised"
    assert verdict(trend(np.ones(2), centers[:2]), 0.5) == "inconclusive"
