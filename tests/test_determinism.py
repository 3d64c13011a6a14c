"""Determinism verified, not assumed: every training session runs its first steps twice and
refuses to record when they disagree; the check changes no recorded bit; the MPS lookups' backward,
selected on the CPU, gives the CPU's own bits."""

import json
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import thimble.training.determinism as determinism
import thimble.training.train as train_module
from thimble import open_run
from thimble.config import resolve_config, stage_settings, trajectory_settings
from thimble.training.determinism import DeterminismError, LookupBackwardOnCpu, differences, use_lookup_backward
from thimble.record.format import list_segments, stream_tensors
from thimble.record.reader import read_steps
from thimble.record.stream_reader import open_stream
from thimble.training.model import build_model
from thimble.training.checkpoint import CHECKPOINT, CHECKPOINT_SHA256

from conftest import run_train, tiny_settings  # the fixtures data and recorded live there too


def stream_bits(directory) -> dict[str, np.ndarray]:
    with open_stream(directory) as stream:
        bits = {name: read_steps(stream[name]).view(np.uint8).copy() for name in stream_tensors(stream)}
        bits["losses"] = stream["losses"][...].view(np.uint8).copy()  # the bits, NaN at step 0 included
    return bits


def assert_same_bits(a, b) -> None:
    first, second = stream_bits(a), stream_bits(b)
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def check_attr(directory) -> dict:
    with open_stream(directory) as stream:
        return json.loads(stream.attrs["determinism_check"])


class _ShuffledScatter(torch.autograd.Function):
    """An embedding whose backward adds the rows' gradients in bf16, in another order at every call: the
    sums round differently, as a device's atomic adds do. Seeded by the call count, so the test is repeatable."""

    calls = 0

    @staticmethod
    def forward(ctx, indices, weight):
        ctx.save_for_backward(indices)
        ctx.num_weights = weight.shape[0]
        return F.embedding(indices, weight)

    @staticmethod
    def backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        flat = grad_output.reshape(-1, grad_output.shape[-1])
        order = torch.randperm(len(flat), generator=torch.Generator().manual_seed(_ShuffledScatter.calls))
        _ShuffledScatter.calls += 1
        rows = indices.reshape(-1)
        grad = torch.zeros(ctx.num_weights, flat.shape[1], dtype=flat.dtype)
        for position in order.tolist():  # one bf16 rounding per add (index_add_ would sum exactly, then round)
            grad[rows[position]] += flat[position]
        return None, grad


class ShuffledLookup(nn.Embedding):
    def forward(self, input):
        return _ShuffledScatter.apply(input, self.weight)


def test_a_non_deterministic_lookup_is_refused_before_anything_is_recorded(data, tmp_path, monkeypatch):
    monkeypatch.setitem(determinism.LOOKUP_BACKWARDS, "shuffled", ShuffledLookup)
    monkeypatch.setattr(train_module, "lookup_backward", lambda device: "shuffled")
    settings = tiny_settings()
    settings["record"]["segment_steps"] = 1  # a checkpoint after every step: none may be written
    out = tmp_path / "stream"
    with pytest.raises(DeterminismError) as raised:
        run_train(data, out, settings)
    message = str(raised.value)
    assert "not deterministic on cpu: step 1," in message
    assert "params/transformer.wte.weight/grad: " in message and " of 2400 elements" in message
    assert "training.device" in message and "determinism_check_steps: 0" in message
    partial = tmp_path / "stream.partial"
    assert not out.exists()
    assert not (partial / CHECKPOINT).exists() and not list_segments(partial)


def test_the_check_changes_no_recorded_bit_and_says_what_it_compared(data, recorded, tmp_path):
    settings = tiny_settings()
    assert settings["training"]["determinism_check_steps"] == 2  # the schema's default
    check = check_attr(recorded)
    assert json.loads(open_run(recorded.parent, source="stream").attrs["determinism_check"]) == check
    assert check["result"] == "bitwise identical" and check["device"] == "cpu"
    assert check["steps_compared"] == [1, 2]
    # per step W, grad_W, both moments (300 x 8 each) and the loss; then the whole model and optimizer state
    n_params = sum(p.numel() for p in build_model(settings["model"], torch.device("cpu")).parameters())
    assert check["elements_compared"] > 2 * (4 * 2400 + 1) + 3 * n_params
    settings["training"]["determinism_check_steps"] = 0
    unchecked = run_train(data, tmp_path / "unchecked", settings)
    assert_same_bits(unchecked, recorded)
    assert check_attr(unchecked)["result"] == "not checked" and check_attr(unchecked)["steps_compared"] == []


@pytest.mark.parametrize("rule", ["stochastic_rounding", "kahan", "fp32_master"])
def test_every_update_rule_records_the_same_bits_with_and_without_the_check(data, tmp_path, rule):
    settings = tiny_settings()
    settings["training"].update(update_rule=rule, steps=8)
    settings["record"]["segment_steps"] = 2  # checkpoints inside the checked steps, held back until they pass
    settings["training"]["determinism_check_steps"] = 0
    unchecked = run_train(data, tmp_path / "unchecked", settings)
    settings["training"]["determinism_check_steps"] = 3
    checked = run_train(data, tmp_path / "checked", settings)
    assert_same_bits(checked, unchecked)
    assert check_attr(checked)["steps_compared"] == [1, 2, 3]


def test_a_resumed_session_checks_from_its_checkpoint(data, recorded, tmp_path, monkeypatch):
    settings = tiny_settings()  # 30 steps; segments 0..6, 7..13, ...: a checkpoint after steps 6, 13, ...
    out = tmp_path / "stream"
    real_step = train_module.train_step

    def crash_at_step_17(step, *args, **kwargs):
        if step == 17:  # once the checkpoint after step 13 is durable (the recorder writes it in the background)
            listing = tmp_path / "stream.partial" / CHECKPOINT_SHA256
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not (
                    listing.exists() and json.loads(listing.read_text())["step"] == 13):
                time.sleep(0.01)
            raise KeyboardInterrupt
        return real_step(step, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "train_step", crash_at_step_17)
        with pytest.raises(KeyboardInterrupt):
            run_train(data, out, settings)
    settings["training"]["determinism_check_steps"] = 3
    run_train(data, out, settings)
    assert_same_bits(out, recorded)
    check = check_attr(out)
    assert check["steps_compared"] == [1, 2, 14, 15, 16] and check["result"] == "bitwise identical"
    assert [session["steps_requested"] for session in check["sessions"]] == [2, 3]


def test_the_check_is_no_part_of_the_trajectory_or_the_train_stages_tracked_settings():
    settings = tiny_settings()
    assert "determinism_check_steps" not in stage_settings(settings, "train")["training"]
    assert "determinism_check_steps" not in trajectory_settings(settings)["training"]
    assert settings["training"]["determinism_check_steps"] == 2
    config = {"datasets": {"toy": {"source": {"local": "t"}, "tokenizer_texts": ["*"], "model_texts": ["*"],
                                   "vocab_size": 300}},
              "experiments": {"x": {"dataset": "toy", "training": {"determinism_check_steps": -1}}}}
    with pytest.raises(ValueError, match=r"experiments\.x\.training\.determinism_check_steps"):
        resolve_config(config)


def test_differences_compare_bits_not_values():
    zero = torch.zeros(3, dtype=torch.bfloat16)
    signed = zero.clone()
    signed[1] = -0.0
    nan = torch.full((2,), float("nan"), dtype=torch.bfloat16)
    other_nan = nan.clone().view(torch.int16)
    other_nan[0] += 1
    differing, compared = differences({"a": zero, "b": nan, "loss": 0.5}, {"a": signed, "b": other_nan.view(
        torch.bfloat16), "loss": 0.5})
    assert differing == {"a": (1, 3), "b": (1, 2)} and compared == 6
    assert differences({"loss": float("nan")}, {"loss": float("nan")}) == ({}, 1)
    assert differences({"loss": 0.0}, {"loss": -0.0})[0] == {"loss": (1, 1)}


def test_the_mps_lookup_backward_gives_the_cpus_bits(data, recorded, tmp_path, monkeypatch):
    """The MPS path (lookups' backward through the CPU kernel) selected on the CPU: the stock kernel's bits."""
    model = build_model(tiny_settings()["model"], torch.device("cpu"))
    ids = torch.tensor([[1, 2, 1, 1, 5, 2, 1, 7]] * 4)
    stock = build_model(tiny_settings()["model"], torch.device("cpu"))
    stock.load_state_dict(model.state_dict())
    use_lookup_backward(model, "cpu")
    assert type(model.transformer.wte) is type(model.transformer.wpe) is LookupBackwardOnCpu
    assert model.transformer.wte.weight is model.lm_head.weight  # still tied
    for net in (model, stock):
        net(input_ids=ids, labels=ids).loss.backward()
    for (name, mine), theirs in zip(model.named_parameters(), stock.parameters()):
        assert torch.equal(mine.grad.view(torch.int16), theirs.grad.view(torch.int16)), name

    monkeypatch.setattr(train_module, "lookup_backward", lambda device: "cpu")
    via_cpu = run_train(data, tmp_path / "stream", tiny_settings())
    assert_same_bits(via_cpu, recorded)
    with open_stream(via_cpu) as stream, open_stream(recorded) as plain:
        assert stream.attrs["lookup_backward"] == "cpu" and plain.attrs["lookup_backward"] == "device"


def test_only_mps_moves_the_lookup_backward():
    assert determinism.lookup_backward(torch.device("mps")) == "cpu"
    assert determinism.lookup_backward(torch.device("cpu")) == determinism.lookup_backward(
        torch.device("cuda")) == "device"


def test_an_op_without_a_deterministic_kernel_is_a_one_line_refusal(data, tmp_path, monkeypatch):
    """What torch raises under use_deterministic_algorithms on MPS for an atomic scatter (pytorch#195754)."""
    def no_kernel(step, *args, **kwargs):
        raise RuntimeError("index_put_ with accumulate=True does not have a deterministic implementation on mps\n"
                           "You can turn off determinism just for this operation ...")

    monkeypatch.setattr(train_module, "train_step", no_kernel)
    with pytest.raises(DeterminismError, match=r"not deterministic on cpu: torch has no deterministic kernel .*"
                                               r"index_put_ with accumulate=True"):
        run_train(data, tmp_path / "stream", tiny_settings())
    assert not (tmp_path / "stream").exists()
