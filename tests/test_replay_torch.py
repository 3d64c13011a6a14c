"""The replay of recordings that ``thimble.Recorder`` made in plain torch loops: torch's AdamW, Adam and SGD of
every implementation, bf16 and fp32 parameters, a scheduler changing the lr at every step, a parameter without a
gradient at some steps (its first among them), gradient clipping and two param groups, replay bit for bit from
the stream and from a rechunked recording.h5; a tampered value or moment is found at its tensor and step; the
freeze criterion of bf16 AdamW with the per-step lr; an optimizer, a tensor or a setting that cannot be replayed
is said in replay.json, and the stage still writes its tables."""

import csv
import json
import shutil

import h5py
import numpy as np
import pytest
import torch

import thimble
from conftest import rewrite_steps
from thimble.analysis.replay import RATIO_COLUMNS, replay_recording
from thimble.analysis.torch_replay import CRITERION_COLUMNS
from thimble.numerics.bf16 import BFLOAT16
from thimble.record.format import RecordLayout, read_checked
from thimble.record.reader import read_steps
from thimble.record.rechunk import rechunk_stream

STEPS = 9
#: the parameter that has no gradient at some steps, the first of them included
SKIPPED = "norm.bias"
#: the steps (1-based) at which it has none
SKIPPED_STEPS = (1, 2, 5)
NAMES = ["embed.weight", "norm.weight", "norm.bias", "head.weight", "head.bias"]


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(40, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 40)

    def forward(self, tokens):
        return self.head(self.norm(self.embed(tokens)))


OPTIMIZERS = {
    "adamw_single_tensor": lambda params: torch.optim.AdamW(params, lr=2e-2, weight_decay=0.1, foreach=False),
    "adamw_foreach": lambda params: torch.optim.AdamW(params, lr=2e-2, weight_decay=0.1, foreach=True),
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=2e-2, weight_decay=0.1, fused=True),
    "adam_decay_amsgrad": lambda params: torch.optim.Adam(params, lr=2e-2, weight_decay=0.1, amsgrad=True,
                                                          maximize=True, foreach=True),
    "sgd_nesterov": lambda params: torch.optim.SGD(params, lr=5e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
    # dampening scales every gradient but the first a buffer takes: a zero buffer loaded for a parameter's first
    # step (the skipped parameter's is step 3) would not replay it
    "sgd_dampening": lambda params: torch.optim.SGD(params, lr=5e-2, momentum=0.9, dampening=0.5, weight_decay=0.1,
                                                    maximize=True, foreach=True),
    "sgd_plain": lambda params: torch.optim.SGD(params, lr=1e-1),
}

#: the implementation each runs (on the CPU, torch's default for an unset foreach is single_tensor)
IMPLEMENTATIONS = {"adamw_single_tensor": "single_tensor", "adamw_foreach": "foreach", "adamw_fused": "fused",
                   "adam_decay_amsgrad": "foreach", "sgd_nesterov": "single_tensor", "sgd_dampening": "foreach",
                   "sgd_plain": "single_tensor"}


def record(directory, make_optimizer, dtype=torch.bfloat16, steps: int = STEPS, steps_before: int = 0,
           groups: bool = False, scheduler: bool = True, skipped_steps=SKIPPED_STEPS):
    """A recorder's recording of a tiny loop: the lr set by a scheduler at every step, gradients clipped, norm.bias
    without a gradient at ``skipped_steps``; ``steps_before`` steps taken before the recorder attaches; ``groups``:
    the norm and the biases in a second group without weight decay. Returns the run's directory."""
    torch.manual_seed(0)
    model = Tiny().to(dtype)
    params = model.parameters()
    if groups:
        plain = [model.norm.weight, model.norm.bias, model.head.bias]
        params = [{"params": [model.embed.weight, model.head.weight]},
                  {"params": plain, "weight_decay": 0.0, "lr": 5e-3}]
    optimizer = make_optimizer(params)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + 0.3 * step)) if scheduler else None

    def step(number: int) -> torch.Tensor:
        tokens = torch.randint(0, 40, (4, 6))
        loss = torch.nn.functional.cross_entropy(model(tokens).float().reshape(-1, 40), tokens.reshape(-1))
        loss.backward()
        if number in skipped_steps:
            model.norm.bias.grad = None
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
        if schedule is not None:
            schedule.step()
        return loss

    for _ in range(steps_before):
        step(0)
    with thimble.Recorder(directory, model, optimizer, tensors="*", segment_steps=4) as recorder:
        for number in range(1, steps + 1):
            recorder.log(loss=step(number))
    return directory


def replay(recording, directory) -> tuple[dict, list[dict], list[dict]]:
    """replay.json, replay.csv's rows and update_ratio.csv's rows of a replay written into ``directory``."""
    directory.mkdir(exist_ok=True)
    paths = [directory / name for name in ("replay.csv", "replay.json", "update_ratio.csv")]
    summary = replay_recording(str(recording), *map(str, paths))
    assert summary == json.loads(paths[1].read_text())
    return summary, list(csv.DictReader(open(paths[0]))), list(csv.DictReader(open(paths[2])))


def rechunked(run) -> str:
    """The run's stream rechunked into recording.h5 in chunks of 4 steps (the replay's blocks cross them)."""
    rechunk_stream(run / "stream", run / "recording.h5", 4, 2**31)
    return str(run / "recording.h5")


def mismatch_columns(rows: list[dict]) -> list[str]:
    return [column for column in rows[0] if column.endswith("_mismatches")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_replays_bit_for_bit_from_the_stream_and_the_rechunked_recording(tmp_path, name, dtype):
    run = record(tmp_path / "run", OPTIMIZERS[name], dtype)
    with h5py.File(run / "stream" / "stream.h5") as handle:
        layout = RecordLayout.of_file(handle)
        lrs = read_checked(handle["hyperparameters"])[1:, 0, 0]
        # what the replay checks is not trivially constant: values move, the lr falls at every step
        moved = {name: not np.array_equal(*read_steps(handle[param.paths["value"]])[[0, -1]])
                 for name, param in layout.params.items()}
        state = {key for param in layout.params.values() for key in param.paths} - {"value", "grad"}
    assert list(layout.params) == NAMES and sum(moved.values()) >= 4
    assert (np.diff(lrs) < 0).all()
    expected_state = {"adamw": {"exp_avg", "exp_avg_sq"}, "adam": {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
                      "sgd": {"momentum_buffer"}}[name.split("_")[0]] if name != "sgd_plain" else set()
    assert state == expected_state

    for recording in (run / "stream", rechunked(run)):
        summary, rows, ratio_rows = replay(recording, tmp_path / "out")
        assert summary["replayed"] and summary["bitwise_match"] and summary["not_replayed"] == {}
        assert summary["optimizer"] == {"adamw": "torch.optim.adamw.AdamW", "adam": "torch.optim.adam.Adam",
                                        "sgd": "torch.optim.sgd.SGD"}[name.split("_")[0]]
        assert summary["steps"] == STEPS and list(summary["tensors"]) == NAMES
        assert summary["varying_hyperparameters"]["lr"]["first"] == lrs[0]
        assert summary["varying_hyperparameters"]["lr"]["last"] == lrs[-1]
        assert [(row["tensor"], int(row["step"])) for row in rows] == [(tensor, step) for tensor in NAMES
                                                                       for step in range(1, STEPS + 1)]
        columns = mismatch_columns(rows)
        assert len(columns) == 1 + len(expected_state) + name.startswith("adam")  # W, state, Adam's step count
        assert all(row[column] == "0" for row in rows for column in columns)
        # the parameter without a gradient is skipped at those steps (checked unchanged), every other one stepped
        stepped = {(row["tensor"], int(row["step"])): row["stepped"] for row in rows}
        assert all(stepped[tensor, step] == ("0" if tensor == SKIPPED and step in SKIPPED_STEPS else "1")
                   for tensor, step in stepped)
        assert summary["skipped_steps"] == summary["tensors"][SKIPPED]["skipped_steps"] == len(SKIPPED_STEPS)
        assert summary["optimizer_impl"] == IMPLEMENTATIONS[name]
        assert all(tensor["implementation"] == IMPLEMENTATIONS[name] for tensor in summary["tensors"].values())


def test_state_found_when_the_recorder_attached_and_two_param_groups_replay(tmp_path):
    """An optimizer that stepped before the recorder attached (initial_state as_found: Adam's counts and moments,
    SGD's buffers at step 0), with a second param group of its own lr and no weight decay."""
    for name in ("adamw_single_tensor", "sgd_dampening"):
        run = record(tmp_path / name, OPTIMIZERS[name], steps_before=3, groups=True)
        summary, rows, _ = replay(run / "stream", tmp_path / f"{name}_out")
        assert summary["initial_state"] == "as_found" and summary["bitwise_match"], name
        assert {tensor["param_group"] for tensor in summary["tensors"].values()} == {0, 1}
        assert all(row[column] == "0" for row in rows for column in mismatch_columns(rows))


@pytest.fixture(scope="module")
def adamw_bf16(tmp_path_factory):
    """A bf16 single-tensor AdamW recording, rechunked."""
    run = record(tmp_path_factory.mktemp("adamw_bf16") / "run", OPTIMIZERS["adamw_single_tensor"])
    return rechunked(run)


def test_the_freeze_criterion_of_bf16_adamw_runs_with_each_steps_lr(adamw_bf16, tmp_path):
    summary, rows, ratio_rows = replay(adamw_bf16, tmp_path)
    criterion = summary["freeze_criterion"]
    assert criterion["applies"] and criterion["tensors"] == NAMES
    # single-tensor arithmetic is what the criterion follows: it predicts every element at every step
    assert criterion["disagreements"] == 0 and criterion["elements"] == STEPS * sum(
        tensor["elements"] for tensor in summary["tensors"].values())
    assert all(set(CRITERION_COLUMNS) <= set(row) for row in rows)
    for row in rows:
        assert int(row["predicted_frozen"]) == int(row["observed_frozen"]) == int(row["replay_frozen"])
    # a skipped step forms no update: every element predicted and observed unmoved
    skipped = [row for row in rows if row["stepped"] == "0"]
    assert len(skipped) == len(SKIPPED_STEPS)
    assert all(int(row["predicted_frozen"]) == int(row["elements"]) for row in skipped)
    # the update-ratio histograms: a row per tensor and step, each element in one bin
    assert [(row["tensor"], row["step"]) for row in ratio_rows] == [(row["tensor"], row["step"]) for row in rows]
    for ratio_row, row in zip(ratio_rows, rows):
        assert sum(int(ratio_row[column]) for column in RATIO_COLUMNS) == int(row["elements"])


def test_the_criterion_does_not_apply_to_fp32_or_sgd(tmp_path):
    for name, dtype in (("adamw_foreach", torch.float32), ("sgd_nesterov", torch.bfloat16)):
        run = record(tmp_path / name, OPTIMIZERS[name], dtype, steps=3)
        summary, rows, ratio_rows = replay(run / "stream", tmp_path / f"{name}_out")
        assert summary["bitwise_match"] and summary["freeze_criterion"]["applies"] is False
        assert ("float32" if dtype == torch.float32 else "SGD") in summary["freeze_criterion"]["why"]
        assert ratio_rows == [] and "predicted_frozen" not in rows[0]


def test_a_tampered_value_and_moment_are_found_at_their_tensor_and_step(adamw_bf16, tmp_path):
    copy = tmp_path / "recording.h5"
    shutil.copy(adamw_bf16, copy)
    with h5py.File(copy, "r+") as handle:
        params = RecordLayout.of_file(handle).params
        value = handle[params["head.weight"].paths["value"]]
        values = read_steps(value, 5, 6)
        values[0, 0, :3] = (values[0, 0, :3].astype(np.float32) * 1.5).astype(BFLOAT16)
        rewrite_steps(value, 5, values.view(np.uint16))
        moment = handle[params["embed.weight"].paths["exp_avg_sq"]]
        moments = read_steps(moment, 3, 4)
        moments[0, 7, :2] = (moments[0, 7, :2].astype(np.float32) * 4 + 1).astype(BFLOAT16)
        rewrite_steps(moment, 3, moments.view(np.uint16))
    summary, rows, _ = replay(copy, tmp_path)

    assert not summary["bitwise_match"]
    assert summary["tensors"]["head.weight"]["first_mismatch_step"] == 5
    assert summary["tensors"]["embed.weight"]["first_mismatch_step"] == 3
    assert all(tensor["bitwise_match"] for name, tensor in summary["tensors"].items()
               if name not in ("head.weight", "embed.weight"))
    head = {int(row["step"]): row for row in rows if row["tensor"] == "head.weight"}
    assert int(head[5]["W_mismatches"]) == 3  # step 5 predicted from step 4 no longer matches
    assert int(head[6]["W_mismatches"]) > 0  # and step 6 starts from the tampered value
    assert all(row["W_mismatches"] == "0" for step, row in head.items() if step not in (5, 6))
    embed = {int(row["step"]): row for row in rows if row["tensor"] == "embed.weight"}
    assert int(embed[3]["variance_W_mismatches"]) == 2 and embed[3]["W_mismatches"] == "0"
    assert int(embed[4]["variance_W_mismatches"]) > 0  # step 4 starts from the tampered moment
    assert all(row["variance_W_mismatches"] == "0" for step, row in embed.items() if step not in (3, 4))


def test_rmsprop_is_recorded_but_not_replayed_and_says_why(tmp_path):
    run = record(tmp_path / "run", lambda params: torch.optim.RMSprop(params, lr=1e-2), steps=3)
    summary, rows, ratio_rows = replay(run / "stream", tmp_path / "out")
    assert summary["replayed"] is False and summary["bitwise_match"] is None
    assert summary["optimizer"] == "torch.optim.rmsprop.RMSprop" and "RMSprop" in summary["why"]
    assert summary["tensors"] == {} and list(summary["not_replayed"]) == NAMES
    assert summary["freeze_criterion"]["applies"] is False
    assert rows == [] and ratio_rows == []
    assert (tmp_path / "out" / "replay.csv").read_text().startswith("tensor,step,")


def test_a_tensor_missing_a_state_tensor_is_not_replayed_the_others_are(adamw_bf16, tmp_path):
    copy = tmp_path / "recording.h5"
    shutil.copy(adamw_bf16, copy)
    with h5py.File(copy, "r+") as handle:
        recorded = json.loads(handle.attrs["recorded_params"])
        del recorded["norm.weight"]["tensors"]["exp_avg_sq"]
        del handle["params/norm.weight/exp_avg_sq"]
        handle.attrs["recorded_params"] = json.dumps(recorded)
    summary, rows, _ = replay(copy, tmp_path)
    assert summary["replayed"] and summary["bitwise_match"]
    assert list(summary["not_replayed"]) == ["norm.weight"] and "exp_avg_sq" in summary["not_replayed"]["norm.weight"]
    assert list(summary["tensors"]) == [name for name in NAMES if name != "norm.weight"]
    assert {row["tensor"] for row in rows} == set(summary["tensors"])


def test_fused_sgd_of_bf16_on_the_cpu_is_replayed_with_a_note_on_its_kernel(tmp_path):
    run = record(tmp_path / "run", lambda params: torch.optim.SGD(params, lr=5e-2, momentum=0.9, fused=True),
                 steps=3, skipped_steps=())
    summary, rows, _ = replay(run / "stream", tmp_path / "out")
    assert summary["replayed"] and all(row["W_mismatches"] == "0" for row in rows)
    assert "fused SGD" in summary["kernel_notes"][0] and "embed.weight" in summary["kernel_notes"][0]


def test_a_tensor_valued_lr_is_not_replayed_and_says_why(tmp_path):
    run = record(tmp_path / "run", lambda params: torch.optim.AdamW(params, lr=torch.tensor(1e-2), foreach=False),
                 steps=2, scheduler=False)
    summary, rows, _ = replay(run / "stream", tmp_path / "out")
    assert summary["replayed"] is False and rows == []
    assert all("lr was a tensor" in why for why in summary["not_replayed"].values())


@pytest.mark.parametrize("dtype, lr, vanishes", [(torch.bfloat16, 1e-3, True), (torch.float32, 1e-3, False),
                                                 (torch.bfloat16, 0.2, False)], ids=["bf16", "fp32", "bf16_large"])
def test_the_replay_says_what_the_weight_decay_changed(tmp_path, dtype, lr, vanishes):
    """AdamW's decoupled decay, ``param.mul_(1 - lr * weight_decay)`` on its own rounding: on bf16 weights with
    lr * weight_decay = 1e-4, under half of bf16's relative spacing (2^-9 at least), every product rounds back
    to the weight, so the decay changes no element; on float32 weights it changes almost every one; on bf16 with
    lr * weight_decay = 0.02 it changes many."""
    run = record(tmp_path / "run", lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.1, foreach=False),
                 dtype, scheduler=False)
    summary, rows, _ = replay(run / "stream", tmp_path / "replay")
    assert summary["bitwise_match"]
    decay = summary["weight_decay"]
    stepped = [row for row in rows if row["stepped"] == "1"]
    assert decay["applies"] and decay["element_steps"] == sum(int(row["elements"]) for row in stepped)
    assert decay["changed"] == sum(int(row["decay_changed"]) for row in rows)
    if vanishes:
        assert decay["changed"] == 0
    else:
        assert decay["changed_share"] > (0.9 if dtype == torch.float32 else 0.05)
