"""`thimble plan`: the size, memory and time models, and the plan against a real thimble_mini run."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_snakemake, write_offline_config
from thimble import plan
from thimble.config import load_config
from thimble.outputs import EXPERIMENT_FILES
from thimble.plan import calibration, costs, measure
from thimble.sizes import EMBEDDING, recorded_elements, step_flops


def test_size_models_scale_with_steps():
    assert costs.predict_size({"kind": "constant", "bytes": 123}, 1000, 10) == 123
    per_step = {"kind": "per_step", "fixed": 100, "per_row": 10.0, "row_offset": 1}
    assert costs.predict_size(per_step, 59, 10) == 100 + 10 * 60
    # 61 steps in segments of 20: 4 segment files and stream.h5
    stream = {"kind": "stream", "per_row": 1000.0, "per_file": 50.0}
    assert costs.predict_size(stream, 60, 20) == 61 * 1000 + 5 * 50
    flat = {"kind": "decaying", "fixed": 7, "probe_stored": 240, "probe_steps": 24, "exponent": 0.0}
    assert costs.predict_size(flat, 60, 20) == 7 + 600  # no decay: the probe's rate per step
    decaying = dict(flat, exponent=-0.5)
    assert costs.predict_size(decaying, 60, 20) < 7 + 600
    assert costs.predict_size({"kind": "not_predicted"}, 60, 20) is None


def test_power_sum_and_decay_exponent():
    assert costs.power_sum(4, 0.0) == 4
    assert costs.power_sum(3, 1.0) == 6
    steps = np.arange(1, 40, dtype=float)
    assert measure.decay_exponent(steps, 5000 * steps ** -0.3) == pytest.approx(-0.3)
    assert measure.decay_exponent(steps, 5000 * steps ** 0.2) == 0.0  # growth is not extrapolated
    assert measure.decay_exponent(np.array([1.0]), np.array([10.0])) == 0.0


def test_csv_model_tells_per_step_tables_from_fixed_ones(tmp_path):
    per_step = tmp_path / "per_step.csv"
    per_step.write_text("step,value\n" + "".join(f"{t},{t * 2}\n" for t in range(1, 11)))
    model = measure.measure_file(per_step, 10)
    assert model["kind"] == "per_step" and model["row_offset"] == 0
    assert costs.predict_size(model, 10, 5) == per_step.stat().st_size
    per_token = tmp_path / "tokens.csv"
    per_token.write_text("token,value\n" + "".join(f"{t},1\n" for t in range(384)))
    assert measure.measure_file(per_token, 10) == {"kind": "constant", "bytes": per_token.stat().st_size,
                                                "probe_bytes": per_token.stat().st_size}
    # one row per step and group: the per-step bytes are the three rows'
    drivers = tmp_path / "freeze_drivers.csv"
    rows = "".join(f"{t},{group},1\n" for t in range(1, 11) for group in ("dead", "live", "all"))
    drivers.write_text("step,group,value\n" + rows)
    model = measure.measure_file(drivers, 10)
    assert model["kind"] == "per_step" and model["row_offset"] == 0
    assert costs.predict_size(model, 10, 5) == drivers.stat().st_size


def test_step_time_from_another_shape_is_scaled_by_flops(tmp_path):
    config = load_config(REPO / "config.yaml")
    mini, big = config["experiments"]["thimble_mini"], config["experiments"]["thimble_7"]
    calibrations = tmp_path / plan.CALIBRATION_DIR
    calibrations.mkdir(parents=True)
    record = {"format": plan.CALIBRATION_FORMAT, "device_kind": "cuda", "probed_as": "thimble_7",
              "step_flops": step_flops(big), "first_step_seconds": 2.0, "seconds_per_step": 0.5,
              "device_name": "a GPU", "host": "h", "probe_settings": big, "token_source": "random",
              "torch_threads": big["training"]["math_threads"]}
    (calibrations / "x-cuda.json").write_text(json.dumps(record))
    seconds, calibration = plan.training_seconds(mini, "cuda", tmp_path)
    ratio = step_flops(mini) / step_flops(big)
    assert seconds == pytest.approx((2.0 + 0.5 * (mini["training"]["steps"] - 1)) * ratio)
    assert "scaled by step FLOPs" in calibration.note and "thimble_7" in calibration.note
    same, _ = plan.training_seconds(big, "cuda", tmp_path)
    assert same == pytest.approx(2.0 + 0.5 * (big["training"]["steps"] - 1))


def test_targets_outside_the_config_fail_with_snakemakes_reason(workdir):
    result = subprocess.run([sys.executable, "-m", "thimble", "plan", "--directory", str(workdir),
                             "results/no_such_experiment/freeze.csv"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "snakemake could not plan results/no_such_experiment/freeze.csv" in result.stderr


def thimble_plan(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "thimble", "plan", "--directory", str(workdir), *args],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


MINI_TARGETS = ("results/thimble_mini/freeze.csv", "results/thimble_mini/replay.csv",
                "results/thimble_mini/figures/loss.png")


def test_plan_predicts_a_real_mini_run_within_20_percent(mini_data, tmp_path, monkeypatch):
    write_offline_config(tmp_path)
    shutil.copytree(mini_data / "results/data", tmp_path / "results/data")
    first = thimble_plan(tmp_path, *MINI_TARGETS, "--json", str(tmp_path / "plan.json"))
    assert "probing thimble_mini on cpu" in first.stderr
    # progress while probing: each stage of both probe lengths, as the workflow starts it
    for stage in plan.STAGES:
        assert f"probe thimble_mini (2/2: 24 steps on cpu): {stage}" in first.stderr, first.stderr
    assert not list((tmp_path / plan.CALIBRATION_DIR).glob(".probe-*")), "the probe's scratch is removed"
    predicted = json.loads((tmp_path / "plan.json").read_text())
    mini = predicted["experiments"]["thimble_mini"]
    assert mini["token_source"] == "dataset" and mini["probe_steps"] == 24
    assert "to write" in first.stdout and "training on CPU" in first.stdout
    assert "training on GPU: not measured" in first.stdout or mini["training_seconds"]["cuda"]
    assert predicted["fits"] and predicted["bytes_to_write"] > 0

    peaks = tmp_path / "peaks"
    peaks.mkdir()
    monkeypatch.setenv("THIMBLE_PEAK_RSS_DIR", str(peaks))
    run_snakemake(tmp_path, "--cores", "2", *MINI_TARGETS)

    checked = set()
    for file in mini["files"]:
        actual = plan.existing_bytes(tmp_path / file["path"])
        if not file["predicted"]:
            assert file["relative"].startswith("figures/"), file
            continue
        assert file["bytes"] == pytest.approx(actual, rel=0.2), (file["path"], file["bytes"], actual)
        checked.add(file["relative"])
    assert {"stream", "recording.h5", "delta_w_lattice.h5", "token_displacement.h5", "freeze.csv",
            "replay.csv", "summary.json", "freeze_drivers.csv"} <= checked
    for stage, bytes_predicted in mini["peak_ram_bytes"].items():
        measured = int((peaks / f"{stage}.peak_rss").read_text())
        assert bytes_predicted == pytest.approx(measured, rel=0.2), (stage, bytes_predicted, measured)
    assert set(mini["peak_ram_bytes"]) == {"train", "rechunk", "lattice", "replay", "freeze_drivers", "freeze",
                                           "figures"}
    # every stage after training has a time: fitted to the two probe lengths where they resolve its
    # per-step part, else an upper bound that says it is one
    assert set(mini["stage_seconds"]) == set(costs.AFTER_TRAINING)
    record = json.loads(Path(mini["probe"]).read_text())
    for stage, timed in mini["stage_seconds"].items():
        assert timed["upper_bound"] == (not costs.per_step_resolved(record, stage)), stage

    again = thimble_plan(tmp_path, *MINI_TARGETS)
    assert "probing" not in again.stderr, "a cached probe is reused"
    assert "exists" in again.stdout and "to write: 0 B predicted" in again.stdout
    assert ", cached (" in again.stdout


def test_plan_warns_when_the_disk_cannot_hold_it(mini_data, tmp_path, monkeypatch, capsys):
    from thimble import cli

    write_offline_config(tmp_path)
    shutil.copytree(mini_data / "results/data", tmp_path / "results/data")
    monkeypatch.setattr("thimble.plan.target.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    status = cli.main(["plan", "--directory", str(tmp_path), "--probe-steps", "4", "results/thimble_mini/recording.h5"])
    out = capsys.readouterr().out
    assert status == 3
    assert "WARNING: the plan needs" in out and "only 1.00 kB are free" in out
    assert f"  records 1 of 28 parameters (record.tensors ['{EMBEDDING}']): 6,144 values a step" in out
    assert not (tmp_path / "results/thimble_mini").exists(), "planning runs nothing"


def test_stage_time_is_fitted_to_two_probe_lengths():
    # 2 s of start-up and 0.5 s per row (steps + 1): probes of 4 and 9 steps
    fitted = costs.fit_stage_time((4, 2 + 0.5 * 5), (9, 2 + 0.5 * 10))
    assert fitted == pytest.approx({"fixed": 2.0, "per_step": 0.5})
    # steps that cost little beside the start-up are not resolved: the fit would be noise
    start_up = costs.fit_stage_time((4, 3.0), (9, 3.2))
    record = {"stages": {"rechunk": {"seconds": 10.0}, "lattice": {"seconds": 7.0}, "freeze": {"seconds": 3.2}},
              "probe_steps": 9, "short_probe_steps": 4, "stage_times": {"lattice": fitted, "freeze": start_up}}
    assert costs.per_step_resolved(record, "lattice") and not costs.per_step_resolved(record, "freeze")
    times = costs.stage_seconds(record, 99)
    assert times["lattice"] == {"seconds": pytest.approx(2 + 0.5 * 100), "upper_bound": False, "scaled": 1.0}
    # a probe of one length scales its whole time: an upper bound, and said to be one
    assert times["rechunk"] == {"seconds": pytest.approx(10.0 * 100 / 10), "upper_bound": True, "scaled": 1.0}
    assert times["freeze"] == {"seconds": pytest.approx(3.2 * 100 / 10), "upper_bound": True, "scaled": 1.0}
    # a run shorter than the probe: never below the probe's own time (its start-up does not shrink)
    assert costs.stage_seconds(record, 3)["rechunk"]["seconds"] == pytest.approx(10.0)
    # a probe of another shape: the per-step part scales with the recorded values, the fixed start-up does not
    model = {"vocab_size": 100, "hidden_dim": 8, "max_seq_len": 4, "n_layers": 1}
    record["probe_settings"] = {"model": model, "record": {"tensors": [EMBEDDING]}}
    larger = costs.stage_seconds(record, 99, {"model": {**model, "vocab_size": 400}, "record": {"tensors": [EMBEDDING]}})
    assert larger["lattice"]["seconds"] == pytest.approx(2 + 0.5 * 100 * 4) and larger["lattice"]["scaled"] == 4
    # noise, not a negative rate
    assert costs.fit_stage_time((4, 3.0), (24, 2.5)) == {"fixed": 2.5, "per_step": 0.0}


def test_shipped_probe_is_used_when_its_cost_settings_match(tmp_path):
    config = load_config(REPO / "config.yaml")
    thimble_7 = config["experiments"]["thimble_7"]
    shipped = calibration.shipped_calibration_dir() / "thimble_7-cpu.json"
    record = json.loads(shipped.read_text())
    # the shipped probe is thimble_7 as configured, on random tokens (a fresh clone has no dataset yet)
    assert record["probed_as"] == "thimble_7" and record["torch_threads"] == thimble_7["training"]["math_threads"]
    # any length, keeping or deleting its stream: the shipped probe
    shorter = json.loads(json.dumps(thimble_7))
    shorter["training"]["steps"] = 100
    shorter["rechunk"]["keep_stream"] = False
    for settings in (thimble_7, shorter):
        found = calibration.own_calibration(settings, "random", "cpu", tmp_path)
        assert found is not None and found.path == shipped and found.shipped
    assert calibration.why_not_shipped(thimble_7, "random", "cpu") is None
    # another step rate (math threads) or other tokens: not this probe, and the plan says why
    one_thread = json.loads(json.dumps(thimble_7))
    one_thread["training"]["math_threads"] = 1  # thimble_7 trains on 2
    assert calibration.own_calibration(one_thread, "random", "cpu", tmp_path) is None
    assert "training.math_threads 2 there, 1 here" in calibration.why_not_shipped(one_thread, "random", "cpu")
    assert calibration.own_calibration(thimble_7, "dataset", "cpu", tmp_path) is None


def stage_of_rule(rule: str) -> str:
    """The stage a rule runs: a stage's rule is named after it, and its variants start with that name and
    '_' (``train_temporary_stream``, the train rule for experiments that delete their stream)."""
    return next((stage for stage in costs.STAGES if rule == stage or rule.startswith(stage + "_")), rule)


def test_experiment_files_are_what_the_rules_make(workdir):
    from thimble.plan.target import snakemake_summary

    rows = snakemake_summary(workdir, ["results/thimble_mini/figures/loss.png", "results/thimble_mini/replay.json"],
                             REPO / "Snakefile")
    made = {row["output_file"].removeprefix("results/thimble_mini/"): stage_of_rule(row["rule"])
            for row in rows if row["output_file"].startswith("results/thimble_mini/")}
    assert made == EXPERIMENT_FILES


def test_this_cpu_is_what_torch_dispatches_to():
    """The plan tells a foreign probe without importing torch (the rules' resources run while Snakemake
    builds the DAG): its reading of /proc/cpuinfo must name the kernels torch picks here."""
    import torch

    from thimble.plan import machine

    assert machine.this_cpu()["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_a_probe_of_another_cpu_is_rescaled_by_steps_timed_here(tmp_path):
    """A probe measured on another CPU is never used as this machine's: until a step is timed here it is
    marked foreign, and then its step time is this machine's measured one."""
    from thimble.plan import machine

    config = load_config(REPO / "config.yaml")
    mini = config["experiments"]["thimble_mini"]
    elsewhere = {"format": plan.CALIBRATION_FORMAT, "device_kind": "cpu", "device": "cpu", "probed_as": "thimble_mini",
                 "step_flops": step_flops(mini), "first_step_seconds": 9.0, "seconds_per_step": 3.0,
                 "device_name": "a CPU that is not this one", "cpu_capability": "DEFAULT", "host": "elsewhere",
                 "probe_settings": mini, "torch_threads": mini["training"]["math_threads"], "probe_steps": 8,
                 "token_source": "random"}
    calibrations = tmp_path / plan.CALIBRATION_DIR
    calibrations.mkdir(parents=True)
    (calibrations / "elsewhere-cpu.json").write_text(json.dumps(elsewhere))
    assert "device_name 'a CPU that is not this one' there" in machine.foreign_cpu(elsewhere)
    _, untimed = plan.training_seconds(mini, "cpu", tmp_path)
    assert untimed.foreign and "not yet timed here" in untimed.note and untimed.scale == 1.0

    timing = machine.ensure_step_time(tmp_path, elsewhere, mini, logging.getLogger("test"))
    assert timing["cpu"] == machine.this_cpu() and 0 < timing["seconds_per_step"] < 3.0
    threads = mini["training"]["math_threads"]
    assert machine.load_step_time(tmp_path, elsewhere, threads) == timing  # cached for the rules
    assert machine.load_step_time(tmp_path, elsewhere, threads + 1) is None  # another step rate
    seconds, timed = plan.training_seconds(mini, "cpu", tmp_path)
    assert not timed.foreign and "rescaled" in timed.note
    assert elsewhere["seconds_per_step"] * timed.scale == pytest.approx(timing["seconds_per_step"])
    assert seconds == pytest.approx((9.0 + 3.0 * (mini["training"]["steps"] - 1)) * timed.scale)


def test_a_stage_newer_than_the_probe_is_sized_by_its_stand_in():
    # the shipped thimble_7 probe predates freeze_drivers: its memory is freeze's baseline plus its own arrays,
    # its time freeze's (which it stays within at thimble_7 size, docs/benchmarks.md)
    record = json.loads((REPO / "workflow/calibration/thimble_7-cpu.json").read_text())
    record["stages"].pop("freeze_drivers", None)  # as a probe made before the stage existed
    record["stage_times"].pop("freeze_drivers", None)
    settings = load_config(REPO / "config.yaml")["experiments"]["thimble_7"]
    peaks = costs.peak_ram_bytes(settings, record)
    arrays = costs.array_bytes(settings, stages=("freeze", "freeze_drivers"))
    assert peaks["freeze_drivers"] - peaks["freeze"] == arrays["freeze_drivers"] - arrays["freeze"]
    times = costs.stage_seconds(record, settings["training"]["steps"], settings)
    assert times["freeze_drivers"] == {**times["freeze"], "stand_in": "freeze"}
    assert list(times) == list(costs.AFTER_TRAINING)


def probe_record(settings: dict, before_tensors: bool) -> dict:
    """A probe's measurements of ``settings`` cut to 24 steps (made before ``record.tensors`` existed when
    ``before_tensors``: it recorded the embedding alone and its settings lack the key), every stage after
    training resolved: 2 s of start-up and 0.3 s per step."""
    probe = json.loads(json.dumps(settings))
    probe["training"]["steps"] = 24
    if before_tensors:
        del probe["record"]["tensors"]
    return {"probe_settings": probe, "n_tokens": 20000, "probe_steps": 24, "short_probe_steps": 4,
            "stages": {stage: {"peak_rss_bytes": 300_000_000, "seconds": 9.5} for stage in costs.STAGES},
            "stage_times": {stage: {"fixed": 2.0, "per_step": 0.3} for stage in costs.AFTER_TRAINING}}


def test_every_tensor_scales_the_prediction_as_its_recorded_values():
    from thimble.sizes import n_parameters, training_footprint
    from thimble.update_rules import step_bytes

    config = load_config(REPO / "config.yaml")["experiments"]
    embedding, every = config["thimble_small"], config["thimble_small_all"]
    assert embedding["record"]["tensors"] == [EMBEDDING] and every["record"]["tensors"] == ["*"]
    assert recorded_elements(every) == n_parameters(every["model"])
    ratio = recorded_elements(every) / recorded_elements(embedding)
    assert ratio > 1.4  # the embedding is most of thimble_small, not all of it

    # the stream, uncompressed, holds every recorded value of every step
    streams = [training_footprint(settings, 20000)["stream_bytes_uncompressed"] for settings in (embedding, every)]
    assert streams[1] / streams[0] == pytest.approx(ratio)

    # one probe sizes both, as the rules' same-FLOPs calibration does: a probe of the embedding alone
    probe = probe_record(embedding, before_tensors=True)
    peaks = {name: costs.peak_ram_bytes(settings, probe, 20000) for name, settings in
             (("embedding", embedding), ("every", every))}
    # training's recorder queue holds every recorded tensor of queue_steps steps
    rule, storage = every["training"]["update_rule"], every["record"]["dtype"]
    queue_growth = every["record"]["queue_steps"] * (step_bytes(rule, storage, recorded_elements(every))
                                                     - step_bytes(rule, storage, recorded_elements(embedding)))
    assert peaks["every"]["train"] - peaks["embedding"]["train"] == queue_growth > 0
    # the stages after training hold one parameter at a time: the embedding is the largest of both
    for stage in costs.AFTER_TRAINING:
        assert peaks["every"][stage] == peaks["embedding"][stage], stage
    # their time per step follows the recorded values; the start-up does not
    steps = every["training"]["steps"]
    times = {name: costs.stage_seconds(probe, steps, settings) for name, settings in
             (("embedding", embedding), ("every", every))}
    for stage in costs.AFTER_TRAINING:
        assert times["embedding"][stage]["scaled"] == 1.0 and times["every"][stage]["scaled"] == pytest.approx(ratio)
        assert times["every"][stage]["seconds"] - 2.0 == pytest.approx(ratio * (times["embedding"][stage]["seconds"] - 2.0))
    # a probe of every tensor times thimble_small_all as measured
    own = probe_record(every, before_tensors=False)
    assert costs.stage_seconds(own, 24, every)["replay"] == {"seconds": pytest.approx(2.0 + 0.3 * 25),
                                                            "upper_bound": False, "scaled": 1.0}
    assert set(costs.peak_ram_bytes(own["probe_settings"], own, 20000).values()) == {300_000_000}


def test_the_largest_recorded_tensor_sets_a_stages_arrays():
    from thimble.sizes import row_bytes

    every = load_config(REPO / "config.yaml")["experiments"]["thimble_small_all"]
    blocks = json.loads(json.dumps(every))
    blocks["record"]["tensors"] = ["transformer.h.*"]  # no embedding: the MLP's (16, 64) and (64, 16) are largest
    assert row_bytes(blocks) == 16 * 64 * 2 and row_bytes(every) == 1024 * 16 * 2
    arrays = {name: costs.array_bytes(settings, 20000) for name, settings in (("blocks", blocks), ("every", every))}
    steps = every["training"]["steps"]
    # per-row summaries of the parameter with the most rows: the MLP's 64 rows against the embedding's 1024 tokens
    assert arrays["blocks"]["figures"] == 2 * (steps + 1) * 64 * 4
    assert arrays["every"]["figures"] == 2 * (steps + 1) * 1024 * 4
    for stage in ("rechunk", "lattice", "replay", "freeze", "freeze_drivers"):
        assert arrays["blocks"][stage] < arrays["every"][stage], stage
    assert arrays["blocks"]["train"] < arrays["every"]["train"]


def test_the_plan_states_what_is_recorded():
    from thimble.plan.report import format_recorded

    config = load_config(REPO / "config.yaml")["experiments"]
    every = costs.recorded_summary(config["thimble_small_all"])
    assert every["count"] == every["model_parameters"] == 28 and every["largest"] == EMBEDDING
    assert every["values_per_step"] == recorded_elements(config["thimble_small_all"])
    assert every["datasets"] == ["value", "grad", "exp_avg", "exp_avg_sq"]
    text = format_recorded(every)
    assert text.startswith("records 28 of 28 parameters (record.tensors ['*']): 23,488 values a step")
    assert f"the largest {EMBEDDING} 1024 x 16" in text
    alone = format_recorded(costs.recorded_summary(config["thimble_small"]))
    assert alone == (f"records 1 of 28 parameters (record.tensors ['{EMBEDDING}']): 16,384 values a step, 131.07 kB "
                     f"uncompressed with value, grad, exp_avg, exp_avg_sq of each; {EMBEDDING} 1024 x 16")


def test_a_probe_of_the_experiments_own_tensors_times_its_steps(tmp_path):
    config = load_config(REPO / "config.yaml")["experiments"]
    thimble_7, every = config["thimble_7"], config["thimble_7_all"]
    shipped_path = calibration.shipped_calibration_dir() / "thimble_7-cpu.json"
    shipped = json.loads(shipped_path.read_text())
    assert "tensors" not in shipped["probe_settings"]["record"]  # probed before record.tensors: the embedding alone
    assert calibration.own_calibration(every, "random", "cpu", tmp_path) is None
    # thimble_7 asked to record every tensor: the plan says why its shipped probe does not do
    assert (f"record.tensors ['{EMBEDDING}'] there, ['*'] here"
            in calibration.why_not_shipped({**every, "name": "thimble_7"}, "random", "cpu"))
    # until thimble_7_all is probed, the shipped probe of the same step FLOPs times it
    assert calibration.step_time_calibration(every, "cpu", tmp_path).path == shipped_path
    own = {**shipped, "probed_as": "thimble_7_all", "seconds_per_step": 1.05 * shipped["seconds_per_step"],
           "probe_settings": {**shipped["probe_settings"],
                              "record": {**shipped["probe_settings"]["record"], "tensors": ["*"]}}}
    (tmp_path / plan.CALIBRATION_DIR).mkdir(parents=True)
    (tmp_path / plan.CALIBRATION_DIR / "own-cpu.json").write_text(json.dumps(own))
    assert calibration.step_time_calibration(every, "cpu", tmp_path).record["probed_as"] == "thimble_7_all"
    # and thimble_7 keeps its own, though the cached probe of every tensor has its step FLOPs and is found first
    assert calibration.step_time_calibration(thimble_7, "cpu", tmp_path).path == shipped_path


def test_a_recording_measures_each_dataset_once_through_its_hard_links(tmp_path):
    import h5py

    path = tmp_path / "recording.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as handle:
        for name, shape in ((EMBEDDING, (12, 4)), ("transformer.ln_f.bias", (4,))):
            for key in ("value", "grad"):
                handle.create_dataset(f"params/{name}/{key}", data=rng.integers(0, 2**16, (11, *shape), np.uint16),
                                      chunks=(4, *shape), compression="gzip")
        # the embedding's seed names, as the recording links them
        handle["W"], handle["grad_W"] = handle[f"params/{EMBEDDING}/value"], handle[f"params/{EMBEDDING}/grad"]
    with h5py.File(path, "r") as handle:
        stored = sum(handle[f"params/{name}/{key}"].id.get_storage_size()
                     for name in (EMBEDDING, "transformer.ln_f.bias") for key in ("value", "grad"))
    model = measure.measure_file(path, 10)
    assert model["per_row"] * 11 == pytest.approx(stored)
    assert costs.predict_size(model, 10, 5) == path.stat().st_size
