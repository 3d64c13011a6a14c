"""``thimble.Recorder`` on plain PyTorch loops that were not written for thimble: what the loop held at every
optimizer step, bit for bit, in the parameters' own dtypes; the per-step tables; a killed loop's partial
recording; the refusals."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

import thimble
from thimble.record.format import read_checked
from thimble.record.reader import RecordedTensor
from thimble.record.recorder import RecorderError, close_partial


def bits(tensor: torch.Tensor) -> np.ndarray:
    width = {2: torch.int16, 4: torch.int32}[tensor.element_size()]
    return tensor.detach().contiguous().view(width).numpy().view(np.dtype(f"u{tensor.element_size()}"))


def recorded_rows(stream_file, param: str, key: str) -> np.ndarray:
    with h5py.File(stream_file) as handle:
        tensor = RecordedTensor.of_recording(handle, f"params/{param}/{key}")
        return tensor.bits(0, tensor.shape[0])


class SmallCNN(torch.nn.Module):
    """Not a transformer: a convolution, LayerNorm and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.norm = torch.nn.LayerNorm([4, 6, 6])
        self.head = torch.nn.Linear(4 * 36, 3)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


def held_copies(model, optimizer) -> dict:
    """What the loop holds after a step: each parameter's value, gradient and optimizer state, copied."""
    return {name: {"value": param.detach().clone(), "grad": param.grad.detach().clone(),
                   **{key: value.detach().clone() for key, value in optimizer.state[param].items()
                      if torch.is_tensor(value) and value.shape == param.shape}}
            for name, param in model.named_parameters()}


def test_fp32_cnn_under_autocast_is_recorded_bit_for_bit(tmp_path):
    """fp32 parameters trained under bf16 autocast with AdamW, a step schedule and clipping: every recorded
    tensor equals what the loop held after each step, in float32; the tables give the lr the schedule set."""
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    generator = torch.Generator().manual_seed(1)
    initial = {name: param.detach().clone() for name, param in model.named_parameters()}
    held, lrs = [], []
    with thimble.Recorder(tmp_path / "cnn", model, optimizer, tensors="*", segment_steps=5) as rec:
        for _ in range(13):
            x = torch.randn(8, 1, 6, 6, generator=generator)
            y = torch.randint(3, (8,), generator=generator)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            rec.log(loss=loss)
            held.append(held_copies(model, optimizer))
            optimizer.zero_grad()
            schedule.step()
    stream = tmp_path / "cnn" / "stream" / "stream.h5"
    with h5py.File(stream) as handle:
        attrs = dict(handle.attrs)
        columns = json.loads(attrs["hyperparameter_columns"])
        hyper = read_checked(handle["hyperparameters"])
        losses = read_checked(handle["losses"])
        steps = read_checked(handle["param_steps"])
        stepped = read_checked(handle["param_stepped"])
    assert attrs["optimizer_class"] == "torch.optim.adamw.AdamW"
    assert attrs["optimizer_impl"] == "single_tensor"
    assert attrs["storage_dtype"] == "native"
    assert attrs["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert json.loads(attrs["param_dtypes"]) == {name: "float32" for name, _ in model.named_parameters()}
    assert hyper.shape == (14, 1, len(columns))
    np.testing.assert_array_equal(hyper[1:, 0, columns.index("lr")], lrs)
    assert len(set(lrs)) == 4  # the schedule halved it three times
    assert (hyper[:, 0, columns.index("weight_decay")] == 0.1).all()
    assert np.isnan(losses[0]) and np.isfinite(losses[1:]).all()
    np.testing.assert_array_equal(steps[1:, 0], np.arange(1, 14))
    assert stepped[1:].all() and not stepped[0].any()
    for name, param in model.named_parameters():
        for key in ("value", "grad", "exp_avg", "exp_avg_sq"):
            rows = recorded_rows(stream, name, key)
            assert rows.dtype == np.uint32 and rows.shape == (14, *param.shape)
            for step, copies in enumerate(held, start=1):
                np.testing.assert_array_equal(rows[step], bits(copies[name][key]), err_msg=f"{name} {key} {step}")
        np.testing.assert_array_equal(recorded_rows(stream, name, "value")[0], bits(initial[name]))
        assert not recorded_rows(stream, name, "grad")[0].any() and not recorded_rows(stream, name, "exp_avg")[0].any()
    # the clipping shows in what the optimizer consumed
    norms = [torch.sqrt(sum(copies[name]["grad"].double().pow(2).sum() for name in copies)) for copies in held]
    assert max(norms) <= 0.5 + 1e-6


def test_float16_sgd_with_momentum_and_a_skipped_parameter(tmp_path):
    """float16 parameters under SGD with Nesterov momentum: stored as float16; a parameter without a gradient at
    a step is marked not stepped and its recorded momentum buffer stays what the optimizer holds."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(20, 4).to(torch.float16)
    head = torch.nn.Linear(4, 2).to(torch.float16)
    model = torch.nn.ModuleDict({"embedding": embedding, "head": head})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    held = []
    dead = np.zeros(20, bool)
    dead[15:] = True
    with thimble.Recorder(tmp_path / "sgd", model, optimizer, tensors=["embedding.*", "head.weight"],
                          token_groups={"dead": dead}) as rec:
        for step in range(6):
            ids = torch.randint(15, (5,))
            out = head(embedding(ids)).float().sum()
            out.backward()
            if step == 2:
                head.weight.grad = None  # the optimizer skips it at this step
            optimizer.step()
            rec.log(loss=out)
            held.append({name: (param.detach().clone(), optimizer.state[param].get("momentum_buffer"))
                         for name, param in model.named_parameters()})
            held[-1] = {name: (value, None if buffer is None else buffer.clone())
                        for name, (value, buffer) in held[-1].items()}
            optimizer.zero_grad()
    stream = tmp_path / "sgd" / "stream" / "stream.h5"
    with h5py.File(stream) as handle:
        layout = json.loads(handle.attrs["recorded_params"])
        stepped = read_checked(handle["param_stepped"])
        assert handle.attrs["token_groups_param"] == "embedding.weight"
        np.testing.assert_array_equal(read_checked(handle["dead_mask"]), dead)
        np.testing.assert_array_equal(read_checked(handle["live_ids"]), np.arange(15))
        assert np.isnan(read_checked(handle["param_steps"])).all()  # SGD keeps no step count
    assert list(layout) == ["embedding.weight", "head.weight"]
    assert layout["head.weight"]["tensors"] == {"value": "float16", "grad": "float16", "momentum_buffer": "float16"}
    assert stepped[3].tolist() == [1, 0] and stepped[1:].sum() == 11
    for name in layout:
        values, buffers = (recorded_rows(stream, name, key) for key in ("value", "momentum_buffer"))
        assert values.dtype == np.uint16
        for step, copies in enumerate(held, start=1):
            value, buffer = copies[name]
            np.testing.assert_array_equal(values[step], bits(value))
            np.testing.assert_array_equal(buffers[step], bits(buffer))
    assert not recorded_rows(stream, "head.weight", "grad")[3].any()


KILLED_LOOP = textwrap.dedent("""
    import os, pathlib, signal, sys, time, torch, thimble
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 6).to(torch.bfloat16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    rec = thimble.Recorder(sys.argv[1], model, optimizer, segment_steps=4)
    for step in range(1, 100):
        model(torch.randn(3, 6, dtype=torch.bfloat16)).float().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 11:  # once steps 0..7 are in complete segments, killed inside the next one
            done = pathlib.Path(sys.argv[1], "stream", "segment_000004-000007.h5")
            for _ in range(300):
                if done.exists():
                    break
                time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_killed_loop_leaves_a_partial_recording_that_close_partial_makes_readable(tmp_path):
    run = tmp_path / "killed"
    result = subprocess.run([sys.executable, "-c", KILLED_LOOP, str(run)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == -signal.SIGKILL, result.stderr
    stream = run / "stream"
    names = sorted(path.name for path in stream.iterdir())
    assert "stream.h5" not in names and "segment_000000-000003.h5" in names
    with pytest.raises(RecorderError, match="partial recording"):
        thimble.Recorder(run, torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1))
    close_partial(run)
    with h5py.File(stream / "stream.h5") as handle:
        assert handle.attrs["interrupted"]
        last = handle["losses"].shape[0] - 1
        values = RecordedTensor.of_recording(handle, "params/weight/value").bits(0, last + 1)
        assert handle.attrs["optimizer_class"] == "torch.optim.adam.Adam"
    assert last == 7
    assert values.shape == (last + 1, 6, 6) and (values[1:] != values[:-1]).any(axis=(1, 2)).all()
    # nothing a reader could unpickle: HDF5 and JSON only
    assert {path.suffix for path in stream.iterdir() if path.is_file()} <= {".h5", ".json", ".tmp"}


def test_refusals_name_what_to_do(tmp_path):
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RecorderError, match="'decoder.*' names no parameter"):
        thimble.Recorder(tmp_path / "a", model, optimizer, tensors=["decoder.*"])
    other = torch.optim.SGD([model.weight], lr=0.1)
    with pytest.raises(RecorderError, match="does not step bias"):
        thimble.Recorder(tmp_path / "b", model, other, tensors=["weight", "bias"])
    # "*": every parameter the optimizer steps (a frozen one is not trained, so not recorded)
    assert list(thimble.Recorder(tmp_path / "b", model, other, tensors="*").params) == ["weight"]
    with pytest.raises(RecorderError, match="float64"):
        thimble.Recorder(tmp_path / "c", model.double(), torch.optim.SGD(model.parameters(), lr=0.1))
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with thimble.Recorder(tmp_path / "d", model, optimizer):
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
    with pytest.raises(RecorderError, match="already holds a recording"):
        thimble.Recorder(tmp_path / "d", model, optimizer)
    with pytest.raises(RecorderError, match="made no step"):
        with thimble.Recorder(tmp_path / "e", model, optimizer):
            pass


@pytest.mark.parametrize("foreach", [False, True])
def test_the_gradient_is_the_one_the_step_received(tmp_path, foreach):
    """SGD's foreach Nesterov adds the momentum into ``.grad`` in place; a closure computes the gradient inside
    ``step()`` (Lightning's automatic optimization): either way the recording holds the gradient the step got."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, foreach=foreach)
    received = []

    def closure():
        optimizer.zero_grad()
        loss = model(torch.randn(2, 4, dtype=torch.bfloat16)).float().pow(2).sum()
        loss.backward()
        received.append(model.weight.grad.detach().clone())
        return loss

    with thimble.Recorder(tmp_path / "run", model, optimizer) as rec:
        for step in range(4):
            if step % 2:
                optimizer.step(closure)
            else:
                closure()
                optimizer.step()
            rec.log(loss=0.0)
    rows = recorded_rows(tmp_path / "run" / "stream" / "stream.h5", "weight", "grad")
    for step, grad in enumerate(received, start=1):
        np.testing.assert_array_equal(rows[step], bits(grad))
    assert rec.attrs()["optimizer_impl"] == ("foreach" if foreach else "single_tensor")


def test_a_scalar_parameter_is_recorded_and_its_step_count_is_no_state_tensor(tmp_path):
    """A 0-d parameter (a learned temperature): its rows read back as the loop held them, and Adam's 0-d
    ``state["step"]`` goes to ``param_steps``, not among its state tensors."""
    torch.manual_seed(0)
    temperature = torch.nn.Parameter(torch.tensor(1.5))
    linear = torch.nn.Linear(3, 3)
    model = torch.nn.ParameterDict({"temperature": temperature, "weight": linear.weight})
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    held = []
    with thimble.Recorder(tmp_path / "run", model, optimizer) as rec:
        for _ in range(5):
            (torch.nn.functional.linear(torch.randn(2, 3), linear.weight) * temperature).pow(2).sum().backward()
            optimizer.step()
            rec.log(loss=0.0)
            held.append(temperature.detach().clone())
            optimizer.zero_grad()
    stream = tmp_path / "run" / "stream" / "stream.h5"
    with h5py.File(stream) as handle:
        assert json.loads(handle.attrs["recorded_params"])["temperature"]["tensors"] == {
            "value": "float32", "grad": "float32", "exp_avg": "float32", "exp_avg_sq": "float32"}
        np.testing.assert_array_equal(read_checked(handle["param_steps"])[1:, 0], np.arange(1, 6))
    values = recorded_rows(stream, "temperature", "value")
    assert values.shape == (6,)
    np.testing.assert_array_equal(values[1:], np.stack([bits(value) for value in held]))


def test_a_step_that_raises_does_not_leave_its_gradient_to_the_next(tmp_path):
    """A closure that raises inside step() (an out-of-memory batch the loop skips): the next step's pre-hook
    acts again, so that step records the gradient it consumed, not the failed step's."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3).to(torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    received, calls = [], []

    def closure():
        optimizer.zero_grad()
        model(torch.randn(2, 3, dtype=torch.bfloat16)).float().pow(2).sum().backward()
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        received.append(model.weight.grad.detach().clone())

    with thimble.Recorder(tmp_path / "run", model, optimizer) as rec:
        for _ in range(5):
            try:
                optimizer.step(closure)
            except RuntimeError:
                continue
            rec.log(loss=0.0)
    rows = recorded_rows(tmp_path / "run" / "stream" / "stream.h5", "weight", "grad")
    assert len(rows) == 5
    for step, grad in enumerate(received, start=1):
        np.testing.assert_array_equal(rows[step], bits(grad))


def test_step_zero_is_the_state_the_first_step_starts_from(tmp_path):
    """A checkpoint loaded after the recorder was made (model and optimizer): step 0 is what step 1 started from,
    with the loaded optimizer state and step count."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randn(2, 3)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    saved_model = {key: value.clone() for key, value in model.state_dict().items()}
    saved_optimizer = copy.deepcopy(optimizer.state_dict())  # load_state_dict shares the tensors it is given
    fresh = torch.nn.Linear(3, 3)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.1)
    with thimble.Recorder(tmp_path / "run", fresh, fresh_optimizer) as rec:
        fresh.load_state_dict(saved_model)
        fresh_optimizer.load_state_dict(copy.deepcopy(saved_optimizer))
        fresh(torch.randn(2, 3)).sum().backward()
        fresh_optimizer.step()
        rec.log(loss=0.0)
    stream = tmp_path / "run" / "stream" / "stream.h5"
    np.testing.assert_array_equal(recorded_rows(stream, "weight", "value")[0], bits(saved_model["weight"]))
    with h5py.File(stream) as handle:
        assert handle.attrs["initial_state"] == "as_found"
        np.testing.assert_array_equal(read_checked(handle["param_steps"])[:, 0], [3, 4])
    np.testing.assert_array_equal(recorded_rows(stream, "weight", "exp_avg")[0],
                                  bits(saved_optimizer["state"][0]["exp_avg"]))


def test_what_the_recorder_refuses_or_warns_inside_the_loop(tmp_path, caplog):
    """A param group added after the recorder attached, a fused optimizer handed scaled gradients by GradScaler:
    refused at that step, naming the fix; a tensor-valued setting is in the table, not the attributes; a loss
    logged before any step is said to be dropped."""
    model = torch.nn.Linear(3, 3)
    extra = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(torch.tensor(0.9), torch.tensor(0.999)))
    rec = thimble.Recorder(tmp_path / "groups", model, optimizer)
    with caplog.at_level("WARNING"):
        rec.log(loss=1.0)
    assert "dropped" in caplog.text
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    optimizer.add_param_group({"params": [extra]})
    with pytest.raises(RecorderError, match="add_param_group"):
        optimizer.step()
    rec.abort()
    assert json.loads((tmp_path / "groups" / "stream" / "recorder.json").read_text())["attrs"]["param_groups"]

    fused = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    rec = thimble.Recorder(tmp_path / "scaled", model, fused)
    scaler.scale(model(torch.ones(1, 3)).sum()).backward()
    with pytest.raises(RecorderError, match=r"scaler.unscale_\(optimizer\)"):
        scaler.step(fused)
    rec.abort()


def test_a_group_whose_parameters_first_step_late_gets_the_optimizers_state_keys(tmp_path):
    """A group without gradients at the first step (its layers unfrozen later): its parameters' state keys are
    another group's, so their moments are recorded once they exist."""
    torch.manual_seed(0)
    body, head = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    model = torch.nn.Sequential(body, head)
    optimizer = torch.optim.AdamW([{"params": body.parameters()}, {"params": head.parameters(), "lr": 0.01}])
    with thimble.Recorder(tmp_path / "run", model, optimizer) as rec:
        for step in range(4):
            model(torch.randn(2, 3)).sum().backward()
            if step < 2:
                head.weight.grad = head.bias.grad = None
            optimizer.step()
            rec.log(loss=0.0)
            optimizer.zero_grad()
    stream = tmp_path / "run" / "stream" / "stream.h5"
    moments = recorded_rows(stream, "1.weight", "exp_avg")
    assert not moments[:3].any() and moments[3:].any()
    np.testing.assert_array_equal(moments[4], bits(optimizer.state[head.weight]["exp_avg"]))


def test_a_step_gradscaler_skips_is_recorded_as_not_stepped_and_replays(tmp_path):
    """A fused AdamW under GradScaler, unscaled before its step as the recorder asks: a step with an inf gradient
    (which the fused kernel skips, leaving weights, moments and step count) is recorded as not stepped, and the
    replay checks it unchanged."""
    from thimble.analysis.replay import replay_recording

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    with thimble.Recorder(tmp_path / "run", model, optimizer) as rec:
        for step in range(4):
            scaler.scale(model(torch.randn(2, 3)).sum()).backward()
            if step == 1:
                model.weight.grad[0, 0] = float("inf")
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
            rec.log(loss=0.0)
            optimizer.zero_grad()
    stream = tmp_path / "run" / "stream"
    with h5py.File(stream / "stream.h5") as handle:
        assert read_checked(handle["param_stepped"])[:, 0].tolist() == [0, 1, 0, 1, 1]
    values = recorded_rows(stream / "stream.h5", "weight", "value")
    np.testing.assert_array_equal(values[2], values[1])
    summary = replay_recording(str(stream), *(str(tmp_path / name) for name in ("r.csv", "r.json", "u.csv")))
    assert summary["bitwise_match"] and summary["skipped_steps"] == 2
