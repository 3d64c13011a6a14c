"""The workflow as a whole: planning, linting."""

import json
import re
import shutil

import h5py
import numpy as np
import pytest
import yaml

from conftest import REPO, mini_series_config, offline_config, run_snakemake
from thimble.config import load_config, training_twin
from thimble.analysis.freeze import MEASURES, VERDICTS
from thimble.outputs import FIGURES
from thimble.plan import any_calibration, peak_ram_bytes
from thimble.record.stream_reader import open_stream
from thimble.util.units import format_bytes


def planned_jobs(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run, as {stage: count}: a stage's variants counted as the stage
    (``train_temporary_stream``, the train rule of the experiments whose stream is deleted, as ``train``)."""
    table = output.split("Job stats:")[1].split("total")[0]
    jobs: dict[str, int] = {}
    for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M):
        stage = "train" if m.group(1) == "train_temporary_stream" else m.group(1)
        jobs[stage] = jobs.get(stage, 0) + int(m.group(2))
    return jobs


def test_data_targets_of_every_dataset_plan(workdir):
    datasets = load_config(REPO / "config.yaml")["datasets"]
    targets = [f"results/data/{name}/live_dead_tokens.safetensors" for name in datasets]
    result = run_snakemake(workdir, "-n", *targets)
    jobs = planned_jobs(result.stdout)
    assert jobs == {"fetch_sdist": 1, "corpus": len(datasets), "tokenizer": len(datasets),
                    "encode": len(datasets), "masks": len(datasets)}
    assert not (workdir / "results").exists()


def test_lint_is_clean_and_every_rule_names_the_conda_environment(workdir):
    result = run_snakemake(workdir, "--lint", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and not re.findall(r"^\s+\* (.+?):$", output, re.M), output
    environment = yaml.safe_load((REPO / "workflow/envs/thimble.yaml").read_text())
    assert "-e ../.." in environment["dependencies"][-1]["pip"]  # the package itself, from the working directory
    rules = "".join(path.read_text() for path in (REPO / "rules").glob("*.smk"))
    assert rules.count('conda:\n        "../workflow/envs/thimble.yaml"') == len(re.findall(r"^rule \w+:", rules, re.M))


def test_experiment_and_series_targets_plan(workdir):
    result = run_snakemake(workdir, "-n", "results/thimble_7/freeze.csv")
    assert planned_jobs(result.stdout) == {"fetch_sdist": 1, "corpus": 1, "tokenizer": 1, "encode": 1, "masks": 1,
                                           "train": 1, "rechunk": 1, "lattice": 1, "freeze_drivers": 1,
                                           "freeze": 1}
    config = load_config(REPO / "config.yaml")
    series = config["series"]["thimble"]
    # thimble_6 trains what thimble_7 trains: its recording is the float16 view of thimble_7's (no training)
    views = [name for name in series if training_twin(config["experiments"], name) in series]
    assert views == ["thimble_6"]
    result = run_snakemake(workdir, "-n", "results/series/thimble/global_freeze.png")
    jobs = planned_jobs(result.stdout)
    assert jobs["train"] == jobs["rechunk"] == len(series) - len(views) and jobs["float16_view"] == len(views)
    assert jobs["lattice"] == jobs["freeze"] == jobs["figures"] == jobs["freeze_drivers"] == len(series)
    assert jobs["replay"] == len(series) and jobs["corpus"] == 1 and jobs["series"] == 1


def test_the_update_rule_series_plans_one_run_per_rule(workdir):
    from thimble.update_rules import UPDATE_RULES

    config = load_config(REPO / "config.yaml")
    members = config["series"]["small_update_rules"]
    assert sorted(config["experiments"][name]["training"]["update_rule"] for name in members) == sorted(UPDATE_RULES)
    # the same experiment but for its rule: what the series compares
    comparable = [{**config["experiments"][name]["training"], "update_rule": None} for name in members]
    assert all(training == comparable[0] for training in comparable)
    result = run_snakemake(workdir, "-n", "results/series/small_update_rules/global_freeze.png")
    jobs = planned_jobs(result.stdout)
    assert jobs["train"] == jobs["replay"] == jobs["freeze"] == jobs["freeze_drivers"] == jobs["figures"] == \
        len(UPDATE_RULES)
    assert jobs["corpus"] == 1 and jobs["series"] == 1


@pytest.mark.workflow
def test_mini_training_through_snakemake(mini_data):
    run_snakemake(mini_data, "--cores", "2", "results/thimble_mini/delta_w_lattice.h5",
                  "results/thimble_mini/replay.json")
    replay = json.loads((mini_data / "results/thimble_mini/replay.json").read_text())
    assert replay["bitwise_match"] and replay["same_kernel"] and replay["steps"] == 60
    with h5py.File(mini_data / "results/thimble_mini/delta_w_lattice.h5", "r") as delta:
        assert delta["delta_w_lattice"].shape == (61, 384, 16) and delta["delta_w_lattice"].chunks[0] == 25
    settings = load_config(REPO / "config.yaml")["experiments"]["thimble_mini"]
    steps, vocab, hidden = (settings["training"]["steps"], settings["model"]["vocab_size"],
                            settings["model"]["hidden_dim"])
    with open_stream(mini_data / "results/thimble_mini/stream") as stream:
        assert stream["W"].shape == (steps + 1, vocab, hidden)
        assert stream.attrs["experiment"] == "thimble_mini"
        assert np.isfinite(stream["losses"][1:]).all()
    log = (mini_data / "logs/thimble_mini/train.log").read_text()
    assert "safety check" in log and "step/s" in log and "loss=" in log
    assert "[transformers]" not in log and "warning" not in log.lower(), log
    # one RAM estimate: the one `thimble plan` and the rules' mem_mb use
    n_tokens = len(np.load(mini_data / "results/data/shakespeare_mini/tokens.npy"))
    peak = peak_ram_bytes(settings, any_calibration(settings, mini_data).record, n_tokens)["train"]
    assert f"peak RAM about {format_bytes(peak)} (thimble plan's model" in log
    assert not (mini_data / "results/thimble_mini/.partial").exists()
    for stage in ("rechunk", "lattice", "replay"):
        assert (mini_data / f"logs/thimble_mini/{stage}.log").stat().st_size > 0
    with h5py.File(mini_data / "results/thimble_mini/recording.h5", "r") as recording:
        check = json.loads(recording.attrs["determinism_check"])
    assert check["result"] == "bitwise identical" and check["steps_compared"] == [1, 2]
    assert "determinism check on cpu: steps 1..2 ran twice and agree bit for bit" in log

    # the check changes no recorded bit: editing it reruns nothing (a trajectory setting reruns training)
    def planned_after(edit):
        config = offline_config()
        config["defaults"] = {**config.get("defaults", {}), "training": {
            **config.get("defaults", {}).get("training", {}), **edit}}
        (mini_data / "edited.yaml").write_text(yaml.safe_dump(config))
        result = run_snakemake(mini_data, "-n", "results/thimble_mini/delta_w_lattice.h5",
                               "results/thimble_mini/replay.json", "--configfile", str(mini_data / "edited.yaml"))
        return planned_jobs(result.stdout) if "Job stats:" in result.stdout else {}

    assert planned_after({"determinism_check_steps": 0}) == {}
    assert planned_after({"learning_rate": 5e-4}).get("train") == 1


@pytest.mark.workflow
def test_mini_freeze_tables_figures_series_and_report(mini_data):
    (mini_data / "series.yaml").write_text(yaml.safe_dump(mini_series_config()))
    run_snakemake(mini_data, "--cores", "2", "results/series/mini/global_freeze.png",
                  "--configfile", str(mini_data / "series.yaml"))
    results = mini_data / "results/thimble_mini"
    import pandas as pd
    freeze = pd.read_csv(results / "freeze.csv")
    assert freeze["step"].tolist() == list(range(1, 61))
    with h5py.File(results / "delta_w_lattice.h5", "r") as delta, h5py.File(results / "recording.h5", "r") as rec:
        moved = (delta["delta_w_lattice"][1:] != 0).any(axis=2)
        dead = rec["dead_mask"][...]
    np.testing.assert_array_equal(freeze["all_moved_tokens"], moved.sum(axis=1))
    np.testing.assert_array_equal(freeze["dead_moved_tokens"], moved[:, dead].sum(axis=1))
    summary = json.loads((results / "summary.json").read_text())
    assert set(summary["windows"]) == {"all", "last_half", "last_third"}
    assert summary["verdict"] in VERDICTS
    assert {m: v in VERDICTS for group in summary["verdicts"].values() for m, v in group.items()} == \
        {m: True for m in MEASURES}
    for table in ("freeze_cycles.csv", "token_freeze.csv", "displacement_classes.csv", "exp_avg_sq.csv",
                  "lattice_positions.csv"):
        assert len(pd.read_csv(results / table)) > 0
    for figure in FIGURES:
        assert (results / "figures" / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    verdicts = pd.read_csv(mini_data / "results/series/mini/verdicts.csv")
    # two experiments x three groups x three measures
    assert set(verdicts["experiment"]) == {"thimble_mini", "thimble_mini_f16"} and len(verdicts) == 18
    exact = dict(zip(verdicts["experiment"], verdicts["delta_w_exact"]))
    assert exact == {"thimble_mini": True, "thimble_mini_f16": False} and summary["delta_w_exact"] is True
    f16_replay = json.loads((mini_data / "results/thimble_mini_f16/replay.json").read_text())
    assert f16_replay["storage_dtype"] == "float16" and not f16_replay["bitwise_match"]
    run_snakemake(mini_data, "--report", str(mini_data / "report.html"), "results/series/mini/global_freeze.png",
                  "--configfile", str(mini_data / "series.yaml"))
    report = (mini_data / "report.html").read_text(errors="replace")
    assert "freeze.csv" in report and "global_freeze.png" in report
    # the answers are readable inside the report, not only downloadable
    assert "summary.html" in report and "verdicts.html" in report
    page = (results / "summary.html").read_text()
    assert "<table" in page and summary["verdict"] in page
    # the freeze drivers: every step and group, the identity to float rounding, frozen_share as freeze.csv
    # counts it, and the answer per group in summary.json and on the page
    drivers = pd.read_csv(results / "freeze_drivers.csv")
    assert len(drivers) == 3 * 60 and "freeze_drivers.csv" in report
    split = (np.log2(1e-3) + drivers["mean_log2_abs_m_hat"] - drivers["mean_log2_denominator"]
             - drivers["mean_log2_half_spacing"])
    np.testing.assert_allclose(drivers["mean_log2_ratio"], split, rtol=0, atol=1e-9)
    for group in ("dead", "live", "all"):
        rows = drivers[drivers["group"] == group]
        np.testing.assert_array_equal(rows["frozen_share"], freeze[f"{group}_frozen_element_share"])
        assert summary["drivers"][group]["answer"] in page
    assert summary["drivers"]["applies"] and summary["drivers"]["inputs_exact"]
    f16 = json.loads((mini_data / "results/thimble_mini_f16/summary.json").read_text())
    assert f16["drivers"]["inputs_exact"] is False


@pytest.mark.workflow
def test_stream_is_temporary_when_not_kept(mini_data, tmp_path):
    config = offline_config()
    config["experiments"]["thimble_mini"]["rechunk"]["keep_stream"] = False
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.copytree(mini_data / "results/data", tmp_path / "results/data")
    result = run_snakemake(tmp_path, "--cores", "2", "results/thimble_mini/recording.h5",
                           "results/thimble_mini/replay.json")
    assert "Removing temporary output results/thimble_mini/stream" in result.stdout + result.stderr
    assert not (tmp_path / "results/thimble_mini/stream").exists()
    assert (tmp_path / "results/thimble_mini/recording.h5").exists()
