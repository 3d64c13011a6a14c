"""Every tensor of the model recorded (record.tensors): the selection, the params/<name>/ layout with the
embedding's seed names linked to it, bit for bit against the seed's own loop, rechunked and checked per tensor."""

import math

import h5py
import numpy as np
import pytest
import torch

from conftest import run_train, tiny_settings
from test_train_record import seed_notebook_trajectory
from thimble.config import ConfigError, resolve_config
from thimble.errors import DataError, ThimbleError
from thimble.record.format import TENSORS, RecordLayout, param_dataset
from thimble.record.reader import RecordedTensor, read_steps, read_steps_torch
from thimble.record.rechunk import rechunk_stream
from thimble.record.stream_reader import open_stream, verify_stream
from thimble.sizes import EMBEDDING, parameter_shapes, recorded_elements, select_parameters
from thimble.update_rules import STATE_KEYS

KEYS = ("value", "grad", "exp_avg", "exp_avg_sq")


@pytest.fixture(scope="module")
def recorded_all(data, tmp_path_factory):
    return run_train(data, tmp_path_factory.mktemp("run_all") / "stream", tiny_settings(tensors=["*"]))


@pytest.fixture(scope="module")
def rechunked_all(recorded_all, tmp_path_factory):
    path = tmp_path_factory.mktemp("rechunked_all") / "recording.h5"
    rechunk_stream(recorded_all, path, 8, 2**31, level=1, threads=2)
    return path


@pytest.mark.parametrize("model", [tiny_settings()["model"],
                                   {"vocab_size": 97, "hidden_dim": 12, "n_layers": 3, "n_heads": 3,
                                    "max_seq_len": 5, "init_scale": 0.02}])
def test_parameter_shapes_are_the_models_in_its_order(model):
    from thimble.training.model import build_model

    built = build_model(model, torch.device("cpu"))
    assert {name: tuple(p.shape) for name, p in built.named_parameters()} == parameter_shapes(model)
    assert list(dict(built.named_parameters())) == list(parameter_shapes(model))
    # the LM head is the embedding: recorded once, under the first name
    assert built.lm_head.weight is built.transformer.wte.weight
    assert "lm_head.weight" not in dict(built.named_parameters())


def test_selection_by_names_and_patterns_in_the_models_order():
    names = list(parameter_shapes(tiny_settings()["model"]))
    assert select_parameters(["*"], names) == names
    assert select_parameters(["transformer.h.*.ln_?.weight", "transformer.wpe.weight"], names) == [
        "transformer.wpe.weight", "transformer.h.0.ln_1.weight", "transformer.h.0.ln_2.weight"]
    # the tied LM head's name selects the embedding, once
    assert select_parameters(["lm_head.weight", "transformer.wte.*"], names) == [EMBEDDING]
    with pytest.raises(ThimbleError, match=r"config key record.tensors: 'transformer.h.9.\*' names no parameter"):
        select_parameters(["transformer.h.9.*", "*"], names)


def test_config_refuses_a_pattern_that_selects_nothing_naming_the_key():
    config = {"datasets": {"toy": {"source": {"local": "texts"}, "tokenizer_texts": ["*"], "model_texts": ["*"],
                                   "vocab_size": 300}},
              "experiments": {"tiny": {"dataset": "toy", "record": {"tensors": ["transformer.h.5.*"]}}}}
    with pytest.raises(ConfigError, match=r"experiments.tiny.record.tensors: 'transformer.h.5.\*' names no"):
        resolve_config(config)
    config["experiments"]["tiny"]["record"] = {"tensors": ["*"], "dtype": "float16"}
    with pytest.raises(ConfigError, match="experiments.tiny.record.tensors: float16 storage"):
        resolve_config(config)


def test_recorded_elements_follow_the_selection():
    settings = tiny_settings(tensors=["*"])
    shapes = parameter_shapes(settings["model"])
    assert recorded_elements(settings) == sum(math.prod(shape) for shape in shapes.values())
    assert recorded_elements(tiny_settings()) == math.prod(shapes[EMBEDDING])


def test_every_parameter_equals_the_seed_notebooks_live_tensors_bit_for_bit(recorded_all, data):
    settings = tiny_settings(tensors=["*"])
    live, losses = seed_notebook_trajectory(settings, np.load(data / "tokens.npy"), every_parameter=True)
    shapes = parameter_shapes(settings["model"])
    steps = settings["training"]["steps"]
    with open_stream(recorded_all) as stream:
        layout = RecordLayout.of_file(stream)
        assert list(layout.params) == list(shapes)
        for name, shape in shapes.items():
            for key in KEYS:
                dataset = stream[param_dataset(name, key)]
                assert dataset.shape == (steps + 1, *shape)
                stored = read_steps_torch(dataset)
                assert stored.dtype == torch.bfloat16
                assert torch.equal(stored.view(torch.int16), live[name, key].view(torch.int16)), (name, key)
        np.testing.assert_array_equal(stream["losses"][...], losses)
    # the comparison has teeth: every tensor but the LayerNorm gains moved
    moved = {name for name in shapes if (live[name, "value"][-1] != live[name, "value"][0]).any()}
    assert moved == {name for name in shapes if not name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))}


def test_the_embeddings_seed_names_are_links_to_its_datasets_and_its_bits_are_an_embedding_only_runs(
        recorded_all, recorded):
    with open_stream(recorded_all) as every, open_stream(recorded) as embedding_only:
        for name in TENSORS:
            # one object under two names: stored once
            assert every[name].id == every[param_dataset(EMBEDDING, STATE_KEYS[name])].id
            np.testing.assert_array_equal(read_steps(every[name]).view(np.uint16),
                                          read_steps(embedding_only[name]).view(np.uint16), err_msg=name)
        np.testing.assert_array_equal(every["losses"][...], embedding_only["losses"][...])
        assert list(RecordLayout.of_file(embedding_only).params) == [EMBEDDING]
        assert "params" in embedding_only and every.attrs["recorded_tensors"] == embedding_only.attrs["recorded_tensors"]


def test_the_determinism_check_compares_every_recorded_tensor(recorded_all, recorded):
    import json

    def compared(path):
        with open_stream(path) as stream:
            return json.loads(stream.attrs["determinism_check"])

    every, embedding_only = compared(recorded_all), compared(recorded)
    assert every["result"] == embedding_only["result"] == "bitwise identical"
    shapes = parameter_shapes(tiny_settings()["model"])
    extra = sum(math.prod(shape) for name, shape in shapes.items() if name != EMBEDDING)
    # per checked step: value, grad and both moments of every other parameter
    assert every["steps_compared"] == embedding_only["steps_compared"] == [1, 2]
    assert every["elements_compared"] - embedding_only["elements_compared"] == 2 * 4 * extra


def test_rechunk_keeps_every_tensor_bit_for_bit_and_the_seed_names(recorded_all, rechunked_all):
    with open_stream(recorded_all) as stream, h5py.File(rechunked_all) as out:
        layout = RecordLayout.of_file(out)
        assert layout.datasets() == RecordLayout.of_file(stream).datasets()
        for path in layout.datasets():
            assert out[path].chunks[0] == 8
            np.testing.assert_array_equal(RecordedTensor.of_recording(out, path).bits(),
                                          RecordedTensor.of_recording(stream, path).bits(), err_msg=path)
        for name in TENSORS:
            assert out[name].id == out[param_dataset(EMBEDDING, STATE_KEYS[name])].id
        # the seed's stock read: h5py with hdf5plugin sees W and a LayerNorm gain
        assert out["W"].shape == stream["W"].shape
        assert out["params/transformer.h.0.ln_1.weight/value"][...].shape == (31, 8)


def test_a_damaged_chunk_of_any_tensor_is_named_with_its_file_dataset_and_steps(recorded_all, rechunked_all,
                                                                                  tmp_path):
    import shutil

    from test_faults import flip_chunk_bytes

    path = param_dataset("transformer.h.0.attn.c_proj.bias", "exp_avg")
    copy = tmp_path / "stream"
    shutil.copytree(recorded_all, copy)
    segment = copy / "segment_000007-000013.h5"
    flip_chunk_bytes(segment, path, chunk=2, at=0)
    with pytest.raises(DataError, match=rf"{segment}:/?{path} steps? 9"):
        verify_stream(copy)
    recording = tmp_path / "recording.h5"
    shutil.copy(rechunked_all, recording)
    flip_chunk_bytes(recording, path, chunk=1)
    with h5py.File(recording) as handle, pytest.raises(DataError, match=rf"{recording}:/?{path} steps 8..15"):
        RecordedTensor.of_recording(handle, path).bits()
