"""The mini experiment through the SLURM profile on a real one-node cluster (tests/slurm/cluster.sh).

Skips, with the reason, where no SLURM cluster answers; under CI (CI=true), .ci/run brings the
cluster up first and a missing cluster is a failure, not a skip.
"""

import json
import os
import re
import shutil
import subprocess

import h5py
import hdf5plugin  # noqa: F401  (the zstd filter)
import numpy as np
import pytest

from conftest import REPO, run_snakemake, write_offline_config


def cluster_problem() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "SLURM is not installed (sbatch/sinfo not found); tests/slurm/cluster.sh up installs and starts it"
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if result.returncode != 0 or not re.search(r"idle|mixed|allocated", result.stdout):
        return f"no SLURM node is up ({(result.stdout + result.stderr).strip()}); run tests/slurm/cluster.sh up"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed"
    return None


def default_partition(sinfo_partitions: str) -> str:
    """The partition sbatch uses when none is named, from ``sinfo -h -o %P``: the one marked '*', else the
    first (the test must run on whatever cluster the host already has, not assume a partition's name)."""
    names = sinfo_partitions.split()
    if not names:
        raise ValueError("sinfo lists no partition")
    return next((name[:-1] for name in names if name.endswith("*")), names[0])


def test_default_partition_is_the_starred_one():
    assert default_partition("debug\ngpu*\nlong\n") == "gpu"
    assert default_partition("main*\n") == "main"
    assert default_partition("short\nlong\n") == "short"
    with pytest.raises(ValueError):
        default_partition("")


@pytest.fixture(scope="module")
def slurm_run(mini_data, tmp_path_factory):
    problem = cluster_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the SLURM test: {problem}")
        pytest.skip(problem)
    partition = default_partition(subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True,
                                                 timeout=30).stdout)
    workdir = tmp_path_factory.mktemp("slurm")
    write_offline_config(workdir)
    result = run_snakemake(
        workdir, "--profile", str(REPO / "workflow/profiles/slurm"), "results/thimble_mini/freeze.csv",
        "results/thimble_mini/replay.json",
        # the cluster's default partition, no accounting assumed (so no sacct: poll squeue); no GPU
        # override: thimble_mini trains on the CPU, so the train rule itself asks for none (gpu=0)
        "--slurm-no-account", "--slurm-status-command", "squeue", "--set-resources",
        "train:cpus_per_task=2", "--default-resources", f"slurm_partition={partition}", "mem_mb=1000", "runtime=30",
        "--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2", "--jobs", "2")
    return workdir, result.stdout + result.stderr


def test_every_job_ran_as_a_slurm_job(slurm_run):
    workdir, output = slurm_run
    submitted = dict(re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)", output))
    rules = {"corpus", "tokenizer", "encode", "masks", "train", "rechunk", "lattice", "replay",
             "freeze_drivers", "freeze"}
    assert len(submitted) == len(rules)
    logged_rules = {re.search(r"rule_(\w+)/", path).group(1) for path in submitted.values()}
    assert logged_rules == rules
    for job_id, log in submitted.items():
        assert os.path.exists(log), log
        # MinJobAge keeps finished jobs in the controller: scontrol knows each one, and it completed
        record = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
        assert f"JobId={job_id}" in record and "JobState=COMPLETED" in record, record
    assert "localrule" not in output


def visited(handle) -> list[str]:
    """Every path HDF5's visit reaches in a file (an object linked under two names is visited once)."""
    keys = []
    handle.visit(keys.append)
    return keys


def test_slurm_outputs_equal_a_local_run_bit_for_bit(slurm_run, mini_data):
    workdir, _ = slurm_run
    run_snakemake(mini_data, "--cores", "2", "results/thimble_mini/freeze.csv", "results/thimble_mini/replay.json")
    local, cluster = mini_data / "results/thimble_mini", workdir / "results/thimble_mini"
    for name in ("freeze.csv", "freeze_cycles.csv", "token_freeze.csv", "displacement_classes.csv", "exp_avg_sq.csv",
                 "summary.json", "replay.csv", "update_ratio.csv", "freeze_drivers.csv"):
        assert (cluster / name).read_bytes() == (local / name).read_bytes(), name
    assert json.loads((cluster / "replay.json").read_text())["bitwise_match"]
    for name in ("recording.h5", "delta_w_lattice.h5"):
        with h5py.File(local / name, "r") as a, h5py.File(cluster / name, "r") as b:
            keys = visited(a)  # every group and dataset, params/<name>/... included
            assert keys and set(keys) == set(visited(b))
            for key in keys:
                if not isinstance(a[key], h5py.Dataset):
                    continue
                raw = (lambda d: d[...].view(np.uint8)) if a[key].dtype.kind != "b" else (lambda d: d[...])
                np.testing.assert_array_equal(raw(a[key]), raw(b[key]), err_msg=f"{name}:{key}")
            assert dict(a.attrs).keys() == dict(b.attrs).keys()
    data = mini_data / "results/data/shakespeare_mini"
    for name in ("tokens.npy", "live_dead_tokens.safetensors", "tokenizer.json"):
        assert (workdir / "results/data/shakespeare_mini" / name).read_bytes() == (data / name).read_bytes(), name
