"""An experiment whose source is a recording made by thimble.Recorder: the config, the DAG (rechunk and the stages
after it, no data or train stage), the checks at -n that name the file, `thimble plan`, and the rechunk job."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
import yaml
from conftest import offline_config, run_snakemake
from test_imports import probed

from thimble.config import ConfigError, resolve_config, stage_settings, training_twin
from thimble.outputs import STREAM_DIR, STREAM_FILE
from thimble.util.files import sha256_file

#: what the config names the experiment, and the name the loop recorded it under
EXPERIMENT, RECORDED_AS = "my_run", "loop_run"
#: the rules that make an experiment's summary.html from a recording, and those it must not run
RECORDING_RULES = {"rechunk_recording", "lattice", "replay", "freeze_drivers", "freeze_recording", "figures"}
NOT_FOR_RECORDINGS = {"fetch_sdist", "corpus", "tokenizer", "encode", "masks", "train", "train_temporary_stream",
                      "rechunk", "freeze", "float16_view"}
#: the tiny model's parameters, as named_parameters() names them
PARAMS = ["0.weight", "1.weight", "1.bias", "2.weight", "2.bias"]


def record_loop(path: Path, steps: int = 40, seed: int = 0) -> Path:
    """A plain torch loop recorded by thimble.Recorder: an embedding, a LayerNorm and a linear head in bf16,
    AdamW with weight decay."""
    import torch

    import thimble

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 50))
    model = model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    tokens = torch.randint(0, 50, (16,))
    with thimble.Recorder(path, model, optimizer, tensors="*", name=RECORDED_AS, segment_steps=8) as recorder:
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(tokens).float(), tokens)
            loss.backward()
            optimizer.step()
            recorder.log(loss=loss)
            optimizer.zero_grad()
    return path


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    return record_loop(tmp_path_factory.mktemp("loop") / "my_run")


def recording_config(source: dict, **experiment) -> dict:
    config = offline_config()
    config["experiments"][EXPERIMENT] = {"source": source, "analysis": {"trend_window_steps": 5}, **experiment}
    return config


def place(workdir: Path, recording: Path, config: dict | None = None) -> Path:
    """The recording copied to runs/my_run of ``workdir``, and the config naming it by a relative path."""
    shutil.copytree(recording, workdir / "runs/my_run")
    config = config or recording_config({"recording": "runs/my_run"})
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return workdir / "runs/my_run"


def planned_rules(output: str) -> dict[str, int]:
    rules: dict[str, int] = {}
    for line in output.splitlines():
        if line.startswith(("rule ", "localrule ")):
            name = line.split()[1].rstrip(":")
            rules[name] = rules.get(name, 0) + 1
    return rules


# -- the config ------------------------------------------------------------------------------------------------

def test_a_recording_experiment_has_rechunk_and_analysis_settings_only():
    config = recording_config({"recording": "runs/my_run", "tensors": ["0.*"]}, rechunk={"steps_per_chunk": 10},
                              description="a loop of mine")
    config["series"] = {"mixed": ["thimble_mini", EXPERIMENT]}
    resolved = resolve_config(config)
    experiment = resolved["experiments"][EXPERIMENT]
    assert set(experiment) == {"name", "description", "source", "rechunk", "analysis"}
    assert experiment["source"] == {"recording": "runs/my_run", "tensors": ["0.*"], "experiment": None}
    assert experiment["rechunk"]["steps_per_chunk"] == 10 and experiment["analysis"]["trend_window_steps"] == 5
    # the defaults' rechunk and analysis apply; their model and training do not
    assert experiment["rechunk"]["compression_level"] == resolved["experiments"]["thimble_mini"]["rechunk"][
        "compression_level"]
    # rechunk reads the name and the recording's path; what the recording must hold is not a tracked setting
    assert stage_settings(experiment, "rechunk") == {"rechunk": experiment["rechunk"], "name": EXPERIMENT,
                                                     "source": {"recording": "runs/my_run"}}
    assert stage_settings(experiment, "freeze") == {"name": EXPERIMENT, "analysis": experiment["analysis"]}
    with pytest.raises(ConfigError, match="has no train stage"):
        stage_settings(experiment, "train")
    assert training_twin(resolved["experiments"], EXPERIMENT) is None
    assert training_twin(resolved["experiments"], "thimble_mini") is None


@pytest.mark.parametrize("key, value, message", [
    ("dataset", "shakespeare_mini", "experiments.my_run.dataset: the experiment's source is the recording "
                                    "runs/my_run, and its data went through the loop"),
    ("training", {"steps": 10}, "experiments.my_run.training: the experiment's source is the recording runs/my_run, "
                                "and it trains nothing"),
    ("model", {"hidden_dim": 8}, "experiments.my_run.model: "),
    ("record", {"tensors": ["*"]}, "experiments.my_run.record: "),
    ("float16_view", False, "experiments.my_run.float16_view: "),
    ("rechunk", {"keep_stream": True}, "experiments.my_run.rechunk.keep_stream: the experiment's source is the "
                                       "recording runs/my_run, whose stream is the loop's own and is never deleted"),
    ("analysis", {"windows": [[5, 2]]}, "experiments.my_run.analysis.windows[0]: [5, 2] must satisfy 1 <= start <= "
                                        "end <= the recording's steps"),
])
def test_a_recording_experiment_refuses_what_it_cannot_have(key, value, message):
    with pytest.raises(ConfigError) as error:
        resolve_config(recording_config({"recording": "runs/my_run"}, **{key: value}))
    assert message in str(error.value)


def test_an_experiment_names_a_dataset_or_a_recording():
    config = offline_config()
    config["experiments"]["nothing"] = {"description": "neither"}
    with pytest.raises(ConfigError, match=r"config key experiments.nothing: give dataset .* or source: \{recording"):
        resolve_config(config)
    with pytest.raises(ConfigError, match="unknown config key experiments.my_run.source.steps"):
        resolve_config(recording_config({"recording": "runs/my_run", "steps": 3}))


def test_what_the_dag_reads_of_a_recording_is_what_its_stream_holds(recording):
    """The sizes the rules read from recorder.json and the segments' names (no HDF5) equal those of stream.h5, for
    a recording named by an absolute path."""
    from thimble.plan.recording import folder_problem, recorded_run, recorded_run_of_stream

    experiment = resolve_config(recording_config({"recording": str(recording)}))["experiments"][EXPERIMENT]
    assert folder_problem(experiment, Path("/nonexistent")) is None  # an absolute path is taken as it is
    from_json = recorded_run(experiment)
    from_stream, attrs = recorded_run_of_stream(experiment)
    assert from_json == from_stream and from_json.steps == 40 and list(from_json.params) == PARAMS
    assert from_json.params["0.weight"] == ((50, 8), {"value": "bfloat16", "grad": "bfloat16",
                                                       "exp_avg": "bfloat16", "exp_avg_sq": "bfloat16"})
    assert attrs["experiment"] == RECORDED_AS and attrs["recorded_by"] == "thimble.Recorder"


# -- the DAG ---------------------------------------------------------------------------------------------------

def test_the_dry_run_plans_the_stages_after_training_and_nothing_heavy(workdir, recording, tmp_path, monkeypatch):
    place(workdir, recording)
    heavy = probed(tmp_path, monkeypatch)
    result = run_snakemake(workdir, "-n", f"results/{EXPERIMENT}/summary.html")
    rules = planned_rules(result.stdout)
    assert set(rules) == RECORDING_RULES and not set(rules) & NOT_FOR_RECORDINGS, rules
    assert "recording=found" in result.stdout and "mem_mb=" in result.stdout
    assert not heavy.exists(), heavy.read_text()
    # a series may hold an experiment that analyses a recording beside one that trains
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["series"] = {"mixed": ["thimble_mini", EXPERIMENT]}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    rules = planned_rules(run_snakemake(workdir, "-n", "results/series/mixed/global_freeze.png").stdout)
    assert rules["rechunk_recording"] == rules["rechunk"] == rules["freeze"] == rules["freeze_recording"] == 1
    assert rules.get("train", 0) + rules.get("train_temporary_stream", 0) == 1 and rules["series"] == 1


def break_recording(recording: Path, how: str) -> None:
    stream = recording / STREAM_DIR
    if how == "missing":
        shutil.rmtree(recording)
    elif how == "no stream":
        shutil.rmtree(stream)
    elif how == "partial":
        (stream / STREAM_FILE).unlink()
    elif how == "not the recorder's":
        (stream / "recorder.json").unlink()
    elif how == "another source":
        run = json.loads((stream / "recorder.json").read_text())
        run["attrs"]["recorded_by"] = "my.own.Recorder"
        (stream / "recorder.json").write_text(json.dumps(run))
    elif how == "segment missing":
        (stream / "segment_000008-000015.h5").unlink()


@pytest.mark.parametrize("how, message", [
    ("missing", "config key experiments.my_run.source.recording: runs/my_run (in {workdir}) does not exist; record "
                "into it with thimble.Recorder('runs/my_run', model, optimizer)"),
    ("no stream", "config key experiments.my_run.source.recording: runs/my_run (in {workdir}) holds no recording "
                  "(runs/my_run/stream is missing"),
    ("partial", "runs/my_run/stream holds a partial recording: segments of steps 0..40 but no stream.h5"),
    ("not the recorder's", "runs/my_run/stream/stream.h5 was not written by thimble.Recorder (there is no "
                           "recorder.json beside it"),
    ("another source", "runs/my_run/stream/recorder.json says it was recorded by 'my.own.Recorder', not "
                       "'thimble.Recorder'"),
    ("segment missing", "runs/my_run/stream: no segment holds steps 8..15 (a segment is missing)"),
])
def test_a_recording_that_is_not_what_the_config_says_is_named_with_its_fix(workdir, recording, how, message,
                                                                             monkeypatch):
    """The check the dry run makes (``folder_problem``, run as the rechunk job's resource), case by case; that the
    dry run stops on it is the next test's."""
    from thimble.plan.recording import folder_problem

    break_recording(place(workdir, recording), how)
    monkeypatch.chdir(workdir)  # relative recordings are the working directory's, as under snakemake
    experiment = resolve_config(yaml.safe_load((workdir / "config.yaml").read_text()))["experiments"][EXPERIMENT]
    problem = " ".join(folder_problem(experiment).split())
    assert message.format(workdir=workdir) in problem, problem
    if how == "partial":
        assert f"thimble.record.recorder.close_partial('{workdir / 'runs/my_run'}')" in problem


def test_a_partial_recording_stops_the_dry_run_naming_it(workdir, recording):
    break_recording(place(workdir, recording), "partial")
    result = run_snakemake(workdir, "-n", f"results/{EXPERIMENT}/summary.html", check=False)
    assert result.returncode != 0
    output = " ".join((result.stdout + result.stderr).split())
    assert "runs/my_run/stream holds a partial recording: segments of steps 0..40 but no stream.h5" in output


def test_a_partial_recording_is_analysed_once_close_partial_made_it_readable(workdir, recording):
    from thimble.record.recorder import close_partial

    source = place(workdir, recording)
    (source / STREAM_DIR / STREAM_FILE).unlink()  # as a loop killed before its recorder closed leaves it
    (source / STREAM_DIR / "segment_000040-000040.h5").unlink()
    result = run_snakemake(workdir, "-n", f"results/{EXPERIMENT}/recording.h5", check=False)
    assert result.returncode != 0
    assert "holds a partial recording: segments of steps 0..39" in result.stdout + result.stderr
    close_partial(source)
    assert "rule rechunk_recording:" in run_snakemake(workdir, "-n", f"results/{EXPERIMENT}/recording.h5").stdout
    with h5py.File(source / STREAM_DIR / STREAM_FILE, "r") as stream:
        assert stream.attrs["interrupted"] and stream["losses"].shape == (40,)


@pytest.mark.parametrize("source, message", [
    ({"tensors": ["transformer.wte.weight", "0.*"]},
     "runs/my_run/stream/recorder.json records 5 parameters (0.weight, 1.weight, 1.bias, 2.weight, 2.bias), and none "
     "is named 'transformer.wte.weight', which config key experiments.my_run.source.tensors expects: it is a "
     "recording of another model"),
    ({"experiment": "another_run"},
     "runs/my_run/stream/recorder.json was recorded as experiment 'loop_run', but config key "
     "experiments.my_run.source.experiment expects 'another_run'"),
])
def test_a_recording_of_another_model_or_run_is_named_with_its_fix(workdir, recording, source, message, monkeypatch):
    from thimble.plan.recording import folder_problem

    place(workdir, recording, recording_config({"recording": "runs/my_run", **source}))
    monkeypatch.chdir(workdir)
    experiment = resolve_config(yaml.safe_load((workdir / "config.yaml").read_text()))["experiments"][EXPERIMENT]
    assert message in " ".join(folder_problem(experiment).split())


def test_an_analysis_window_past_the_recording_stops_the_dry_run(workdir, recording):
    place(workdir, recording, recording_config({"recording": "runs/my_run"},
                                               analysis={"trend_window_steps": 5, "windows": [[10, 41]]}))
    result = run_snakemake(workdir, "-n", f"results/{EXPERIMENT}/summary.html", check=False)
    assert result.returncode != 0
    assert ("config key experiments.my_run.analysis.windows[0]: [10, 41] ends after the recording's last step 40"
            in " ".join((result.stdout + result.stderr).split()))


# -- thimble plan ----------------------------------------------------------------------------------------------

def test_thimble_plan_sizes_the_recording_from_its_stream(workdir, recording):
    place(workdir, recording)
    result = subprocess.run([sys.executable, "-m", "thimble", "plan", "--directory", str(workdir),
                             f"results/{EXPERIMENT}/summary.html", "--json", str(workdir / "plan.json")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    entry = json.loads((workdir / "plan.json").read_text())["experiments"][EXPERIMENT]
    assert entry["recording"] == str(workdir / "runs/my_run")
    recorded = entry["recorded"]
    assert list(recorded["shapes"]) == PARAMS and recorded["shapes"]["0.weight"] == [50, 8]
    assert recorded["values_per_step"] == 50 * 8 + 8 + 8 + 8 * 50 + 50
    assert recorded["datasets"] == ["value", "grad", "exp_avg", "exp_avg_sq"]
    assert recorded["optimizer_class"] == "torch.optim.adamw.AdamW" and not recorded["interrupted"]
    assert set(entry["peak_ram_bytes"]) == set(entry["stage_seconds"]) == {
        "rechunk", "lattice", "replay", "freeze_drivers", "freeze", "figures"}
    assert entry["training_seconds"] == {"cpu": None, "cuda": None}
    files = {file["relative"]: file for file in entry["files"]}
    segments = sum(path.stat().st_size for path in (workdir / "runs/my_run/stream").glob("segment_*.h5"))
    assert files["recording.h5"]["bytes"] == segments and files["recording.h5"]["stage"] == "rechunk"
    assert "stream" not in files
    assert "steps 0..40 of torch.optim.adamw.AdamW" in result.stdout
    assert "training: none; it analyses the recording in" in result.stdout
    # a broken recording: the plan names it as the dry run does
    (workdir / "runs/my_run/stream/stream.h5").unlink()
    result = subprocess.run([sys.executable, "-m", "thimble", "plan", "--directory", str(workdir),
                             f"results/{EXPERIMENT}/summary.html"], capture_output=True, text=True)
    assert result.returncode == 1 and "holds a partial recording" in result.stderr


# -- the rechunk job -------------------------------------------------------------------------------------------

def test_rechunk_makes_the_experiments_recording_and_reruns_on_a_new_recording(workdir, recording, tmp_path):
    from thimble.record.format import check_own_folder
    from thimble.record.reader import read_steps

    source = place(workdir, recording)
    run_snakemake(workdir, "--cores", "1", f"results/{EXPERIMENT}/recording.h5")
    output = workdir / f"results/{EXPERIMENT}/recording.h5"
    with h5py.File(output, "r") as rechunked, h5py.File(source / STREAM_DIR / STREAM_FILE, "r") as stream:
        check_own_folder(rechunked)  # the stages' trust check: the file is this experiment's
        attrs = rechunked.attrs
        assert attrs["experiment"] == EXPERIMENT and attrs["source_experiment"] == RECORDED_AS
        assert attrs["recorded_by"] == "thimble.Recorder"
        assert attrs["source_recording"] == str(source.resolve())
        assert attrs["source_stream_sha256"] == sha256_file(source / STREAM_DIR / STREAM_FILE)
        digests = {(name, key): rechunked[f"params/{name}/{key}"].attrs["sha256"] for name in PARAMS
                   for key in ("value", "grad", "exp_avg", "exp_avg_sq")}
        assert len(digests) == 20 and len(attrs["source_tensors_sha256"]) == 64
        assert (read_steps(rechunked["params/0.weight/value"]) == read_steps(stream["params/0.weight/value"])).all()
    # nothing to do again; an edit of what the config expects of the recording reruns nothing either
    assert "Nothing to be done" in run_snakemake(workdir, "-n", f"results/{EXPERIMENT}/recording.h5").stdout
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["experiments"][EXPERIMENT]["source"].update(tensors=["0.*"], experiment=RECORDED_AS)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    assert "Nothing to be done" in run_snakemake(workdir, "-n", f"results/{EXPERIMENT}/recording.h5").stdout
    # a new recording moved into place (its files older than recording.h5) reruns rechunk and what follows
    again = record_loop(tmp_path / "again" / "my_run", seed=1)
    shutil.rmtree(source)
    shutil.copytree(again, source)
    rules = planned_rules(run_snakemake(workdir, "-n", f"results/{EXPERIMENT}/summary.html").stdout)
    assert set(rules) == RECORDING_RULES, rules


def test_the_rechunk_job_checks_the_stream_itself(recording, tmp_path):
    from thimble.record.rechunk import RecordingSourceError, rechunk_stream

    outside = {"name": EXPERIMENT, "source": {"recording": str(recording), "tensors": ["lm_head.*"]}}
    with pytest.raises(RecordingSourceError, match=r"stream/stream.h5 records 5 parameters .* none is named "
                                                   r"'lm_head.\*'"):
        rechunk_stream(recording / STREAM_DIR, tmp_path / "recording.h5", 8, 2**31, outside=outside)
    copy = tmp_path / "copy"
    shutil.copytree(recording, copy)
    with h5py.File(copy / STREAM_DIR / STREAM_FILE, "r+") as stream:
        stream.attrs["recorded_by"] = "thimble training"
    outside = {"name": EXPERIMENT, "source": {"recording": str(copy)}}
    with pytest.raises(RecordingSourceError, match="is not a recording of thimble.Recorder"):
        rechunk_stream(copy / STREAM_DIR, tmp_path / "recording.h5", 8, 2**31, outside=outside)
    assert not (tmp_path / "recording.h5").exists()


@pytest.mark.workflow
def test_the_whole_analysis_of_a_recording(workdir, recording):
    place(workdir, recording)
    run_snakemake(workdir, "--cores", "2", f"results/{EXPERIMENT}/summary.html")
    results = workdir / f"results/{EXPERIMENT}"
    assert (results / "summary.html").stat().st_size > 0
    summary = json.loads((results / "summary.json").read_text())
    assert list(summary["tensors"]) == PARAMS
    assert not list((workdir / "results").glob("data")), "no data stage ran"
    # the notebook reads it as it reads thimble's own runs: every parameter, bit for bit, and a DataTree without
    # token coordinates (the loop gave no token groups)
    import warnings

    import thimble
    from thimble.record.reader import RecordedTensor

    with h5py.File(workdir / "runs/my_run" / STREAM_DIR / STREAM_FILE) as stream:
        recorded = RecordedTensor.of_recording(stream, "params/2.weight/value").bits(0, 41)
    with thimble.open_run(results) as run, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer: no token_text coordinate
        assert list(run.params) == PARAMS
        assert (run.param("2.weight").value[7].view(torch.int16).numpy().view("u2") == recorded[7]).all()
        tree = run.to_datatree()
        assert sorted(tree.children) == sorted(PARAMS) and "token" not in tree.ds.dims
        settings = run.hyperparameters
        assert settings.shape[0] == 41 and (settings["lr"] == 1e-2).all() and (settings["weight_decay"] == 0.1).all()
