"""The freeze drivers: the compiled pass against its numpy reference (which forms the ratio directly from u),
and synthetic recordings with a known answer: weights pushed across a binade edge under flat statistics
(driver: spacing), and an exp_avg_sq inflated on purpose while the weights stay in one binade (driver:
v_stall)."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import write_recording
from thimble.analysis import drivers
from thimble.analysis.tensors import row_groups
from thimble.numerics.lattice import half_spacing_exponent
from thimble.numerics.bf16 import BFLOAT16
from thimble.sizes import EMBEDDING
from thimble.util.workers import WorkerPool
from thimble.numerics.lattice import spacing_toward

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def bf16_bits(values) -> np.ndarray:
    """Round to nearest bf16 (ties to even), as bit patterns."""
    return np.asarray(values, dtype=np.float64).astype(BFLOAT16).view(np.uint16)


def values_of(bits) -> np.ndarray:
    return bits.view(BFLOAT16).astype(np.float64)


def adamw_run(w0: np.ndarray, grads: np.ndarray, lr: float, inflate=None) -> dict[str, np.ndarray]:
    """A bf16 AdamW trajectory of (T+1, V, D) bits: moments kept in float64 and recorded rounded to bf16,
    exp_avg_sq times ``inflate[t]`` when given (a stall put in on purpose), W[t] = W[t−1] + u rounded to
    nearest bf16 (so an update below half the spacing toward the move leaves it in place)."""
    steps = len(grads) - 1
    m = np.zeros(w0.shape)
    v = np.zeros(w0.shape)
    out = {name: np.zeros((steps + 1, *w0.shape), np.uint16) for name in ("W", "grad_W", "momentum_W", "variance_W")}
    out["W"][0] = bf16_bits(w0)
    for t in range(1, steps + 1):
        g = values_of(bf16_bits(grads[t]))
        m = BETA1 * m + (1 - BETA1) * g
        v = BETA2 * v + (1 - BETA2) * g * g
        recorded_v = v * (inflate[t] if inflate is not None else 1)
        out["grad_W"][t], out["momentum_W"][t], out["variance_W"][t] = bf16_bits(g), bf16_bits(m), bf16_bits(recorded_v)
        m_hat = values_of(out["momentum_W"][t]) / (1 - BETA1**t)
        v_hat = values_of(out["variance_W"][t]) / (1 - BETA2**t)
        out["W"][t] = bf16_bits(values_of(out["W"][t - 1]) - lr * m_hat / (np.sqrt(v_hat) + EPS))
    return out


def run_drivers(tmp_path, tensors, dead, lr, rows=8, threads=2, **attrs):
    recording = write_recording(tmp_path / "recording.h5", tensors, dead, {"learning_rate": lr, **attrs}, rows=rows)
    result = drivers.write_drivers(str(recording), str(tmp_path / "freeze_drivers.csv"),
                                   str(tmp_path / "freeze_drivers.json"), threads=threads, block_rows=5)
    assert json.loads((tmp_path / "freeze_drivers.json").read_text()) == json.loads(json.dumps(result))
    return pd.read_csv(tmp_path / "freeze_drivers.csv"), result


def test_optimizer_settings_are_read_as_the_replay_reads_them():
    from thimble.analysis import replay

    attrs = {"learning_rate": 3e-4, "adam_beta1": 0.8, "adam_beta2": 0.99, "adam_epsilon": 1e-6, "weight_decay": 0.1}
    assert drivers.hyperparameters is replay.hyperparameters
    assert drivers.hyperparameters(attrs) == {"lr": 3e-4, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}


def test_half_spacing_is_half_the_distance_to_the_next_value_toward_the_move():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    bits = bits[(bits & 0x7FFF) < 0x7F7F]  # finite, with a finite neighbour both ways
    for downward in (False, True):
        exponent = half_spacing_exponent(bits, np.full(bits.shape, downward))
        expected = spacing_toward(bits, np.full(bits.shape, -1 if downward else 1)) / 2
        np.testing.assert_array_equal(np.ldexp(1.0, exponent.astype(np.int64)), expected)


def test_compiled_pass_matches_the_reference_and_the_identity_holds(tmp_path):
    rng = np.random.default_rng(3)
    steps, vocab, hidden = 23, 40, 8
    w0 = rng.standard_normal((vocab, hidden)) * 0.05
    w0[0, :4] = [0.0, -0.0, 0.125, -0.0625]  # zeros and binade bottoms (the spacing halves toward zero)
    grads = rng.standard_normal((steps + 1, vocab, hidden)) * 1e-3
    grads[:, 1] = 0  # a token with exp_avg = 0 throughout: left out of the means
    tensors = adamw_run(w0, grads, lr=1e-3)
    dead = np.arange(vocab) % 3 == 0
    table, _ = run_drivers(tmp_path, tensors, dead, lr=1e-3)
    assert table["step"].tolist() == np.repeat(np.arange(1, steps + 1), 3).tolist()
    assert table["group"].tolist()[:3] == ["dead", "live", "all"]
    hyper = {"lr": 1e-3, "betas": (BETA1, BETA2), "eps": EPS, "weight_decay": 0.0}
    exact = drivers.exact_ema(values_of(tensors["grad_W"][1:]), BETA2)
    masks = {"dead": dead, "live": ~dead, "all": np.ones(vocab, bool)}
    for t in range(1, steps + 1):
        terms = drivers.element_terms(tensors["W"][t - 1], tensors["momentum_W"][t], tensors["variance_W"][t],
                                      exact[t - 1], t, hyper)
        # the identity, element by element: the ratio formed from u against the sum of its terms
        inside = terms["included"]
        split = np.log2(1e-3) + terms["log2_abs_m_hat"] - terms["log2_denominator"] - terms["log2_half_spacing"]
        np.testing.assert_allclose(terms["ratio"][inside], split[inside], rtol=0, atol=1e-12)
        for group, mask in masks.items():
            row = table[(table["step"] == t) & (table["group"] == group)].iloc[0]
            chosen = inside & mask[:, None]
            assert row["elements"] == chosen.sum()
            for name, column in (("ratio", "mean_log2_ratio"), ("log2_abs_m_hat", "mean_log2_abs_m_hat"),
                                 ("log2_denominator", "mean_log2_denominator"),
                                 ("log2_half_spacing", "mean_log2_half_spacing"),
                                 ("log2_exact_denominator", "mean_log2_exact_denominator")):
                assert row[column] == pytest.approx(terms[name][chosen].mean(), abs=1e-9), (t, group, column)
            assert row["v_stall_bits"] == pytest.approx(row["mean_log2_denominator"]
                                                        - row["mean_log2_exact_denominator"], abs=1e-9)
            before, after = tensors["W"][t - 1][mask], tensors["W"][t][mask]
            stayed = (before == after) | (((before | after) & 0x7FFF) == 0)
            assert row["frozen_share"] == stayed.mean()
            assert row["median_abs_w"] == np.median(np.abs(values_of(before)))


def test_results_do_not_depend_on_threads_or_blocks(tmp_path):
    rng = np.random.default_rng(5)
    tensors = adamw_run(rng.standard_normal((30, 4)) * 0.05, rng.standard_normal((12, 30, 4)) * 1e-3, lr=1e-3)
    dead = np.arange(30) < 7
    one, _ = run_drivers(tmp_path, tensors, dead, lr=1e-3, rows=4, threads=1)
    (tmp_path / "two").mkdir()
    two, _ = run_drivers(tmp_path / "two", tensors, dead, lr=1e-3, rows=12, threads=2)
    pd.testing.assert_frame_equal(one, two, check_exact=True)


def test_weights_pushed_across_a_binade_edge_with_flat_statistics_are_driven_by_spacing(tmp_path):
    # every element climbs one lattice point per step toward 2^-3 (spacing 2^-11 below it, 2^-10 above); the
    # update, |u| = lr = 2^-11.5, is above half the spacing below the edge and below it above: each element
    # stops at the edge, k steps in, under a constant gradient (flat m̂ and exact v̂)
    steps, vocab, hidden = 20, 24, 8
    rng = np.random.default_rng(0)
    lattice_steps_below = rng.integers(1, 9, size=(vocab, hidden))
    w0 = 2.0**-3 - lattice_steps_below * 2.0**-11
    grads = np.full((steps + 1, vocab, hidden), -(2.0**-10))
    lr = 2.0**-11.5
    tensors = adamw_run(w0, grads, lr)
    stuck = values_of(tensors["W"][-1])
    np.testing.assert_array_equal(stuck, 2.0**-3)  # the trajectory does what the test says
    table, result = run_drivers(tmp_path, tensors, np.arange(vocab) % 2 == 0, lr)
    for group in ("dead", "live", "all"):
        answer = result[group]
        assert answer["driver"] == "spacing", answer
        assert answer["claim_supported"] is False
        assert answer["peak_step"] == 1 and answer["onset_step"] > 1
        assert answer["spacing_bits"] == pytest.approx(answer["drop_bits"], abs=0.02)
        assert abs(answer["statistics_bits"]) < 0.02 and abs(answer["v_stall_bits"]) < 0.02
        # the three terms sum to the drop up to float rounding
        assert abs(answer["residual_bits"]) < 1e-9
        total = answer["spacing_bits"] + answer["statistics_bits"] + answer["v_stall_bits"]
        assert total == pytest.approx(answer["drop_bits"], abs=1e-9)
        rows = table[table["group"] == group]
        onset = rows[rows["step"] == answer["onset_step"]].iloc[0]
        assert onset["frozen_share"] > 0.5 and (rows[rows["step"] < answer["onset_step"]]["frozen_share"] <= 0.5).all()


def test_an_exp_avg_sq_inflated_at_constant_spacing_is_driven_by_v_stall(tmp_path):
    # the weights climb inside one binade ([2^-4, 2^-3): 128 lattice points, far more than the steps) under a
    # constant gradient, while the recorded exp_avg_sq is inflated 2^(s·t) times: log2(|u|/h) = 1 − s·t/2 falls
    # below 0 at a step set by each element's s; spacing and exact statistics stay flat
    steps, vocab, hidden = 24, 20, 8
    rng = np.random.default_rng(1)
    rate = rng.uniform(0.2, 0.6, size=(vocab, hidden))
    inflate = 2.0 ** (rate[None] * np.arange(steps + 1)[:, None, None])
    w0 = np.full((vocab, hidden), 2.0**-4)
    grads = np.full((steps + 1, vocab, hidden), -(2.0**-10))
    lr = 2.0**-11
    tensors = adamw_run(w0, grads, lr, inflate=inflate)
    assert (values_of(tensors["W"][-1]) < 2.0**-3).all() and (tensors["W"][-1] != tensors["W"][0]).all()
    table, result = run_drivers(tmp_path, tensors, np.arange(vocab) < 5, lr)
    for group in ("dead", "live", "all"):
        answer = result[group]
        assert answer["driver"] == "v_stall", answer
        assert answer["claim_supported"] is True
        assert answer["v_stall_bits"] == pytest.approx(answer["drop_bits"], abs=0.02)
        assert abs(answer["spacing_bits"]) < 1e-9 and abs(answer["statistics_bits"]) < 0.02
        assert abs(answer["residual_bits"]) < 1e-9
        assert answer["v_stall_bits_last"] > 2
    # at the last step the stall holds the denominator √(2^(s·T)) above the exact one
    assert result["all"]["v_stall_bits_last"] == pytest.approx(rate.mean() * steps / 2, abs=0.02)
    assert "driven by v_stall" in result["dead"]["answer"] and "supported" in result["dead"]["answer"]
    # the figure and summary.html's part
    from thimble.report import figures

    figures.drivers(table, {"experiment": "synthetic", "drivers": result}, "synthetic", str(tmp_path / "d.png"))
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"
    page = "".join(figures.drivers_html(result))
    assert all(result[group]["answer"] in page for group in ("dead", "live", "all")) and "<table" in page


def test_a_group_that_never_freezes_has_no_onset():
    columns = {"step": np.arange(1, 5), "mean_log2_ratio": np.array([2.0, 1.5, 1.0, 0.5]),
               "mean_log2_abs_m_hat": np.zeros(4), "mean_log2_exact_denominator": np.zeros(4),
               "mean_log2_half_spacing": np.zeros(4), "v_stall_bits": np.array([0, 0.1, 0.2, 0.3]),
               "frozen_share": np.array([0.1, 0.2, 0.5, 0.4])}
    answer = drivers.drivers_of(columns)
    assert answer["onset_step"] is None and answer["driver"] is None
    assert answer["v_stall_bits_last"] == pytest.approx(0.3)
    assert "no onset" in drivers.answer("dead", answer)


@pytest.mark.parametrize("rule", ["stochastic_rounding", "kahan", "fp32_master"])
def test_other_update_rules_say_why_the_split_does_not_apply(tmp_path, rule):
    tensors = adamw_run(np.full((4, 2), 0.1), np.full((3, 4, 2), 1e-3), lr=1e-3)
    table, result = run_drivers(tmp_path, tensors, np.zeros(4, bool), 1e-3, update_rule=rule)
    assert table.empty and list(table.columns) == ["tensor", "step", "group", *drivers.COLUMNS]
    assert result["applies"] is False and result["update_rule"] == rule and result["why"]
    from thimble.report import figures

    summary = {"experiment": "other", "update_rule": rule, "drivers": result}
    figures.drivers(table, summary, "other", str(tmp_path / "d.png"))
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"
    assert result["why"] in "".join(figures.drivers_html(result))


def test_non_finite_weights_are_named(tmp_path):
    tensors = adamw_run(np.full((4, 2), 0.1), np.full((6, 4, 2), 1e-3), lr=1e-3)
    tensors["W"][3, 1, 1] = 0x7FC0  # NaN
    with pytest.raises(drivers.DataError, match="W is nan at step 3, token 1, coordinate 1"):
        run_drivers(tmp_path, tensors, np.zeros(4, bool), 1e-3)


def test_medians_are_exact_for_odd_and_even_counts():
    values = np.array([0.5, -0.25, 0.125, 3.0, -0.0, 1.0])
    bits = bf16_bits(values) & 0x7FFF
    for count in (5, 6):
        histogram = np.bincount(bits[:count], minlength=drivers.MAGNITUDES)[None]
        assert drivers.medians_from_histograms(histogram)[0] == np.median(np.abs(values[:count]))
    assert np.isnan(drivers.medians_from_histograms(np.zeros((1, drivers.MAGNITUDES), np.int64))[0])


def test_pass_buffers_are_reused_across_blocks():
    with WorkerPool(1) as pool:
        analysis = drivers.DriverPass(EMBEDDING, row_groups(EMBEDDING, 3, np.zeros(3, bool)), 2,
                                      {"lr": 1e-3, "betas": (BETA1, BETA2), "eps": EPS}, pool, block_rows=4)
        zeros = np.zeros((4, 6), np.uint16)
        first = analysis.block(1, zeros[0], zeros, zeros, zeros, zeros)
        again = analysis.block(5, zeros[0], zeros, zeros, zeros, zeros)
    assert first["all"]["frozen_share"].tolist() == again["all"]["frozen_share"].tolist() == [1.0] * 4
    assert (first["all"]["elements"] == 0).all()
