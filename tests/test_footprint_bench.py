"""bench/footprint.py (the sizes in docs/benchmarks.md) on a tiny recording: the seed's layout it writes
holds the recording's values as the seed stored them (float16), one step per gzip chunk."""

import importlib.util
import json

import h5py
import numpy as np
import torch

from conftest import REPO
from thimble.record.rechunk import rechunk_stream
from thimble.record.format import TENSORS
from thimble.record.reader import read_steps


def load_bench():
    spec = importlib.util.spec_from_file_location("footprint", REPO / "bench/footprint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_footprint_writes_the_seed_layout_and_compares_sizes(recorded, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    rechunk_stream(recorded, results / "recording.h5", 8, 2**31, level=2)
    bench = load_bench()
    assert bench.main([str(results), "--seed-file", str(tmp_path / "seed.h5"), "--default-window",
                       "--json", str(tmp_path / "footprint.json")]) == 0
    report = json.loads((tmp_path / "footprint.json").read_text())
    assert report["seed_layout_bytes"] == (tmp_path / "seed.h5").stat().st_size
    assert report["all_files_bytes"] == (results / "recording.h5").stat().st_size
    assert set(report["default_window_tensor_bytes"]) == set(TENSORS)
    with h5py.File(tmp_path / "seed.h5", "r") as seed, h5py.File(results / "recording.h5", "r") as recording:
        for name in TENSORS:
            assert seed[name].chunks == (1, *seed[name].shape[1:]) and seed[name].compression == "gzip"
            as_float16 = torch.from_numpy(read_steps(recording[name]).astype(np.float32)).to(torch.float16)
            np.testing.assert_array_equal(seed[name][...], as_float16.numpy())
    assert "x seed" in capsys.readouterr().out
