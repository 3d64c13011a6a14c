"""thimble.open_run, the notebook API, on a real mini run; the README's and docs/notebook.md's snippets run."""

import json
import re
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import thimble
from conftest import REPO, run_snakemake
from thimble.record.format import TENSORS
from thimble.record.reader import read_steps_torch
from thimble.record.stream_reader import open_stream
from thimble.notebook.run import open_run
from thimble.notebook.step_series import step_range


@pytest.fixture(scope="module")
def mini_run(mini_data):
    run_snakemake(mini_data, "--cores", "2", "results/thimble_mini/freeze.csv", "results/thimble_mini/replay.json")
    return mini_data / "results/thimble_mini"


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, re.S | re.M)


@pytest.mark.workflow
@pytest.mark.parametrize("document", ["README.md", "docs/notebook.md"])
def test_the_documented_python_runs_against_a_mini_run(document, mini_run, monkeypatch):
    blocks = python_blocks((REPO / document).read_text())
    assert any("thimble.open_run" in block for block in blocks), f"{document} shows no open_run example"
    monkeypatch.chdir(mini_run.parent.parent)  # the workflow directory: paths are results/thimble_mini/...
    for block in blocks:
        exec(compile(block, document, "exec"), {})


def equal_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.workflow
def test_open_run_gives_the_recorded_bits_by_step_and_slice(mini_run):
    with open_stream(mini_run / "stream") as stream:
        recorded = {name: read_steps_torch(stream[name]) for name in TENSORS}
        losses, dead = stream["losses"][...], stream["dead_mask"][...]
    with thimble.open_run(mini_run) as run:
        assert run.experiment == "thimble_mini" and run.storage_dtype == "bfloat16"
        assert run.source.endswith("recording.h5"), "recording.h5 is preferred"
        for name in TENSORS:
            series = getattr(run, name)
            assert len(series) == 61 and series.shape == (61, 384, 16)
            assert equal_bits(series[7], recorded[name][7]) and series[7].dtype == torch.bfloat16
            assert equal_bits(series[-1], recorded[name][60])
            assert equal_bits(series[10:20], recorded[name][10:20])
            assert equal_bits(series[3:40:7], recorded[name][3:40:7])
            assert series[20:10].shape == (0, 384, 16)
        with pytest.raises(IndexError, match="steps 0..60"):
            run.W[61]
        np.testing.assert_array_equal(run.losses.numpy(), losses)
        assert torch.equal(run.dead_mask, torch.from_numpy(dead)) and run.dead_mask.dtype == torch.bool
        assert torch.equal(run.live_mask, ~run.dead_mask)
        assert run.attrs["experiment"] == "thimble_mini"
        with h5py.File(mini_run / "delta_w_lattice.h5", "r") as delta:
            stored = delta["delta_w_lattice"][...]
        assert len(run.delta_w_lattice) == 61
        np.testing.assert_array_equal(run.delta_w_lattice[5].numpy(), stored[5])
        np.testing.assert_array_equal(run.delta_w_lattice[1:30].numpy(), stored[1:30])
        pd.testing.assert_frame_equal(run.table("freeze"), pd.read_csv(mini_run / "freeze.csv"))
        assert {"freeze", "token_freeze", "replay", "update_ratio"} <= set(run.tables)
        assert run.summary == json.loads((mini_run / "summary.json").read_text())
        assert run.replay["bitwise_match"] is True


@pytest.mark.workflow
def test_without_recording_h5_the_stream_is_read(mini_run, tmp_path):
    copy = tmp_path / "results/thimble_mini"
    shutil.copytree(mini_run / "stream", copy / "stream")
    with open_run(copy) as from_stream, open_run(mini_run) as from_recording:
        assert from_stream.source.endswith("stream.h5")
        for name in TENSORS:
            assert equal_bits(getattr(from_stream, name)[5:9], getattr(from_recording, name)[5:9])
    with open_run(mini_run, source="stream") as asked:
        assert asked.source.endswith("stream.h5")


def test_missing_files_are_named_with_the_target_that_makes_them(tmp_path):
    (tmp_path / "results/thimble_mini").mkdir(parents=True)
    run = open_run(tmp_path / "results/thimble_mini")
    with pytest.raises(FileNotFoundError, match=r"snakemake --cores 1 results/thimble_mini/recording\.h5"):
        run.W[0]
    with pytest.raises(FileNotFoundError, match=r"delta_w_lattice\.h5 does not exist.*"
                                                r"results/thimble_mini/delta_w_lattice\.h5"):
        run.delta_w_lattice
    with pytest.raises(FileNotFoundError, match=r"snakemake --cores 1 results/thimble_mini/freeze\.csv"):
        run.table("freeze")
    with pytest.raises(FileNotFoundError, match=r"results/thimble_mini/replay\.json"):
        run.replay
    with pytest.raises(FileNotFoundError, match="makes no such file.*token_freeze"):
        run.table("frozen")
    with pytest.raises(FileNotFoundError, match=r"results/thimble_9 does not exist"):
        open_run(tmp_path / "results/thimble_9")
    with pytest.raises(ValueError, match="source"):
        open_run(tmp_path / "results/thimble_mini", source="disk")


def test_step_indices():
    assert step_range(0, 5) == 0 and step_range(-1, 5) == 4 and step_range(np.int64(2), 5) == 2
    assert step_range(slice(1, None), 5) == (1, 5, 1) and step_range(slice(None, None, 2), 5) == (0, 5, 2)
    for bad in (5, -6):
        with pytest.raises(IndexError):
            step_range(bad, 5)
    with pytest.raises(TypeError, match="int or a slice"):
        step_range(1.5, 5)


def test_import_thimble_does_not_load_the_readers():
    import subprocess
    import sys

    probe = "import sys, thimble; print(sorted(m for m in ('thimble.notebook.run', 'torch', 'h5py') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"
    assert thimble.open_run is open_run
