"""The recorder inside loops that were not written for thimble: transformers' ``Trainer`` (a small Llama in bf16,
linear warm-up, weight decay, gradient clipping, gradient accumulation) and Lightning's ``Trainer`` (automatic
optimization, whose closure runs the forward and backward inside ``optimizer.step()``).

Each test copies, inside the loop, what the loop held after every optimizer step (each parameter's value,
gradient and optimizer state), and checks that the recording holds those bits at every step; and replays every
recorded step with torch's own optimizer from the recorded state, gradient and hyperparameters, which gives the
recorded value and state bit for bit only if the recorded gradient is the one the step consumed."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.optim.optimizer as torch_optimizer
from conftest import REPO

from thimble.record.format import RecordLayout, list_segments, read_checked
from thimble.record.reader import RecordedTensor
from thimble.record.recorder import RUN_FILE, close_partial
from thimble.record.stream_reader import open_stream

#: Hamlet's first act: its UTF-8 bytes are the tokens (a vocabulary of 256), so no tokenizer is trained
SHAKESPEARE = REPO / "tests/data/shakespeare_mini/hamlet_gut.txt"
SEQ_LEN = 16


def shakespeare_tokens() -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(SHAKESPEARE.read_bytes(), dtype=np.uint8).astype(np.int64))


def bits_of(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's bits as numpy unsigned integers of its width (bf16/f16 -> uint16, f32 -> uint32)."""
    tensor = tensor.detach().to("cpu").contiguous()
    signed = {2: torch.int16, 4: torch.int32}[tensor.element_size()]
    return tensor.view(signed).numpy().view(f"u{tensor.element_size()}").copy()


def held_tensors(model, optimizer) -> dict[str, dict[str, np.ndarray]]:
    """What the loop holds now: each parameter's value, gradient and optimizer state tensors, as bits."""
    held = {}
    for name, param in model.named_parameters():
        state = optimizer.state.get(param, {})
        held[name] = {"value": bits_of(param), "grad": bits_of(param.grad),
                      **{key: bits_of(value) for key, value in state.items()
                         if torch.is_tensor(value) and value.shape == param.shape}}
    return held


def assert_recording_holds(handle, at_attach: dict, after_steps: list[dict]) -> None:
    """The recording's steps 0..T are the values at attach (gradient and state zero) and the tensors held after
    each of the T optimizer steps, bit for bit."""
    layout = RecordLayout.of_file(handle)
    assert list(layout.params) == list(at_attach)
    for name, entry in layout.params.items():
        assert set(entry.paths) == set(after_steps[0][name]), name
        for key, path in entry.paths.items():
            recorded = RecordedTensor.of_recording(handle, path).bits(0, len(after_steps) + 1)
            zero = at_attach[name] if key == "value" else np.zeros_like(after_steps[0][name][key])
            expected = np.stack([zero, *[held[name][key] for held in after_steps]])
            for step in range(len(recorded)):
                assert np.array_equal(recorded[step], expected[step]), f"{path} differs at step {step}"


def assert_torch_replays(handle) -> None:
    """Every recorded step replayed with the recorded optimizer class (torch's AdamW here) on the recorded value,
    state and step count of the step before, the step's recorded gradient and its param group's recorded
    hyperparameters gives the recorded value and state after it, bit for bit."""
    attrs = handle.attrs
    assert attrs["optimizer_class"] == "torch.optim.adamw.AdamW"
    columns = json.loads(attrs["hyperparameter_columns"])
    groups = json.loads(attrs["param_groups"])
    group_of = {name: index for index, group in enumerate(groups) for name in group["params"]}
    hyper = read_checked(handle["hyperparameters"])
    steps = read_checked(handle["param_steps"])
    names = json.loads(attrs["param_names"])
    layout = RecordLayout.of_file(handle)
    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32}

    def rows(path):
        bits = RecordedTensor.of_recording(handle, path).bits()
        tensor = torch.from_numpy(bits.view(f"i{bits.dtype.itemsize}"))
        return tensor.view(dtypes[layout.dtype_of(path)])

    for index, name in enumerate(names):
        entry = layout.params[name]
        group = groups[group_of[name]]
        implementation = group["implementation"]
        value, grad = rows(entry.paths["value"]), rows(entry.paths["grad"])
        moments = {key: rows(entry.paths[key]) for key in ("exp_avg", "exp_avg_sq")}
        for step in range(1, len(value)):
            setting = dict(zip(columns, hyper[step, group_of[name]]))
            param = torch.nn.Parameter(value[step - 1].clone())
            param.grad = grad[step].clone()
            optimizer = torch.optim.AdamW([param], lr=setting["lr"], betas=(setting["betas.0"], setting["betas.1"]),
                                          eps=setting["eps"], weight_decay=setting["weight_decay"],
                                          foreach=implementation == "foreach",
                                          fused=True if implementation == "fused" else None)
            if not math.isnan(steps[step - 1, index]):
                optimizer.state[param] = {"step": torch.tensor(steps[step - 1, index], dtype=torch.float32),
                                          **{key: moment[step - 1].clone() for key, moment in moments.items()}}
            optimizer.step()
            assert steps[step, index] == (1 if step == 1 else steps[step - 1, index] + 1)
            assert torch.equal(bits_tensor(param), bits_tensor(value[step])), f"{name} value at step {step}"
            for key, moment in moments.items():
                assert torch.equal(bits_tensor(optimizer.state[param][key]), bits_tensor(moment[step])), \
                    f"{name} {key} at step {step}"


def bits_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().view({2: torch.int16, 4: torch.int32}[tensor.element_size()])


def global_grad_norms(handle) -> np.ndarray:
    """Each recorded step's gradient norm over every recorded parameter, in float64."""
    layout = RecordLayout.of_file(handle)
    squares = 0.0
    for entry in layout.params.values():
        tensor = RecordedTensor.of_recording(handle, entry.paths["grad"])
        values = tensor.bits().view(tensor.dtype).astype(np.float64)
        squares = squares + (values.reshape(len(values), -1) ** 2).sum(axis=1)
    return np.sqrt(squares)


# -- transformers' Trainer ----------------------------------------------------------------------------

HF_STEPS, HF_WARMUP, HF_LR = 12, 4, 3e-3


def llama_trainer(output_dir, callbacks, max_steps=HF_STEPS):
    """transformers' Trainer on a small Llama in bf16, trained on Hamlet's bytes: a linear warm-up and decay,
    weight decay 0.1, clipping at 1.0, two micro-batches per optimizer step."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    tokens = shakespeare_tokens()
    windows = [{"input_ids": tokens[i * SEQ_LEN:(i + 1) * SEQ_LEN], "labels": tokens[i * SEQ_LEN:(i + 1) * SEQ_LEN]}
               for i in range(96)]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=SEQ_LEN)).to(torch.bfloat16)
    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=HF_LR, lr_scheduler_type="linear",
                             warmup_steps=HF_WARMUP, weight_decay=0.1, max_grad_norm=1.0, use_cpu=True, report_to=[],
                             save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    return Trainer(model=model, args=args, train_dataset=windows, callbacks=callbacks), tokens


def hf_copier():
    """A plain TrainerCallback that copies what the loop holds after each optimizer step (``on_optimizer_step``
    comes right after ``optimizer.step()``, before the gradients are zeroed) and what Trainer logs."""
    from transformers import TrainerCallback

    class Copier(TrainerCallback):
        def __init__(self):
            self.at_begin, self.after_steps, self.logs = None, [], {}

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.at_begin = {name: bits_of(param) for name, param in model.named_parameters()}

        def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.after_steps.append(held_tensors(model, optimizer.optimizer))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                self.logs[state.global_step] = logs

    return Copier()


def linear_warmup(step: int) -> float:
    """transformers' linear schedule with warm-up, as LambdaLR sets the lr for optimizer step ``step + 1``."""
    if step < HF_WARMUP:
        return float(step) / float(max(1, HF_WARMUP))
    return max(0.0, float(HF_STEPS - step) / float(max(1, HF_STEPS - HF_WARMUP)))


def test_a_transformers_trainer_run_is_recorded_bit_for_bit(tmp_path):
    import thimble.hf

    tokens = shakespeare_tokens()
    dead = np.ones(256, dtype=bool)
    dead[np.unique(tokens.numpy())] = False
    recording = thimble.hf.RecorderCallback(tmp_path / "llama", tensors="*", token_groups={"dead": dead},
                                            segment_steps=5)
    copier = hf_copier()
    trainer, _ = llama_trainer(tmp_path / "out", [recording, copier])
    trainer.train()

    with open_stream(tmp_path / "llama" / "stream") as handle:
        names = json.loads(handle.attrs["param_names"])
        assert names == [name for name, _ in trainer.model.named_parameters()]  # tensors="*": all 21
        assert handle.attrs["recorded_by"] == "thimble.Recorder" and handle.attrs["experiment"] == "llama"
        assert handle.attrs["optimizer_class"] == "torch.optim.adamw.AdamW"  # the inner optimizer, not accelerate's
        assert handle.attrs["initial_state"] == "empty"
        assert "accelerate_version" in handle.attrs and "transformers_version" in handle.attrs
        assert json.loads(handle.attrs["param_dtypes"])["model.embed_tokens.weight"] == "bfloat16"
        assert len(copier.after_steps) == HF_STEPS == len(handle["losses"]) - 1  # one row per optimizer step
        assert_recording_holds(handle, copier.at_begin, copier.after_steps)
        assert_torch_replays(handle)

        # the schedule: step t used the lr LambdaLR set after t-1 scheduler steps; step 0 is the attach, before
        # step 1 (lr 0 at the start of the warm-up)
        columns = json.loads(handle.attrs["hyperparameter_columns"])
        hyper = read_checked(handle["hyperparameters"])
        lr = hyper[:, :, columns.index("lr")]
        expected = [HF_LR * linear_warmup(max(step - 1, 0)) for step in range(HF_STEPS + 1)]
        assert lr[:, 0].tolist() == expected and lr[:, 1].tolist() == expected
        assert [float(copier.logs[step]["learning_rate"]) for step in range(1, HF_STEPS + 1)] == expected[1:]
        # Trainer's two groups: decay 0.1 on the weights, none on the norms
        groups = json.loads(handle.attrs["param_groups"])
        assert hyper[:, 0, columns.index("weight_decay")].tolist() == [0.1] * (HF_STEPS + 1)
        assert hyper[:, 1, columns.index("weight_decay")].tolist() == [0.0] * (HF_STEPS + 1)
        assert all("norm" in name for name in groups[1]["params"]) and "model.norm.weight" in groups[1]["params"]

        # clipping: Trainer logs each step's norm before clipping (above 1 at every step of this run); the
        # recorded gradients are the clipped ones (1 up to bf16's rounding of the scaled gradients)
        before = np.array([copier.logs[step]["grad_norm"] for step in range(1, HF_STEPS + 1)])
        assert (before > 1.02).all()
        after = global_grad_norms(handle)[1:]
        assert np.abs(after - 1.0).max() < 0.01, after

        # the losses: each step's as Trainer logged it (logging_steps=1), NaN at step 0
        losses = read_checked(handle["losses"])
        assert math.isnan(losses[0])
        assert losses[1:].tolist() == [np.float32(copier.logs[step]["loss"]) for step in range(1, HF_STEPS + 1)]

        # token groups over the embedding's rows: the bytes Hamlet never uses
        assert handle.attrs["token_groups_param"] == "model.embed_tokens.weight"
        assert np.array_equal(handle["dead_mask"][...], dead) and 0 < dead.sum() < 256


def test_a_transformers_trainer_that_raises_leaves_a_partial_recording(tmp_path):
    from transformers import TrainerCallback

    import thimble.hf

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 10:
                raise RuntimeError("killed at step 10")

    recording = thimble.hf.RecorderCallback(tmp_path / "llama", tensors="*", segment_steps=4)
    copier = hf_copier()
    trainer, _ = llama_trainer(tmp_path / "out", [recording, copier, Crash()])
    with pytest.raises(RuntimeError, match="killed at step 10"), recording:
        trainer.train()

    directory = tmp_path / "llama" / "stream"
    assert not (directory / "stream.h5").exists()
    # every step made before the raise is written, the last segment ending at step 10
    assert [(first, last) for first, last, _ in list_segments(directory)] == [(0, 3), (4, 7), (8, 10)]
    assert not recording.recorder.optimizer._optimizer_step_pre_hooks  # the recorder let go of the optimizer
    with pytest.raises(Exception, match="does not exist"):
        open_stream(directory)
    close_partial(tmp_path / "llama")
    with open_stream(directory) as handle:
        assert bool(handle.attrs["interrupted"]) and len(handle["losses"]) == 11
        assert_recording_holds(handle, copier.at_begin, copier.after_steps[:10])


@pytest.mark.parametrize("hooks", ["torch's", "snapshot"])
def test_the_first_step_is_recorded_whether_or_not_torch_runs_hooks_added_during_its_pre_hooks(
        tmp_path, monkeypatch, hooks):
    """The callback creates the recorder inside torch's global pre-hook of the first step. torch (today) runs the
    pre-hook the recorder then registers in the same call; a torch that took its hooks before running them would
    not. Either way step 1 is recorded whole, with the implementation the step ran."""
    from transformers import TrainerState

    import thimble.hf

    if hooks == "snapshot":
        import itertools

        monkeypatch.setattr(torch_optimizer, "chain",
                            lambda *hooks: itertools.chain(*[list(group) for group in hooks]))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 4), torch.nn.Linear(4, 20)).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    recording = thimble.hf.RecorderCallback(tmp_path / "run", tensors="*")
    recording.on_train_begin(None, TrainerState(), None, model=model)
    at_begin = {name: bits_of(param) for name, param in model.named_parameters()}
    ids = torch.arange(20)
    torch.nn.functional.cross_entropy(model(ids).float(), ids.roll(1)).backward()
    optimizer.step()
    recording.on_optimizer_step(None, TrainerState(), None)
    held = held_tensors(model, optimizer)
    scheduler.step()
    recording.on_train_end(None, TrainerState(), None)

    assert recording.recorder.optimizer is optimizer
    hooks = torch_optimizer._global_optimizer_pre_hooks.values()
    assert recording._attach_at_first_step not in list(hooks)  # the global hook is gone
    run = json.loads((tmp_path / "run" / "stream" / RUN_FILE).read_text())  # written at the first step
    assert [group["implementation"] for group in json.loads(run["attrs"]["param_groups"])] == ["single_tensor"]
    with open_stream(tmp_path / "run" / "stream") as handle:
        assert handle.attrs["optimizer_impl"] == "single_tensor"
        assert_recording_holds(handle, at_begin, [held])
        assert read_checked(handle["hyperparameters"])[:, 0, 0].tolist() == [1e-2, 1e-2]


def test_what_the_recorder_cannot_record_is_said_at_the_start_or_at_the_first_step(tmp_path):
    from transformers import TrainerState

    import thimble.hf
    from thimble.record.recorder import RecorderError

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 4), torch.nn.Linear(4, 20))
    with pytest.raises(RecorderError, match="'blocks.*' names no parameter"):
        thimble.hf.RecorderCallback(tmp_path / "run", tensors=["blocks.*"]).on_train_begin(
            None, TrainerState(), None, model=model)
    (tmp_path / "done" / "stream").mkdir(parents=True)
    (tmp_path / "done" / "stream" / "stream.h5").touch()
    with pytest.raises(RecorderError, match="already holds a recording"):
        thimble.hf.RecorderCallback(tmp_path / "done").on_train_begin(None, TrainerState(), None, model=model)

    # the optimizer steps the head alone (the embedding frozen): recording the embedding fails at its first step
    optimizer = torch.optim.SGD(model[1].parameters(), lr=0.1)
    recording = thimble.hf.RecorderCallback(tmp_path / "run", tensors=["0.weight", "1.*"])
    recording.on_train_begin(None, TrainerState(), None, model=model)
    model(torch.arange(20)).sum().backward()
    with pytest.raises(RecorderError, match=r"does not step 0\.weight"), recording:
        optimizer.step()
    optimizer.step()  # the hook let go
    assert recording.recorder is None and recording._hook is None
    assert recording._attach_at_first_step not in list(torch_optimizer._global_optimizer_pre_hooks.values())


# -- Lightning's Trainer ------------------------------------------------------------------------------

PL_STEPS, PL_WARMUP, PL_LR, PL_CLIP = 10, 3, 2e-2, 0.5


def lightning_module(crash=None):
    """A small LightningModule in fp32 (an embedding, LayerNorm and a linear head: each byte's next byte), AdamW
    with weight decay 0.1 under a warm-up then linear decay stepped every optimizer step. ``crash(batch_idx)``
    runs at the start of each training step."""
    import lightning.pytorch as pl

    class NextByte(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(256, 16)
            self.norm = torch.nn.LayerNorm(16)
            self.head = torch.nn.Linear(16, 256)

        def training_step(self, batch, batch_idx):
            if crash is not None:
                crash(batch_idx)
            inputs, targets = batch
            logits = self.head(self.norm(self.embed(inputs)))
            return torch.nn.functional.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=PL_LR, weight_decay=0.1)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, pl_schedule)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    torch.manual_seed(0)
    return NextByte()


def pl_schedule(step: int) -> float:
    return (step + 1) / PL_WARMUP if step < PL_WARMUP else max(0.0, (PL_STEPS - step) / (PL_STEPS - PL_WARMUP))


def lightning_fit(module, callbacks, max_steps=PL_STEPS, accumulate=2):
    """Lightning's Trainer on the CPU, clipping the gradient norm at ``PL_CLIP`` (this run's norms lie around
    it), ``accumulate`` batches per optimizer step."""
    import lightning.pytorch as pl

    tokens = shakespeare_tokens()
    windows = tokens[:192 * (SEQ_LEN + 1)].view(192, SEQ_LEN + 1)  # 24 batches: one epoch
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(windows[:, :-1], windows[:, 1:]),
                                       batch_size=8)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=PL_CLIP,
                         accumulate_grad_batches=accumulate, callbacks=callbacks)
    trainer.fit(module, data)
    return trainer


def pl_copier():
    """A plain Lightning callback that copies what the loop holds after each optimizer step (at the end of the
    batch that made it: Lightning zeroes the gradients at the start of the next step's closure), the gradients'
    norm before clipping (``on_before_optimizer_step`` comes before Lightning clips) and the batches' losses."""
    import lightning.pytorch as pl

    class Copier(pl.Callback):
        def __init__(self):
            self.at_start, self.after_steps, self.norms_before, self.losses = None, [], [], []

        def on_train_start(self, trainer, pl_module):
            self.at_start = {name: bits_of(param) for name, param in pl_module.named_parameters()}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [param.grad.double() for param in pl_module.parameters()]
            self.norms_before.append(float(torch.sqrt(sum((grad ** 2).sum() for grad in grads))))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(outputs["loss"])
            if trainer.global_step > len(self.after_steps):
                self.after_steps.append(held_tensors(pl_module, trainer.optimizers[0]))

    return Copier()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_lightning_run_is_recorded_bit_for_bit_with_the_gradient_its_closure_made(tmp_path, accumulate):
    """With one batch a step, the whole forward and backward run inside step(): no gradient exists when the
    first step begins; with two, the first batch's backward runs before it."""
    import thimble.lightning

    copier = pl_copier()
    module = lightning_module()
    lightning_fit(module, [thimble.lightning.RecorderCallback(tmp_path / "next_byte", tensors="*",
                                                              segment_steps=4), copier], accumulate=accumulate)

    with open_stream(tmp_path / "next_byte" / "stream") as handle:
        assert json.loads(handle.attrs["param_names"]) == ["embed.weight", "norm.weight", "norm.bias", "head.weight",
                                                          "head.bias"]
        assert handle.attrs["optimizer_class"] == "torch.optim.adamw.AdamW"
        # decided over the parameters, not over the gradients the closure had not made yet at the first step
        assert handle.attrs["optimizer_impl"] == "single_tensor"
        assert "lightning_version" in handle.attrs
        assert len(copier.after_steps) == PL_STEPS == len(handle["losses"]) - 1
        assert_recording_holds(handle, copier.at_start, copier.after_steps)
        # the gradient the step consumed: the one the closure made inside step(), clipped where its norm was
        # above PL_CLIP (at some steps of this run, not at others)
        assert_torch_replays(handle)
        after = global_grad_norms(handle)[1:]
        before = np.array(copier.norms_before)
        clipped = before > PL_CLIP
        assert clipped.any() and not clipped.all(), before
        assert np.abs(after[clipped] / PL_CLIP - 1.0).max() < 1e-5, after
        assert np.abs(after[~clipped] / before[~clipped] - 1.0).max() < 1e-6, (before, after)

        columns = json.loads(handle.attrs["hyperparameter_columns"])
        hyper = read_checked(handle["hyperparameters"])
        expected = [PL_LR * pl_schedule(max(step - 1, 0)) for step in range(PL_STEPS + 1)]
        assert hyper[:, 0, columns.index("lr")].tolist() == expected
        assert hyper[:, 0, columns.index("weight_decay")].tolist() == [0.1] * (PL_STEPS + 1)
        # each step's loss: its batches' losses as Lightning backpropagated them (each divided by their number),
        # added
        losses = read_checked(handle["losses"])
        assert len(copier.losses) == PL_STEPS * accumulate
        steps = [sum(float(loss) for loss in copier.losses[step * accumulate:(step + 1) * accumulate])
                 for step in range(PL_STEPS)]
        assert math.isnan(losses[0])
        assert np.array_equal(losses[1:], np.array(steps, dtype=np.float32))


def test_a_lightning_run_that_raises_leaves_a_partial_recording(tmp_path):
    import thimble.lightning

    def crash(batch_idx):
        # batch 19 is step 10's second batch: inside step 10, before it updates anything
        if batch_idx == 19:
            raise RuntimeError("killed in step 10")

    copier = pl_copier()
    recording = thimble.lightning.RecorderCallback(tmp_path / "next_byte", tensors="*", segment_steps=4)
    with pytest.raises(RuntimeError, match="killed in step 10"):
        lightning_fit(lightning_module(crash), [recording, copier], max_steps=12)

    directory = tmp_path / "next_byte" / "stream"
    assert not (directory / "stream.h5").exists()
    # steps 0..9, each whole; step 10 never happened
    assert [(first, last) for first, last, _ in list_segments(directory)] == [(0, 3), (4, 7), (8, 9)]
    assert not recording.recorder.optimizer._optimizer_step_pre_hooks  # on_exception stopped the recorder
    close_partial(tmp_path / "next_byte")
    with open_stream(directory) as handle:
        assert bool(handle.attrs["interrupted"]) and len(handle["losses"]) == 10
        assert_recording_holds(handle, copier.at_start, copier.after_steps[:9])


@pytest.mark.parametrize("module, extra", [("thimble.hf", "hf"), ("thimble.lightning", "lightning")])
def test_without_the_extra_the_import_says_what_to_install(module, extra):
    # the library made unimportable, as where the extra is not installed
    blocked = {"thimble.hf": "transformers", "thimble.lightning": "lightning"}[module]
    code = f"import sys; sys.modules[{blocked!r}] = None\nimport {module}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert f"pip install thimble[{extra}]" in result.stderr.splitlines()[-1], result.stderr
