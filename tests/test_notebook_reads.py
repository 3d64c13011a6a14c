"""open_run's reads at notebook scale: the chunk cache, outer indexing by steps and tokens, the xarray
engine, token texts, and refusing tables of another recording. Synthetic recordings with known bits,
and the real mini run."""

import json
import shutil
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import yaml

from conftest import run_snakemake
from thimble.numerics.bf16 import BFLOAT16
from thimble.record.codec import encode_chunk, write_chunk
from thimble.errors import DataError
from thimble.provenance import StaleResultError, StaleResultWarning
from thimble.record.format import create_checked_array, create_tensor_dataset
from thimble.notebook.run import open_run
from thimble.notebook.xarray_backend import ThimbleBackendEntrypoint
from thimble.sizes import EMBEDDING

STEPS, VOCAB, DIM, CHUNK = 30, 12, 4, 8
NAMES = ("W", "grad_W", "momentum_W", "variance_W")


def known_bits(name_index: int, steps=STEPS, vocab=VOCAB, dim=DIM) -> np.ndarray:
    """Distinct, finite, positive bf16 bit patterns: each (tensor, step, token, dim) its own."""
    t, v, d = np.meshgrid(np.arange(steps), np.arange(vocab), np.arange(dim), indexing="ij")
    return ((name_index * 4099 + t * 131 + v * 17 + d) % 0x3F00 + 0x100).astype(np.uint16)


def write_synthetic(directory, steps=STEPS, vocab=VOCAB, dim=DIM, chunk=CHUNK):
    """results/{experiment}/recording.h5 as thimble rechunk writes it (checksummed shuffle+zstd chunks)."""
    directory.mkdir(parents=True, exist_ok=True)
    dead = np.arange(vocab) % 3 == 0
    with h5py.File(directory / "recording.h5", "w") as out:
        for index, name in enumerate(NAMES):
            bits = known_bits(index, steps, vocab, dim)
            dataset = create_tensor_dataset(out, name, bits.shape, chunk, "bfloat16", 1)
            for first in range(0, steps, chunk):
                block = np.zeros((chunk, vocab, dim), np.uint16)  # edge chunks are stored full size
                block[:min(chunk, steps - first)] = bits[first:first + chunk]
                write_chunk(dataset, first, encode_chunk(block, 1))
        create_checked_array(out, "losses", np.linspace(6, 5, steps).astype(np.float32))
        create_checked_array(out, "dead_mask", dead)
        create_checked_array(out, "live_mask", ~dead)
        out.attrs.update({"storage_dtype": "bfloat16", "dataset": "synthetic", "vocab_size": vocab,
                          "recorded_tensors": json.dumps({name: "bfloat16" for name in NAMES}),
                          "config_hash": "synthetic", "seed": 1, "update_rule": "bf16"})
    return directory


def widened(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.fixture
def synthetic(tmp_path):
    return write_synthetic(tmp_path / "results/synthetic")


def test_stepping_in_order_decodes_each_chunk_once(synthetic):
    expected = known_bits(0)
    with open_run(synthetic) as run:
        for step in range(STEPS):
            assert np.array_equal(run.W[step].view(torch.int16).numpy().view(np.uint16), expected[step])
        assert run.cache.stats.decoded == 4 and run.cache.stats.hits == STEPS - 4
        assert run.source.endswith("recording.h5")


def test_the_budget_bounds_what_is_kept(synthetic):
    chunk_bytes = CHUNK * VOCAB * DIM * 2
    with open_run(synthetic, cache_bytes=chunk_bytes) as run:
        for step in range(STEPS):  # two tensors in turn: one chunk fits, so each read evicts the other's
            run.W[step], run.grad_W[step]
        assert run.cache.held_bytes <= chunk_bytes and run.cache.stats.decoded == 2 * STEPS
    with open_run(synthetic, cache_bytes=0) as run:
        run.W[0], run.W[1]
        assert run.cache.stats.oversized == 2 and run.cache.held_bytes == 0


@pytest.mark.parametrize("steps, tokens", [
    (5, slice(None)), (slice(3, 20), [0, 11, 4]), ([29, 0, 8, 8], 3), (slice(None, None, 7), slice(2, 9, 3)),
    (np.arange(STEPS) % 4 == 1, np.arange(VOCAB) % 3 == 0), (-1, [-1, -12]), ([], slice(None)),
    (torch.tensor([2, 17]), torch.arange(VOCAB) > 5), (np.int64(9), np.array([1, 2])),
])
def test_steps_and_tokens_select_each_axis_on_its_own(synthetic, steps, tokens):
    def as_numpy(index):
        if isinstance(index, torch.Tensor):
            return index.numpy()
        return np.asarray(index, dtype=np.int64) if isinstance(index, list) else index

    want = known_bits(2)[as_numpy(steps)]  # numpy, one axis at a time
    want = want[as_numpy(tokens)] if isinstance(steps, (int, np.integer)) else want[:, as_numpy(tokens)]
    with open_run(synthetic) as run:
        got = run.momentum_W[steps, tokens]
        assert got.dtype == torch.bfloat16 and tuple(got.shape) == want.shape
        assert np.array_equal(got.view(torch.int16).numpy().view(np.uint16), want)
        np.testing.assert_array_equal(run.momentum_W.numpy((steps, tokens)), widened(want))


def test_only_the_chunks_holding_the_steps_are_decoded(synthetic):
    with open_run(synthetic) as run:
        run.W[[1, 25], [3]]
        assert run.cache.stats.decoded == 2  # chunks 0..7 and 24..29, not the two between
        assert run.W[2, 3, 1] == torch.from_numpy(known_bits(0)[2, 3, 1:2].view(np.int16)).view(torch.bfloat16)[0]
        assert run.W[..., 2].shape == (STEPS, VOCAB) and run.W[4, :, [0, 3]].shape == (VOCAB, 2)


def test_bad_indices_name_the_axis_and_its_range(synthetic):
    with open_run(synthetic) as run:
        with pytest.raises(IndexError, match="step 30 is out of range.*0..29"):
            run.W[30]
        with pytest.raises(IndexError, match="token 12 is out of range.*0..11"):
            run.W[0, [1, 12]]
        with pytest.raises(IndexError, match="mask over tokens needs 12 entries, not 5"):
            run.W[0, np.ones(5, bool)]
        with pytest.raises(TypeError, match="steps are indexed by"):
            run.W[1.5]
        with pytest.raises(IndexError, match="3 axes"):
            run.W[0, 0, 0, 0]


def test_a_damaged_chunk_is_an_error_naming_file_dataset_and_steps(synthetic):
    path = synthetic / "recording.h5"
    with h5py.File(path, "r") as handle:
        offset = handle["grad_W"].id.get_chunk_info_by_coord((8, 0, 0)).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset + 30] ^= 0xFF
    path.write_bytes(bytes(raw))
    with open_run(synthetic) as run:
        run.grad_W[0]
        with pytest.raises(DataError, match=r"recording\.h5:/grad_W steps 8\.\.15"):
            run.grad_W[10, [1, 2]]
        assert run.cache.stats.decoded == 1  # the damaged chunk was not kept


def test_xarray_engine_reads_lazily_exact_float32_or_bfloat16(synthetic):
    path = synthetic / "recording.h5"
    assert ThimbleBackendEntrypoint().guess_can_open(path) and ThimbleBackendEntrypoint().guess_can_open(synthetic)
    assert not ThimbleBackendEntrypoint().guess_can_open(synthetic / "freeze.csv")
    with pytest.warns(UserWarning, match="no token_text coordinate.*tokenizer.json"):
        dataset = xr.open_dataset(path, engine="thimble")
    with dataset:
        assert dataset.W.dims == ("step", "token", "dim") and dataset.W.dtype == np.float32
        assert set(NAMES) <= set(dataset.data_vars) and dataset.attrs["source"].endswith("recording.h5")
        window = dataset.variance_W.sel(step=slice(9, 12), token=[0, 5])
        np.testing.assert_array_equal(window.values, widened(known_bits(3)[9:13][:, [0, 5]]))
        dead = dataset.W.where(dataset.group == "dead").isel(step=-1)
        assert np.isnan(dead.sel(token=1)).all() and not np.isnan(dead.sel(token=3)).any()
        assert list(dataset.group.values[:4]) == ["dead", "live", "live", "dead"]
    with pytest.warns(UserWarning, match="no token_text"), open_run(synthetic) as run:
        as_bf16 = run.to_xarray(dtype="bfloat16")
        assert run.cache.stats.decoded == 0, "opening reads no tensor"
        assert as_bf16.grad_W.dtype == BFLOAT16
        np.testing.assert_array_equal(as_bf16.grad_W[7].values.view(np.uint16), known_bits(1)[7])
        assert run.cache.stats.decoded == 1



def test_a_recording_without_params_reads_as_the_embedding_alone(synthetic):
    with open_run(synthetic) as run:
        assert run.params == [EMBEDDING]
        embedding = run.param(EMBEDDING)
        assert embedding.shape == (VOCAB, DIM) and embedding.state_keys == ["exp_avg", "exp_avg_sq"]
        assert embedding.value is run.W and embedding.state("exp_avg_sq") is run.variance_W
        assert np.array_equal(embedding.grad[:].view(torch.int16).numpy().view(np.uint16), known_bits(1))
        with pytest.raises(KeyError, match=r"'transformer\.wpe\.weight' is not a recorded parameter of "
                                           r".*recording\.h5; recorded: transformer\.wte\.weight$"):
            run.param("transformer.wpe.weight")
        decoded = run.cache.stats.decoded
        with pytest.warns(UserWarning, match="no token_text"):
            tree = run.to_datatree()
        assert list(tree.children) == [EMBEDDING] and run.cache.stats.decoded == decoded, "opening reads no tensor"
        node = tree[EMBEDDING]
        assert set(node.data_vars) == {"value", "grad", "exp_avg", "exp_avg_sq"}
        np.testing.assert_array_equal(node.exp_avg.values, widened(known_bits(2)))
        assert list(node.group.values[:4]) == ["dead", "live", "live", "dead"]


@pytest.mark.parametrize("userblock", [0, 512, 2048])
def test_the_xarray_engine_guesses_from_the_file_name_and_the_hdf5_signature(tmp_path, userblock):
    engine = ThimbleBackendEntrypoint()
    for name in ("recording.h5", "stream.h5", "other.h5"):
        with h5py.File(tmp_path / name, "w", userblock_size=userblock) as handle:
            handle["W"] = np.zeros(1)
    assert engine.guess_can_open(tmp_path / "recording.h5") and engine.guess_can_open(str(tmp_path / "stream.h5"))
    assert not engine.guess_can_open(tmp_path / "other.h5"), "a run is opened from recording.h5 or stream.h5"
    (tmp_path / "not_hdf5").mkdir()
    (tmp_path / "not_hdf5" / "recording.h5").write_bytes(b"\x89HDF" + bytes(600))
    assert not engine.guess_can_open(tmp_path / "not_hdf5" / "recording.h5")
    assert not engine.guess_can_open(tmp_path / "missing" / "recording.h5") and not engine.guess_can_open(3)
    assert engine.description and engine.url.endswith("notebook.md")


# -- the real mini run --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mini_run(mini_data):
    run_snakemake(mini_data, "--cores", "2", "results/thimble_mini/freeze.csv", "results/thimble_mini/replay.json")
    return mini_data / "results/thimble_mini"


@pytest.mark.workflow
def test_token_text_is_what_the_tokenizer_decodes_and_token_freeze_carries_it(mini_run):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(mini_run.parent / "data/shakespeare_mini/tokenizer.json"))
    with open_run(mini_run) as run:
        texts = run.token_text
        assert texts == [tokenizer.decode([token]) for token in range(384)]
        assert any(text.startswith(" ") for text in texts) and "\r" in texts  # byte-level: no 'Ġ' left
        table = run.table("token_freeze")
        assert table["token_text"].tolist() == texts and table["token"].tolist() == list(range(384))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing to warn about: the tokenizer is there, the tables belong
            dataset = run.to_xarray()
        assert list(dataset.token_text.values) == texts
        assert run.summary["provenance"]["computed_from"]["file"] == "recording.h5"
        assert run.replay["provenance"]["computed_from"]["file"] == "recording.h5"  # the replay reads it
        assert run.stale == []


@pytest.mark.workflow
def test_tables_of_another_training_are_refused_naming_them_and_their_target(mini_run, tmp_path):
    workdir = tmp_path / "work"
    shutil.copytree(mini_run.parent.parent, workdir, symlinks=True)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["experiments"]["thimble_mini"]["training"]["seed"] = 7
    (workdir / "seed7.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run_snakemake(workdir, "--cores", "2", "results/thimble_mini/recording.h5",
                  "--configfile", str(workdir / "seed7.yaml"))
    results = workdir / "results/thimble_mini"
    with open_run(results) as run:
        assert run.attrs["seed"] == 7
        run.W[5]  # the recording itself is served
        with pytest.raises(StaleResultError) as refused:
            run.table("freeze")
    message = str(refused.value)
    for name in ("summary.json", "freeze.csv", "token_freeze.csv", "replay.json", "replay.csv",
                 "delta_w_lattice.h5"):
        assert name in message
    assert "seed 42 there, 7 in recording.h5" in message
    assert ("snakemake --cores 1 results/thimble_mini/delta_w_lattice.h5 results/thimble_mini/replay.json "
            "results/thimble_mini/summary.json") in message
    with open_run(results, allow_stale=True) as run, pytest.warns(StaleResultWarning, match="freeze.csv"):
        assert run.summary["provenance"]["computed_from"]["seed"] == 42
    with open_run(results) as run, pytest.raises(StaleResultError, match="delta_w_lattice.h5"):
        run.delta_w_lattice


@pytest.mark.workflow
def test_an_edited_table_and_a_training_under_way_are_flagged(mini_run, tmp_path):
    results = tmp_path / "results/thimble_mini"
    shutil.copytree(mini_run, results, symlinks=True)
    edited = pd.read_csv(results / "freeze.csv")
    edited.loc[0, edited.columns[1]] += 1
    edited.to_csv(results / "freeze.csv", index=False)
    with open_run(results) as run, pytest.raises(StaleResultError, match=r"freeze\.csv: its bytes are not those"):
        run.table("token_freeze")
    shutil.copy(mini_run / "freeze.csv", results / "freeze.csv")
    (results / ".partial").mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with open_run(results) as run:
            run.W[0]
            with pytest.raises(StaleResultError, match=r"under way or was interrupted"):
                run.summary
    assert any(issubclass(w.category, StaleResultWarning) and ".partial" in str(w.message) for w in caught)
