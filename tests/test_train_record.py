"""Training and recording at a tiny size: bit-faithful, deterministic, resumable after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn

from thimble.record.format import TENSORS, list_segments, read_checked

from thimble.record.reader import read_steps, read_steps_torch

from thimble.record.stream_reader import open_stream
from thimble.errors import TrainingError

from conftest import VOCAB, run_train, tiny_settings  # the fixtures data and recorded live there too


def seed_notebook_trajectory(settings, tokens, every_parameter=False):
    """The Thimble 6 notebook's training loop, as written there, capturing the live tensors: the embedding's by
    the seed's names, or with ``every_parameter`` each parameter's value, grad, exp_avg and exp_avg_sq by
    (parameter name, key)."""
    from torch.utils.data import DataLoader, Dataset
    from transformers import GPT2Config, GPT2LMHeadModel

    model_s, train_s = settings["model"], settings["training"]
    torch.manual_seed(train_s["seed"])
    np.random.seed(train_s["seed"])
    corpus_tensor = torch.tensor(tokens.tolist(), dtype=torch.long)

    class TokenDataset(Dataset):
        def __init__(self, corpus_tensor, max_seq_len):
            self.corpus = corpus_tensor
            self.max_seq_len = max_seq_len

        def __len__(self):
            return max(0, len(self.corpus) - self.max_seq_len)

        def __getitem__(self, idx):
            chunk = self.corpus[idx: idx + self.max_seq_len + 1]
            return {"input_ids": chunk[:-1], "labels": chunk[1:]}

    dataset = TokenDataset(corpus_tensor, model_s["max_seq_len"])

    def seed_worker(worker_id):
        np.random.seed(torch.initial_seed() % 2**32)

    g = torch.Generator()
    g.manual_seed(train_s["seed"])
    dataloader = DataLoader(dataset, batch_size=train_s["batch_size"], shuffle=True, generator=g,
                            worker_init_fn=seed_worker, num_workers=0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=model_s["max_seq_len"], n_embd=model_s["hidden_dim"],
                        n_layer=model_s["n_layers"], n_head=model_s["n_heads"], resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        nn.init.normal_(model.transformer.wte.weight, mean=0.0, std=model_s["init_scale"])
    model = model.to(torch.bfloat16).to("cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_s["learning_rate"],
                                  betas=(train_s["adam_beta1"], train_s["adam_beta2"]),
                                  eps=train_s["adam_epsilon"], weight_decay=train_s["weight_decay"])
    wte = model.transformer.wte.weight
    zeros = torch.zeros_like(wte)
    out = {"W": [wte.detach().clone()], "grad_W": [zeros], "momentum_W": [zeros], "variance_W": [zeros]}
    params = dict(model.named_parameters())
    every = {(name, key): [param.detach().clone() if key == "value" else torch.zeros_like(param)]
             for name, param in params.items() for key in ("value", "grad", "exp_avg", "exp_avg_sq")}
    losses = [float("nan")]
    data_iter = iter(dataloader)
    model.train()
    for step in range(1, train_s["steps"] + 1):
        try:
            batch = next(data_iter)
        except StopIteration:
            data_iter = iter(dataloader)
            batch = next(data_iter)
        outputs = model(input_ids=batch["input_ids"], labels=batch["labels"])
        loss = outputs.loss
        loss.backward()
        out["grad_W"].append(wte.grad.detach().clone())
        for name, param in params.items():
            every[name, "grad"].append(param.grad.detach().clone())
        optimizer.step()
        optimizer.zero_grad()
        out["W"].append(wte.detach().clone())
        out["momentum_W"].append(optimizer.state[wte]["exp_avg"].clone())
        out["variance_W"].append(optimizer.state[wte]["exp_avg_sq"].clone())
        for name, param in params.items():
            every[name, "value"].append(param.detach().clone())
            every[name, "exp_avg"].append(optimizer.state[param]["exp_avg"].clone())
            every[name, "exp_avg_sq"].append(optimizer.state[param]["exp_avg_sq"].clone())
        losses.append(loss.item())
    if every_parameter:
        return {key: torch.stack(values) for key, values in every.items()}, np.array(losses, dtype=np.float32)
    return {name: torch.stack(values) for name, values in out.items()}, np.array(losses, dtype=np.float32)


def stream_bits(directory):
    with open_stream(directory) as stream:
        return {name: read_steps(stream[name]).view(np.uint16).copy() for name in TENSORS} | \
            {"losses": stream["losses"][...]}


def test_recording_equals_the_seed_notebooks_live_tensors_bit_for_bit(recorded, data):
    settings = tiny_settings()
    live, losses = seed_notebook_trajectory(settings, np.load(data / "tokens.npy"))
    steps = settings["training"]["steps"]
    with open_stream(recorded) as stream:
        for name in TENSORS:
            assert stream[name].shape == (steps + 1, VOCAB, 8)
            stored = read_steps_torch(stream[name])
            assert stored.dtype == torch.bfloat16
            assert torch.equal(stored.view(torch.int16), live[name].view(torch.int16)), name
        np.testing.assert_array_equal(stream["losses"][...], losses)  # NaN at t=0 on both sides
        assert np.isnan(stream["losses"][0])
    # the run did move things, so the comparison above has teeth
    assert (live["W"][-1] != live["W"][0]).any() and (live["variance_W"][-1] != 0).any()
    # tied embeddings: dead rows never occur as inputs, yet the output softmax gives them gradient
    dead = torch.from_numpy(np.setdiff1d(np.arange(VOCAB), np.load(data / "tokens.npy")))
    assert (live["grad_W"][1:, dead] != 0).any()


def test_h5py_reads_bf16_as_exact_float32(recorded):
    with open_stream(recorded) as stream:
        for name in TENSORS:
            as_float32 = stream[name][...]
            assert as_float32.dtype == np.float32
            np.testing.assert_array_equal(as_float32, read_steps(stream[name]).astype(np.float32))
        # reading a window gives the same rows as reading all
        np.testing.assert_array_equal(read_steps(stream["W"], 5, 9).view(np.uint16),
                                      read_steps(stream["W"])[5:9].view(np.uint16))


def test_stream_carries_masks_attributes_and_provenance(recorded, data):
    with open_stream(recorded) as stream:
        attrs = dict(stream.attrs)
        tokens = np.load(data / "tokens.npy")
        assert set(stream["live_ids"][...]) == set(np.unique(tokens))
        assert stream["live_mask"].dtype == bool and stream["dead_ids"].dtype == np.int64
        for key in ("vocab_size", "hidden_dim", "n_layers", "n_heads", "num_steps", "batch_size", "learning_rate",
                    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "init_scale", "seed", "n_live",
                    "n_dead", "torch_version", "transformers_version", "numpy_version", "device", "cpu_capability",
                    "git_commit", "config_hash"):
            assert key in attrs, key
        assert attrs["complete"] and attrs["storage_dtype"] == "bfloat16" and attrs["device"] == "cpu"
        assert attrs["n_live"] + attrs["n_dead"] == VOCAB
        # the optimizer's per-step tables, as thimble.Recorder writes them for a user's loop
        columns = json.loads(attrs["hyperparameter_columns"])
        hyper, steps, stepped = (read_checked(stream[name]) for name in ("hyperparameters", "param_steps",
                                                                          "param_stepped"))
        assert attrs["optimizer_class"] == "torch.optim.adamw.AdamW"
        assert json.loads(attrs["param_names"]) == ["transformer.wte.weight"]
        assert hyper.shape == (31, 1, len(columns))
        assert (hyper[:, 0, columns.index("lr")] == attrs["learning_rate"]).all()
        assert (hyper[:, 0, columns.index("betas.1")] == attrs["adam_beta2"]).all()
        np.testing.assert_array_equal(steps[1:, 0], np.arange(1, 31))
        assert np.isnan(steps[0, 0]) and stepped[1:].all() and not stepped[0].any()
    # segments of 7 steps, the last one short; no leftovers
    assert [(a, b) for a, b, _ in list_segments(recorded)] == [(0, 6), (7, 13), (14, 20), (21, 27), (28, 30)]
    assert sorted(p.name for p in recorded.iterdir() if not p.name.startswith("segment_")) == ["stream.h5"]
    assert not recorded.with_name(recorded.name + ".partial").exists()


def test_chunks_are_compressed_and_declare_shuffle_zstd(recorded):
    with h5py.File(sorted(recorded.glob("segment_*.h5"))[0], "r") as segment:
        dataset = segment["W"]
        assert dataset.chunks == (1, VOCAB, 8)
        filters = dataset.id.get_create_plist()
        assert [filters.get_filter(i)[0] for i in range(filters.get_nfilters())] == [2, 32015]
        stored = sum(dataset.id.get_chunk_info(i).size for i in range(dataset.id.get_num_chunks()))
        assert stored < dataset.size * 2


def test_two_runs_are_bitwise_identical(recorded, data, tmp_path):
    again = stream_bits(run_train(data, tmp_path / "stream", tiny_settings()))
    first = stream_bits(recorded)
    for name in (*TENSORS, "losses"):
        np.testing.assert_array_equal(first[name], again[name], err_msg=name)


def test_float16_storage_reproduces_the_seed_and_counts_what_it_altered(recorded, data, tmp_path, caplog):
    caplog.set_level("WARNING")
    run_train(data, tmp_path / "stream", tiny_settings(dtype="float16"))
    with open_stream(tmp_path / "stream") as lossy, open_stream(recorded) as exact:
        assert lossy.attrs["storage_dtype"] == "float16" and lossy["W"].dtype == np.float16
        for name in TENSORS:
            expected = torch.from_numpy(read_steps(exact[name]).astype(np.float32)).to(torch.float16).numpy()
            np.testing.assert_array_equal(lossy[name][...], expected)
        # exp_avg_sq ~1e-8 sits below float16's normal range: most of it is altered
        altered = np.count_nonzero(lossy["variance_W"][1:].astype(np.float32) !=
                                   exact["variance_W"][1:].astype(np.float32))
    assert altered > 0
    assert f"altered {altered} of" in caplog.text and "variance_W" in caplog.text


def test_an_existing_output_is_not_overwritten(recorded, data):
    before = stream_bits(recorded)
    with pytest.raises(TrainingError, match="already exists"):
        run_train(data, recorded, tiny_settings())
    np.testing.assert_array_equal(stream_bits(recorded)["W"], before["W"])


def train_command(data, out, settings):
    return [sys.executable, "-m", "thimble", "train", "--settings", json.dumps(settings),
            "--tokens", str(data / "tokens.npy"), "--masks", str(data / "masks.safetensors"),
            "--output", str(out), "--partial", str(out) + ".partial", "--threads", "1"]


@pytest.mark.parametrize("kill_after_checkpoints", [1, 3])
def test_sigkill_midway_then_rerun_equals_uninterrupted(data, tmp_path, kill_after_checkpoints):
    settings = tiny_settings()
    settings["training"]["steps"] = 120
    settings["record"]["segment_steps"] = 10
    reference = stream_bits(run_train(data, tmp_path / "reference", settings))

    out = tmp_path / "stream"
    partial = tmp_path / "stream.partial"
    process = subprocess.Popen(train_command(data, out, settings), stderr=subprocess.DEVNULL)
    seen, last = 0, None
    deadline = time.monotonic() + 120
    while seen < kill_after_checkpoints and time.monotonic() < deadline and process.poll() is None:
        checkpoint = partial / "checkpoint.pt"
        if checkpoint.exists():
            stamp = checkpoint.stat().st_mtime_ns
            if stamp != last:
                seen, last = seen + 1, stamp
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not out.exists(), "killed too late: the run had finished"
    assert partial.exists()

    subprocess.run(train_command(data, out, settings), check=True, stderr=subprocess.DEVNULL)
    resumed = stream_bits(out)
    for name in (*TENSORS, "losses"):
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)
    assert not partial.exists()


def test_resume_state_of_other_settings_is_discarded(data, tmp_path):
    settings = tiny_settings()
    out = tmp_path / "stream"
    run_train(data, out, settings)
    os.replace(out, tmp_path / "stream.partial")  # looks like an unfinished run, but lacks a checkpoint
    changed = tiny_settings()
    changed["training"]["learning_rate"] = 2e-3
    run_train(data, out, changed)
    with open_stream(out) as stream:
        assert stream.attrs["learning_rate"] == 2e-3


def test_parameter_count_is_the_trained_models():
    from thimble.sizes import n_parameters
    from thimble.training.model import build_model

    for model in ({"vocab_size": 384, "hidden_dim": 16, "max_seq_len": 32, "n_layers": 2, "n_heads": 2,
                   "init_scale": 0.02},
                  {"vocab_size": 1000, "hidden_dim": 64, "max_seq_len": 128, "n_layers": 3, "n_heads": 4,
                   "init_scale": 0.02}):
        built = build_model(model, torch.device("cpu"))
        assert n_parameters(model) == sum(p.numel() for p in built.parameters())  # tied: wte counted once
