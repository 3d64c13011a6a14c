"""bench/footprint.py (the sizes in docs/benchmarks.md) on tiny recordings: the seed's layout it writes holds
every recorded tensor's values as the seed stored them (float16), one step per gzip chunk, for a recording of
the embedding alone, of every parameter (``params/``) and of one written before ``params/`` existed."""

import importlib.util
import json

import h5py
import numpy as np
import pytest
import torch

from conftest import REPO, run_train, tiny_settings, write_recording
from thimble.record.format import TENSORS, RecordLayout
from thimble.record.reader import read_steps
from thimble.record.rechunk import rechunk_stream
from thimble.sizes import EMBEDDING


def load_bench():
    spec = importlib.util.spec_from_file_location("footprint", REPO / "bench/footprint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(results, tmp_path, *options) -> dict:
    assert load_bench().main([str(results), "--seed-file", str(tmp_path / "seed.h5"), *options,
                              "--json", str(tmp_path / "footprint.json")]) == 0
    return json.loads((tmp_path / "footprint.json").read_text())


def assert_seed_layout_holds(recording, seed_file, paths) -> None:
    """Each of ``paths`` in the seed's file: one step per gzip chunk, the recording's values as float16."""
    with h5py.File(seed_file, "r") as seed, h5py.File(recording, "r") as source:
        for path in paths:
            assert seed[path].chunks == (1, *seed[path].shape[1:]) and seed[path].compression == "gzip", path
            as_float16 = torch.from_numpy(read_steps(source[path]).astype(np.float32)).to(torch.float16)
            np.testing.assert_array_equal(seed[path][...], as_float16.numpy())


def test_footprint_writes_the_seed_layout_and_compares_sizes(recorded, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    rechunk_stream(recorded, results / "recording.h5", 8, 2**31, level=2)
    report = run_bench(results, tmp_path, "--default-window")
    assert report["seed_layout_bytes"] == (tmp_path / "seed.h5").stat().st_size
    assert report["all_files_bytes"] == (results / "recording.h5").stat().st_size
    assert report["parameters"] == 1 and set(report["by_key"]) == {"value", "grad", "exp_avg", "exp_avg_sq"}
    assert set(report["default_window_tensor_bytes"]) == set(report["datasets"])
    # the embedding's seed names, linked to its datasets as recording.h5 links them
    assert_seed_layout_holds(results / "recording.h5", tmp_path / "seed.h5", TENSORS)
    with h5py.File(tmp_path / "seed.h5", "r") as seed:
        assert seed["W"] == seed[f"params/{EMBEDDING}/value"]
    assert "x seed" in capsys.readouterr().out


def test_footprint_of_every_tensor_against_the_seeds_storage_of_them(data, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    stream = run_train(data, tmp_path / "stream", tiny_settings(tensors=["*"]))
    rechunk_stream(stream, results / "recording.h5", 8, 2**31, level=2)
    report = run_bench(results, tmp_path)
    with h5py.File(results / "recording.h5", "r") as handle:
        layout = RecordLayout.of_file(handle)
    assert len(layout.params) > 1 and report["parameters"] == len(layout.params)
    assert set(report["datasets"]) == set(layout.datasets())
    assert set(report["by_parameter"]) == set(layout.params)
    assert_seed_layout_holds(results / "recording.h5", tmp_path / "seed.h5", layout.datasets())
    recording, seed = (results / "recording.h5").stat().st_size, (tmp_path / "seed.h5").stat().st_size
    assert report["recording_bytes"] == recording and report["seed_layout_bytes"] == seed
    assert report["recording_over_seed"] == pytest.approx(recording / seed)
    assert report["within_goal"] == (recording <= 0.75 * seed)
    # every dataset counted once: the embedding's seed names are links to its datasets, not more bytes
    assert sum(entry["recording_bytes"] for entry in report["datasets"].values()) == \
        sum(total["recording_bytes"] for total in report["by_key"].values()) < recording
    out = capsys.readouterr().out
    assert "by parameter" in out and "transformer.h.0.mlp.c_fc.weight" in out and "goal at most 0.75" in out


def test_footprint_of_a_recording_written_before_params(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    rng = np.random.default_rng(0)
    # bf16 bit patterns of values near 1e-6, below float16's normal range (6.1e-5): its subnormals' spacing
    # of 6e-8 rounds most of them, as the seed's float16 storage altered small moments
    bits = {name: (rng.normal(0, 1e-6, (9, 6, 4)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
            for name in TENSORS}
    write_recording(results / "recording.h5", bits, np.zeros(6, bool), rows=4)
    report = run_bench(results, tmp_path)
    assert set(report["datasets"]) == set(TENSORS) and report["parameters"] == 1
    assert report["seed"]["float16_altered_values"] > 0
    assert_seed_layout_holds(results / "recording.h5", tmp_path / "seed.h5", TENSORS)
