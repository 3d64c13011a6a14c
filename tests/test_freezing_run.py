"""The CPU-sized experiment that freezes (thimble_small's model, cut to 1200 steps, on the committed mini
texts so that it runs offline), end to end through the workflow: dead tokens freeze, the replay matches
bit for bit and the freeze criterion agrees element for element."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import offline_config, run_snakemake

STEPS = 1200


@pytest.mark.workflow
def test_thimble_small_freezes_and_its_analysis_is_exact(tmp_path):
    config = offline_config()
    config["experiments"]["thimble_small"]["dataset"] = "shakespeare_mini"
    config["experiments"]["thimble_small"]["training"]["steps"] = STEPS
    config["experiments"]["thimble_small"]["rechunk"]["steps_per_chunk"] = 400
    config["experiments"]["thimble_small"]["analysis"]["trend_window_steps"] = 50
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run_snakemake(tmp_path, "--cores", "2", "results/thimble_small/figures/loss.png",
                  "results/thimble_small/replay.json")
    results = tmp_path / "results/thimble_small"

    replay = json.loads((results / "replay.json").read_text())
    assert replay["bitwise_match"] and replay["steps"] == STEPS
    criterion = replay["freeze_criterion"]
    assert criterion["disagreements"] == 0 and criterion["agreement"] == 1.0
    assert criterion["ties_at_half_spacing"] > 0  # ties met, and resolved as rounding resolves them
    replayed = pd.read_csv(results / "replay.csv")
    assert (replayed["predicted_frozen"] == replayed["observed_frozen"]).all()

    freeze = pd.read_csv(results / "freeze.csv")
    late = freeze[freeze["step"] > STEPS // 2]
    # the dead tokens freeze: nearly every dead element, and the whole group at some steps (from ~step 750)
    assert late["dead_frozen_element_share"].mean() > 0.95
    assert late["dead_globally_frozen"].sum() > 10 and not freeze["dead_globally_frozen"].iloc[:200].any()
    # the live tokens keep learning: never all frozen at once
    assert not freeze["live_globally_frozen"].any()
    summary = json.loads((results / "summary.json").read_text())
    assert summary["verdicts"]["live"]["global_freeze"] == "never frozen"
    # a 1200-step run is young: its last half may be rising or too noisy to call, but it has frozen
    assert summary["verdicts"]["dead"]["global_freeze"] not in ("never frozen", "thawing")
    positions = pd.read_csv(results / "lattice_positions.csv")
    # frozen dead weights pile up at powers of two
    assert positions["dead_at_power_of_two_share"].iloc[-1] > 0.5
    cycles = pd.read_csv(results / "freeze_cycles.csv")
    assert cycles[cycles["group"] == "live"]["kind"].tolist() == ["not yet frozen"]
    assert cycles[cycles["group"] == "dead"]["kind"].iloc[0] == "not yet frozen"

    # what drives the freeze: the dead tokens' onset found and its drop split exactly, frozen_share as
    # freeze.csv counts it, and the stall of bf16's exp_avg_sq above the exact average by the end
    drivers = pd.read_csv(results / "freeze_drivers.csv")
    for group in ("dead", "live", "all"):
        rows = drivers[drivers["group"] == group]
        np.testing.assert_array_equal(rows["frozen_share"], freeze[f"{group}_frozen_element_share"])
    dead = summary["drivers"]["dead"]
    assert dead["onset_step"] is not None and dead["driver"] in ("spacing", "statistics", "v_stall")
    assert abs(dead["residual_bits"]) < 1e-9 and dead["drop_bits"] > 0
    assert dead["v_stall_bits_last"] > 0
