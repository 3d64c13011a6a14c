"""bench/gpu_bench.py runs on the CPU too (the GPU figures in docs/benchmarks.md come from the same script)."""

import subprocess
import sys

import pytest

from conftest import REPO, write_offline_config


@pytest.mark.workflow
def test_gpu_bench_runs_on_the_cpu_and_finds_every_run_bitwise_identical(tmp_path):
    config = write_offline_config(tmp_path)
    result = subprocess.run([sys.executable, str(REPO / "bench/gpu_bench.py"), "--device", "cpu", "--config",
                             str(config), "--experiment", "thimble_mini", "--steps", "12", "--repro-steps", "24",
                             "--rate-steps", "3", "--threads", "2", "--workdir", str(tmp_path / "bench")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = dict(line.strip("|").split("|", 1) for line in result.stdout.splitlines()[2:])
    rows = {key.strip(): value.strip() for key, value in rows.items()}
    assert rows["replay"].startswith("bitwise on cpu") and "disagreements 0 of" in rows["replay"]
    assert rows["determinism check"].startswith("bitwise identical: steps [1, 2], ")
    zeros = "{'W': 0, 'grad_W': 0, 'momentum_W': 0, 'variance_W': 0, 'losses': 0}"
    assert rows["two runs of 24 steps: differing elements"] == zeros
    assert rows["killed halfway and resumed vs uninterrupted"] == zeros
    for stage in ("train", "rechunk", "lattice", "replay", "freeze"):
        assert float(rows[f"{stage} (s)"]) > 0
