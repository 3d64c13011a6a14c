"""AdamW as the experiments use it: one builder for training and replay, and the freeze criterion.

Training and replay build the optimizer here, with the implementation named
explicitly (``single_tensor``, ``foreach`` or ``fused``), so a recording says
which kernels produced it and the replay calls the same ``step()`` on the
recorded state: exact by construction, whatever the device or torch's kernels.

The freeze criterion answers "does this element move?" from the update as the
optimizer's arithmetic forms it: the float32 sum ``w + value * m / denom`` that
``addcdiv_`` computes before it rounds to bf16 (round to nearest, ties to
even). An element stays put when that sum rounds back to w: when the update is
below half the lattice spacing towards the move, or exactly half and w's last
mantissa bit is even.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from thimble.numerics.bf16 import torch_to_bits
from thimble.numerics.lattice import spacing_toward
from thimble.update_rules import stochastic_rounding_seed

# torchao, imported by the stochastic-rounding rule and by transformers wherever it is installed, warns
# at import about its CUDA-only extensions and Triton, which a CPU host lacks and no rule here uses
for _logger in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_logger).setLevel(logging.ERROR)

IMPLEMENTATIONS = ("single_tensor", "foreach", "fused")


def resolve_implementation(setting: str, device: torch.device) -> str:
    """The implementation ``setting`` means on ``device``; ``auto`` is what torch picks by default there."""
    if setting != "auto":
        return setting
    from torch.optim.optimizer import _default_to_fused_or_foreach

    probe = torch.empty(1, dtype=torch.bfloat16, device=device)
    fused, foreach = _default_to_fused_or_foreach([probe], differentiable=False, use_fused=False)
    return "fused" if fused else "foreach" if foreach else "single_tensor"


def build_adamw(params, hyper: dict, implementation: str) -> torch.optim.AdamW:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown optimizer implementation {implementation!r}; use one of {IMPLEMENTATIONS}")
    return torch.optim.AdamW(params, **hyper, foreach=implementation == "foreach",
                             fused=implementation == "fused")


def replay_steps(w_before: torch.Tensor, m_before: torch.Tensor, v_before: torch.Tensor, grads: torch.Tensor,
                 first_step: int, hyper: dict, implementation: str,
                 out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps ``first_step .. first_step + B - 1`` recomputed by the optimizer's own ``step()``.

    Inputs are (B, ...) bf16 stacks: the recorded state after step t-1 and the gradient of step t.
    Each step is its own parameter (one optimizer, B parameters, each with its own step count),
    loaded through ``load_state_dict`` as a resume would be. Returns W, exp_avg, exp_avg_sq after each step:
    the first B rows of ``out`` when given (buffers reused across blocks: the parameters and moments are
    views of them, which the optimizer updates in place), else new tensors.
    """
    if out is None:
        out = tuple(torch.empty_like(x) for x in (w_before, m_before, v_before))
    w_after, m_after, v_after = (buffer[: len(w_before)] for buffer in out)
    for buffer, before in ((w_after, w_before), (m_after, m_before), (v_after, v_before)):
        buffer.copy_(before)
    params = [torch.nn.Parameter(w) for w in w_after]  # shares w_after's memory
    optimizer = build_adamw(params, hyper, implementation)
    state = optimizer.state_dict()
    state["state"] = {index: {"step": torch.tensor(float(first_step + index - 1), dtype=torch.float32),
                              "exp_avg": m_after[index], "exp_avg_sq": v_after[index]}
                      for index in range(len(params))}
    optimizer.load_state_dict(state)
    for param, grad in zip(params, grads):
        param.grad = grad
    optimizer.step()
    for index, param in enumerate(params):  # the results are where the optimizer wrote: check it kept our views
        state = optimizer.state[param]
        if any(tensor.data_ptr() != buffer[index].data_ptr() for tensor, buffer in
               ((param, w_after), (state["exp_avg"], m_after), (state["exp_avg_sq"], v_after))):
            raise RuntimeError(f"torch {torch.__version__}'s optimizer copied the state the replay loaded into it, "
                               "so the replayed values are not in the replay's buffers; thimble.training.adamw.replay_steps "
                               "needs adapting to this torch version")
    return w_after, m_after, v_after


def pre_rounding_weight(w_before: torch.Tensor, m_after: torch.Tensor, v_after: torch.Tensor, steps: torch.Tensor,
                        hyper: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight ``addcdiv_`` forms before rounding to bf16 (single-tensor and foreach arithmetic).

    ``steps`` (B,) are the step numbers t; m and v are the moments after step t (what the optimizer
    divides). denom is formed in bf16 as torch does (sqrt, / sqrt(bias correction 2), + eps, each
    rounded); the update value * m / denom and the sum with w are in float32, as the CPU kernel
    computes them.
    """
    lr, (beta1, beta2), eps, weight_decay = hyper["lr"], hyper["betas"], hyper["eps"], hyper["weight_decay"]
    w = w_before.mul(1 - lr * weight_decay) if weight_decay != 0 else w_before
    out = torch.empty(w.shape, dtype=torch.float32) if out is None else out[: len(w)]
    for index, step in enumerate(steps.tolist()):
        step = float(step)  # torch keeps the count in a float32 tensor and reads it with .item()
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (v_after[index].sqrt() / bias_correction2_sqrt).add_(eps)
        value = torch.tensor(-(lr / (1 - beta1**step)), dtype=torch.float32)  # the kernel's float scalar
        out[index] = (value * m_after[index].float()) / denom.float() + w[index].float()
    return out


def stays_put(w_before: torch.Tensor, pre_rounding: torch.Tensor) -> torch.Tensor:
    """True where the float32 sum rounds (to nearest, ties to even) back onto w: the element does not move.

    ±0 count as one lattice point, as in ΔW′.
    """
    landed = pre_rounding.to(torch.bfloat16)
    return (landed == w_before) | ((landed == 0) & (w_before == 0))


def update_ratio(w_before: torch.Tensor, pre_rounding: torch.Tensor) -> torch.Tensor:
    """|update| / half the lattice spacing towards the move (float64, exact for float32 and bf16 inputs).

    Below 1 the element stays, above 1 it moves; at exactly 1 rounding goes to the even neighbour.
    The reference form of ``log2_ratio_floor``, for single elements and tests.
    """
    w = w_before.double()
    update = pre_rounding.double() - w
    bits = torch_to_bits(w_before)
    half = spacing_toward(bits, np.where(update.numpy() < 0, -1, 1)) / 2
    return update.abs() / torch.from_numpy(half)


# -- the update rules (thimble.update_rules declares them and what each records) ---------------------------


def torchao_stochastic_rounding_adamw(params, hyper: dict):
    """torchao's ``_AdamW(bf16_stochastic_round=True)``, its per-parameter kernel run eagerly.

    torchao's ``step()`` hands its kernel, ``single_param_adam``, to ``torch.compile`` once per
    parameter per step; on a CPU each such call costs ~1.5 ms of dynamo dispatch (most of a small
    model's step) and the first step ~30 s of compiling. Here the same kernel runs eagerly: torchao's
    arithmetic (float32 AdamW, bf16 moments, ``_fp32_to_bf16_sr``), with the rounding bits drawn by
    ``torch.randint`` from torch's global generator, which the rule seeds before every step.
    """
    return _eager_stochastic_rounding_adamw()(params, **hyper, bf16_stochastic_round=True)


@functools.cache
def _eager_stochastic_rounding_adamw() -> type:
    """The subclass of torchao's ``_AdamW`` whose step runs its kernel eagerly (built once, on first use:
    torchao is imported only by this rule)."""
    from torchao.optim import adam

    class EagerStochasticRoundingAdamW(adam._AdamW):
        @torch.no_grad()
        def step(self, closure=None):
            if closure is not None:
                raise ValueError("the stochastic-rounding AdamW takes no closure")
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if len(state) == 0:  # torchao's state: a float32 step count, moments like p
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = self._new_buffer(p, True)
                        state["exp_avg_sq"] = self._new_buffer(p, False)
                    state["step"] += 1
                    adam.single_param_adam(p.detach(), p.grad, state["step"], state["exp_avg"],
                                           state["exp_avg_sq"], None, group["lr"], group["betas"][0],
                                           group["betas"][1], group["weight_decay"], group["eps"],
                                           self.is_adamw, self.bf16_stochastic_round and p.dtype is torch.bfloat16)

    return EagerStochasticRoundingAdamW


class UpdateRule:
    """One experiment's optimizer behind the interface training and replay use.

    ``step(t)`` applies optimizer step t; ``device_state(param)`` names the state tensors recorded
    with W and grad_W where they live (names as in ``thimble.update_rules.recorded_tensors``), and
    ``recorded_state(param)`` gives CPU copies of them.
    """

    name = ""

    def __init__(self, optimizer, implementation: str):
        self.optimizer, self.implementation = optimizer, implementation

    def step(self, step: int) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def device_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.optimizer.state[param]
        return {"momentum_W": state["exp_avg"], "variance_W": state["exp_avg_sq"]}

    def recorded_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in self.device_state(param).items()}

    def stepped_tensor(self, param: torch.Tensor) -> torch.Tensor:
        """The tensor the optimizer steps for the model's ``param`` (itself, or its master copy)."""
        return param

    def load_recorded_state(self, recorded: dict[str, torch.Tensor], step: int) -> None:
        """Load the state of a one-parameter optimizer from ``recorded`` (the recorded tensors after
        step ``step``), through ``load_state_dict`` as a resume would: the inverse of ``recorded_state``."""
        state = self.state_dict()
        state["state"] = {0: {"step": torch.tensor(float(step)), **_moments(recorded)}}
        self.load_state_dict(state)


def _moments(recorded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"exp_avg": recorded["momentum_W"].clone(), "exp_avg_sq": recorded["variance_W"].clone()}


class Bf16AdamW(UpdateRule):
    """torch's AdamW on the bf16 parameters: the seed's rule."""

    name = "bf16"


class StochasticRoundingAdamW(UpdateRule):
    """torchao's AdamW with bf16 stochastic rounding of the weight update.

    The rounding bits come from torch's global generator, seeded from (training.seed, t) just
    before step t; the recorded parameter is stepped first, so a replay of step t draws the same bits.
    """

    name = "stochastic_rounding"

    def __init__(self, params, hyper: dict, seed: int):
        super().__init__(torchao_stochastic_rounding_adamw(params, hyper), "torchao_eager")
        self.seed = seed

    def step(self, step: int) -> None:
        torch.manual_seed(stochastic_rounding_seed(self.seed, step))
        self.optimizer.step()


class KahanAdamW(UpdateRule):
    """torch-optimi's AdamW with Kahan-compensated bf16 updates (``kahan_sum=True``)."""

    name = "kahan"

    def __init__(self, params, hyper: dict, implementation: str):
        import optimi

        # optimi's for-loop on the CPU by default: it deprecates foreach in favour of Triton (GPU only)
        implementation = "single_tensor" if implementation == "auto" else implementation
        optimizer = optimi.AdamW(params, lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"],
                                 weight_decay=hyper["weight_decay"], kahan_sum=True,
                                 foreach=implementation == "foreach", triton=False)
        super().__init__(optimizer, implementation)

    def device_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**super().device_state(param), "kahan_compensation_W": self.optimizer.state[param]["kahan_comp"]}

    def load_recorded_state(self, recorded: dict[str, torch.Tensor], step: int) -> None:
        # optimi counts steps per parameter group, as an int32 tensor, once the group is set up
        state = self.state_dict()
        state["state"] = {0: {**_moments(recorded), "kahan_comp": recorded["kahan_compensation_W"].clone()}}
        state["param_groups"][0].update(setup=True, step=torch.tensor(step, dtype=torch.int32))
        self.load_state_dict(state)


class Fp32MasterAdamW(UpdateRule):
    """torch's AdamW on float32 master copies of the parameters; the model holds their bf16 rounding.

    Each step: the bf16 gradients are widened (exactly) onto the masters, AdamW steps the
    masters and its float32 moments, and each bf16 parameter becomes its master rounded to
    nearest (ties to even).
    """

    name = "fp32_master"

    def __init__(self, params, hyper: dict, implementation: str, device: torch.device):
        self.params = list(params)
        self.masters = [torch.nn.Parameter(param.detach().to(torch.float32, copy=True)) for param in self.params]
        implementation = resolve_implementation(implementation, device) if implementation == "auto" else implementation
        super().__init__(build_adamw(self.masters, hyper, implementation), implementation)
        self._master_of = {id(param): master for param, master in zip(self.params, self.masters)}

    @torch.no_grad()
    def step(self, step: int) -> None:
        for param, master in zip(self.params, self.masters):
            master.grad = None if param.grad is None else param.grad.to(torch.float32)
        self.optimizer.step()
        for param, master in zip(self.params, self.masters):
            param.copy_(master)

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None
        self.optimizer.zero_grad()

    def state_dict(self) -> dict:
        return {"masters": [master.detach().clone() for master in self.masters],
                "adamw": self.optimizer.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for master, saved in zip(self.masters, state["masters"]):
            master.copy_(saved)
        self.optimizer.load_state_dict(state["adamw"])

    def stepped_tensor(self, param: torch.Tensor) -> torch.Tensor:
        return self._master_of[id(param)]

    def device_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        master = self._master_of[id(param)]
        return {**super().device_state(master), "master_W": master.detach()}

    def load_recorded_state(self, recorded: dict[str, torch.Tensor], step: int) -> None:
        state = self.state_dict()
        state["masters"] = [recorded["master_W"].clone()]
        state["adamw"]["state"] = {0: {"step": torch.tensor(float(step)), **_moments(recorded)}}
        self.load_state_dict(state)


def build_update_rule(rule: str, params, hyper: dict, implementation: str, device: torch.device,
                      seed: int) -> UpdateRule:
    """The optimizer of ``training.update_rule`` over ``params`` (the recorded parameter first).

    ``implementation`` is ``training.optimizer_impl``; the rule reports the one it resolved to.
    """
    params = list(params)
    if rule == "bf16":
        implementation = resolve_implementation(implementation, device)
        return Bf16AdamW(build_adamw(params, hyper, implementation), implementation)
    if rule == "stochastic_rounding":
        return StochasticRoundingAdamW(params, hyper, seed)
    if rule == "kahan":
        return KahanAdamW(params, hyper, implementation)
    if rule == "fp32_master":
        return Fp32MasterAdamW(params, hyper, implementation, device)
    raise ValueError(f"unknown training.update_rule {rule!r}")


def replay_rule_step(rule: str, before: dict[str, torch.Tensor], grad: torch.Tensor, step: int, hyper: dict,
                     implementation: str, seed: int,
                     stepped_before: tuple[tuple[int, ...], ...] = ()) -> dict[str, torch.Tensor]:
    """Optimizer step ``step`` of one recorded parameter, recomputed by the rule's own ``step()``.

    ``before``: the recorded tensors after step t-1 (W and the rule's state, names as recorded);
    ``grad``: the recorded gradient of step t. Returns the tensors after step t, W included.
    The optimizer is built afresh and its state loaded through ``load_state_dict``, as a resume would.

    ``stepped_before`` (stochastic rounding only): the shapes of the parameters that training's optimizer
    stepped before this one (``model.parameters()`` order). Each drew its rounding bits from the generator the
    step seeded, so the replay draws and discards as many, each as torchao draws it for that shape, before
    stepping this parameter: it then draws the bits this parameter was rounded with.
    """
    param = torch.nn.Parameter(before["W"].clone())
    device = before["W"].device
    optimizer = build_update_rule(rule, [param], hyper, implementation, device, seed)
    optimizer.load_recorded_state(before, step - 1)
    param.grad = grad.clone()
    if not stepped_before:
        optimizer.step(step)
    elif rule != "stochastic_rounding":
        raise ValueError(f"update rule {rule} draws no random bits: no parameter's bits to draw before this one")
    else:
        from torchao.optim.adam import _fp32_to_bf16_sr

        torch.manual_seed(stochastic_rounding_seed(seed, step))
        for shape in stepped_before:  # the rounding function itself, so its draws are torchao's whatever its version
            _fp32_to_bf16_sr(torch.zeros(shape, dtype=torch.float32, device=device))
        optimizer.optimizer.step()  # the rule's step less its seeding, done above
    return {"W": param.detach().clone(), **optimizer.recorded_state(param)}
