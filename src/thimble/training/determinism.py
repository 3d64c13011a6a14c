"""Determinism verified, not assumed: the training session's first steps run twice and must agree bit for bit.

``training.determinism_check_steps`` = K: before recording anything, a session runs its first K steps
(from step 0, or from the checkpoint it resumes), keeps what they would record (W, grad_W, the update
rule's state, the loss) and the model's and optimizer's whole state after them, puts everything back
(model, optimizer, data order, torch's generators) and trains again. The second pass is the recorded
run; each of its first K steps is compared with the first pass before any of them is recorded, and a
difference raises ``DeterminismError`` naming the step, the tensors and how many elements differ.

Also here: the embedding lookups' backward on MPS. MPS scatters a lookup's gradient into the table with
atomic adds, whose order varies from run to run (pytorch/pytorch#195404); ``LookupBackwardOnCpu``
computes that backward with the CPU's kernel instead (the gradient of the lookup output goes to the CPU,
~2 MB a step at thimble_7 size, and the table's gradient comes back). It is a plain ``nn.Embedding``
otherwise, so it can be selected on the CPU, where it gives the stock kernel's bits (tests hold them equal).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from thimble.errors import ThimbleError


class DeterminismError(ThimbleError):
    """Training re-executed from the same state gave other bits: the run would not be reproducible."""


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as integers of the same width (so that -0.0 != 0.0 and NaNs compare by payload)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    tensor = tensor.detach().to("cpu").contiguous()
    return tensor.view(ints[tensor.element_size()]) if tensor.is_floating_point() else tensor


def flatten_state(state, prefix: str = "") -> dict:
    """A nested state (dicts, lists, tensors, numbers) as ``{path: leaf}``."""
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return {prefix or "(value)": state}
    flat: dict = {}
    for key, value in items:
        flat.update(flatten_state(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def differences(reference: dict, repeat: dict) -> tuple[dict[str, tuple[int, int]], int]:
    """``({name: (differing elements, elements)} for the names that differ, elements compared)``, bitwise.

    A name present on one side only, or a leaf of another shape or kind, counts all its elements as differing.
    """
    differing, compared = {}, 0
    for name in sorted(set(reference) | set(repeat), key=str):
        old, new = reference.get(name), repeat.get(name)
        if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
            total = old.numel()
            if old.shape != new.shape or old.dtype != new.dtype:
                count = max(total, new.numel())
            else:
                count = int((_bits(old) != _bits(new)).sum())
        else:
            total = 1
            same = (type(old) is type(new)
                    and (struct.pack("<d", old) == struct.pack("<d", new) if isinstance(old, float) else old == new))
            count = 0 if same else 1
        compared += total
        if count:
            differing[name] = (count, total)
    return differing, compared


@dataclass
class StepBits:
    """What one training step records: its tensors (host copies) and its loss (a float, or on a GPU the
    ``thimble.training.host_copy.HostStep`` whose copies are still running; the recorder waits for them)."""

    step: int
    tensors: dict[str, torch.Tensor]
    loss: float
    #: the step's rows of the recording's per-step tables (``thimble.record.optimizer_tables``)
    tables: dict = field(default_factory=dict)

    def leaves(self) -> dict:
        return {**self.tensors, "loss": self.loss}


@dataclass
class DeterminismCheck:
    """One session's check: the first pass's steps and final state, then the second pass compared with them."""

    device: str
    first_step: int
    steps: int  # re-executed this session: training.determinism_check_steps, or fewer when fewer remain
    requested: int  # training.determinism_check_steps
    reference: list[StepBits] = field(default_factory=list)
    reference_state: dict | None = None
    compared_steps: list[int] = field(default_factory=list)
    elements_compared: int = 0
    seconds: float = 0.0  # the first pass's time (the second is the recorded run's)

    @property
    def last_step(self) -> int:
        return self.first_step + self.steps - 1

    def covers(self, step: int) -> bool:
        return self.first_step <= step <= self.last_step

    def compare_step(self, repeat: StepBits) -> None:
        reference = self.reference[repeat.step - self.first_step]
        assert reference.step == repeat.step
        differing, compared = differences(reference.leaves(), repeat.leaves())
        self._account(repeat.step, differing, compared, "")
        self.compared_steps.append(repeat.step)

    def compare_state(self, step: int, state: dict) -> None:
        """The model's and optimizer's whole state after the last checked step (the parameters W is not)."""
        differing, compared = differences(flatten_state(self.reference_state), flatten_state(state))
        self._account(step, differing, compared, " (the model's and optimizer's state after it)")

    def _account(self, step: int, differing: dict, compared: int, what: str) -> None:
        self.elements_compared += compared
        if differing:
            listed = "; ".join(f"{name}: {count} of {total} elements" for name, (count, total) in differing.items())
            raise DeterminismError(
                f"training is not deterministic on {self.device}: step {step}{what}, re-executed from the same "
                f"state, gave other bits ({listed}), so a second run would not reproduce the recording and "
                "nothing was recorded. Train on a device whose kernels are deterministic (training.device: cpu "
                "is, at a fixed training.math_threads), or another torch version; "
                "training.determinism_check_steps: 0 records without this check (the recording's "
                "determinism_check attribute then says so)")

    def result(self) -> dict:
        return {"device": self.device, "steps_requested": self.requested, "steps": self.compared_steps,
                "elements_compared": self.elements_compared, "result": "identical" if self.compared_steps else "not checked"}


def determinism_attr(sessions: list[dict]) -> str:
    """The recording's ``determinism_check`` attribute (JSON): every training session's check, summed up.

    ``result`` is ``bitwise identical`` when every session compared at least one step (a mismatch never
    reaches a recording), ``partly checked`` when some session compared none, ``not checked`` when none did.
    """
    checked = [session for session in sessions if session["steps"]]
    result = ("not checked" if not checked else "bitwise identical" if len(checked) == len(sessions)
              else "partly checked")
    return json.dumps({
        "result": result,
        "device": ", ".join(dict.fromkeys(session["device"] for session in sessions)),
        "steps_compared": [step for session in sessions for step in session["steps"]],
        "elements_compared": sum(session["elements_compared"] for session in sessions),
        "sessions": sessions,
    }, sort_keys=True)


# -- the embedding lookups' backward --------------------------------------------------------------

class _EmbeddingBackwardOnCpu(torch.autograd.Function):
    """``F.embedding`` whose backward is the CPU's ``embedding_backward``: no atomic adds on the device."""

    @staticmethod
    def forward(ctx, indices: torch.Tensor, weight: torch.Tensor, padding_idx: int) -> torch.Tensor:
        ctx.save_for_backward(indices)
        ctx.num_weights, ctx.padding_idx = weight.shape[0], padding_idx
        return F.embedding(indices, weight, None if padding_idx < 0 else padding_idx)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (indices,) = ctx.saved_tensors
        # autograd's own formula for F.embedding's weight (derivatives.yaml), on the CPU
        grad_weight = torch.ops.aten.embedding_backward(grad_output.to("cpu"), indices.to("cpu"), ctx.num_weights,
                                                        ctx.padding_idx, False, False)
        return None, grad_weight.to(grad_output.device), None


class LookupBackwardOnCpu(nn.Embedding):
    """An ``nn.Embedding`` (same parameter, same forward) whose weight gradient is computed on the CPU."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _EmbeddingBackwardOnCpu.apply(input, self.weight, -1 if self.padding_idx is None else self.padding_idx)


#: the backward a lookup can use besides the device's own ("device")
LOOKUP_BACKWARDS: dict[str, type[nn.Embedding]] = {"cpu": LookupBackwardOnCpu}


def lookup_backward(device: torch.device) -> str:
    """Where the embedding lookups' backward runs: on the CPU for MPS (its scatter is not deterministic),
    else on the device (the CPU's kernel is deterministic; CUDA's is under deterministic algorithms)."""
    return "cpu" if device.type == "mps" else "device"


def use_lookup_backward(model: nn.Module, where: str) -> None:
    """Make every embedding lookup of ``model`` (token and position) use the backward ``where`` names.

    Only the module's class changes: its parameter (tied with the LM head), its forward and the
    state dict stay as they are.
    """
    if where == "device":
        return
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
                raise ThimbleError(f"an embedding with max_norm/scale_grad_by_freq/sparse cannot use the {where} "
                                   "lookup backward")
            module.__class__ = LOOKUP_BACKWARDS[where]
