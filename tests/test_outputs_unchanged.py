"""The mini workflow's outputs, bit for bit, against hashes recorded from the code before the codec
refactor (issue 14): recording, rechunked file, ΔW′, freeze tables and summaries of thimble_mini
and its float16 twin.

Datasets are hashed by their decoded content as plain h5py reads it (HDF5's own filter pipeline,
not thimble's readers, which are what changed), with dtype, shape, chunk shape and filters; the
tables and JSON summaries by their bytes. HDF5 file bytes are not compared: they hold timestamps.

Training is bitwise reproducible for one torch build on one CPU kernel set, so the hashes hold
for the environment they were recorded in; the file keeps one set per environment (torch build and
``torch.backends.cpu.get_cpu_capability()``), and where none matches the test skips, saying why. To
record them again after an intended change of outputs (this environment's set; the others stay):
``THIMBLE_RECORD_OUTPUT_HASHES=1 python -m pytest tests/test_outputs_unchanged.py``.
"""

import hashlib
import json
import os
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the zstd filter with HDF5)
import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, mini_series_config, run_snakemake
from thimble.provenance import plain

HASHES = REPO / "tests/data/thimble_mini_outputs.json"
EXPERIMENTS = ("thimble_mini", "thimble_mini_f16")
HDF5_FILES = ("stream/stream.h5", "recording.h5", "delta_w_lattice.h5", "token_displacement.h5")
#: tables and summaries (replay.json names the torch build and CPU, which the environment check pins)
BYTE_FILES = ("freeze.csv", "freeze_cycles.csv", "token_freeze.csv", "displacement_classes.csv",
              "lattice_positions.csv", "exp_avg_sq.csv", "replay.csv", "update_ratio.csv", "summary.json",
              "replay.json", "freeze_drivers.csv")
#: attributes that name where a file was made, or how long it took, not what it holds
UNHASHED_ATTRS = {"git_commit", "source", "session_first_step_seconds", "session_training_seconds",
                  "session_determinism_check_seconds",
                  # the library versions beside torch (the environment check pins torch): CI installs the
                  # newest releases, not constraints.txt's, and a version names the install, not the values
                  "transformers_version", "numpy_version", "h5py_version", "hdf5_version", "python_version",
                  # how the training process took its memory (thimble.host_memory): where arrays lived, never
                  # a value of them
                  "host_allocator"}


def environment() -> dict:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def hdf5_digest(path: Path) -> dict[str, str]:
    """Per dataset: sha256 of its decoded values, dtype, shape, chunks, filters and attributes."""
    digests = {}
    with h5py.File(path, "r") as handle:
        digests["/"] = hashlib.sha256(json.dumps(
            {key: plain(value) for key, value in sorted(handle.attrs.items()) if key not in UNHASHED_ATTRS},
            sort_keys=True, default=str).encode()).hexdigest()
        # the root's datasets under their names (the embedding's seed names among them), then every recorded
        # parameter's under params/ (the embedding's again, by its path)
        datasets = {name: item for name, item in handle.items() if isinstance(item, h5py.Dataset)}
        if "params" in handle:
            def collect(name, item):  # h5py stops visiting at the first callback that returns a value
                if isinstance(item, h5py.Dataset):
                    datasets[f"params/{name}"] = item

            handle["params"].visititems(collect)
        for name, dataset in datasets.items():
            plist = dataset.id.get_create_plist()
            filters = [] if dataset.is_virtual else [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
            digest = hashlib.sha256(json.dumps({
                "dtype": str(dataset.dtype), "size": dataset.id.get_type().get_size(), "shape": dataset.shape,
                "chunks": dataset.chunks, "filters": filters,
                "attrs": {key: plain(value) for key, value in sorted(dataset.attrs.items())
                          if key not in UNHASHED_ATTRS}}, sort_keys=True, default=str).encode())
            digest.update(np.ascontiguousarray(dataset[...]).tobytes())
            digests[name] = digest.hexdigest()
    return digests


def output_digests(results: Path) -> dict:
    digests = {}
    for experiment in EXPERIMENTS:
        for name in HDF5_FILES:
            digests[f"{experiment}/{name}"] = hdf5_digest(results / experiment / name)
        for name in BYTE_FILES:
            digests[f"{experiment}/{name}"] = hashlib.sha256((results / experiment / name).read_bytes()).hexdigest()
    digests["series/mini/verdicts.csv"] = hashlib.sha256(
        (results / "series/mini/verdicts.csv").read_bytes()).hexdigest()
    return digests


@pytest.mark.workflow
def test_mini_outputs_are_bitwise_those_recorded(mini_data):
    (mini_data / "series.yaml").write_text(yaml.safe_dump(mini_series_config()))
    run_snakemake(mini_data, "--cores", "2", "results/series/mini/global_freeze.png",
                  "--configfile", str(mini_data / "series.yaml"))
    got = output_digests(mini_data / "results")
    recordings = json.loads(HASHES.read_text())["recorded"]
    if os.environ.get("THIMBLE_RECORD_OUTPUT_HASHES"):
        # one entry per environment: recording on one CPU kernel set keeps the others'
        recordings = [entry for entry in recordings if entry["environment"] != environment()]
        recordings.append({"environment": environment(), "outputs": got})
        HASHES.write_text(json.dumps({"recorded": recordings}, indent=1) + "\n")
    recorded = next((entry for entry in recordings if entry["environment"] == environment()), None)
    if recorded is None:
        pytest.skip(f"the hashes were recorded with {[entry['environment'] for entry in recordings]}, this is "
                    f"{environment()}: training is bitwise reproducible only on the same torch build and CPU kernels")
    differing = sorted(key for key in recorded["outputs"] if got.get(key) != recorded["outputs"][key])
    assert not differing and got.keys() == recorded["outputs"].keys(), f"outputs changed: {differing}"
