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

import numpy as np
import torch

IMPLEMENTATIONS = ("single_tensor", "foreach", "fused")


def resolve_implementation(setting: str, device: torch.device) -> str:
    """The implementation ``setting`` means on ``device``; ``auto`` is what torch picks by default there."""
    if setting != "auto":
        return setting
    from torch.optim.optimizer import _default_to_fused_or_foreach

    probe = torch.empty(1, dtype=torch.bfloat16, device=device)
    fused, foreach = _default_to_fused_or_foreach([probe], differentiable=False, use_fused=False)
    return "fused" if fused else "foreach" if foreach else "single_tensor"


def hyperparameters(attrs: dict) -> dict:
    """The optimizer's settings from a recording's attributes (the seed's names)."""
    return {"lr": float(attrs["learning_rate"]), "betas": (float(attrs["adam_beta1"]), float(attrs["adam_beta2"])),
            "eps": float(attrs["adam_epsilon"]), "weight_decay": float(attrs["weight_decay"])}


def build_adamw(params, hyper: dict, implementation: str) -> torch.optim.AdamW:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown optimizer implementation {implementation!r}; use one of {IMPLEMENTATIONS}")
    return torch.optim.AdamW(params, **hyper, foreach=implementation == "foreach",
                             fused=implementation == "fused")


def replay_steps(w_before: torch.Tensor, m_before: torch.Tensor, v_before: torch.Tensor, grads: torch.Tensor,
                 first_step: int, hyper: dict, implementation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps ``first_step .. first_step + B - 1`` recomputed by the optimizer's own ``step()``.

    Inputs are (B, ...) bf16 stacks: the recorded state after step t-1 and the gradient of step t.
    Each step is its own parameter (one optimizer, B parameters, each with its own step count),
    loaded through ``load_state_dict`` as a resume would be. Returns W, exp_avg, exp_avg_sq after each step.
    """
    params = [torch.nn.Parameter(w.clone()) for w in w_before]
    optimizer = build_adamw(params, hyper, implementation)
    state = optimizer.state_dict()
    state["state"] = {index: {"step": torch.tensor(float(first_step + index - 1), dtype=torch.float32),
                              "exp_avg": m_before[index].clone(), "exp_avg_sq": v_before[index].clone()}
                      for index in range(len(params))}
    optimizer.load_state_dict(state)
    for param, grad in zip(params, grads):
        param.grad = grad
    optimizer.step()
    after = [optimizer.state[param] for param in params]
    return (torch.stack([param.detach() for param in params]), torch.stack([s["exp_avg"] for s in after]),
            torch.stack([s["exp_avg_sq"] for s in after]))


def pre_rounding_weight(w_before: torch.Tensor, m_after: torch.Tensor, v_after: torch.Tensor, steps: torch.Tensor,
                        hyper: dict) -> torch.Tensor:
    """The float32 weight ``addcdiv_`` forms before rounding to bf16 (single-tensor and foreach arithmetic).

    ``steps`` (B,) are the step numbers t; m and v are the moments after step t (what the optimizer
    divides). denom is formed in bf16 as torch does (sqrt, / sqrt(bias correction 2), + eps, each
    rounded); the update value * m / denom and the sum with w are in float32, as the CPU kernel
    computes them.
    """
    lr, (beta1, beta2), eps, weight_decay = hyper["lr"], hyper["betas"], hyper["eps"], hyper["weight_decay"]
    w = w_before.mul(1 - lr * weight_decay) if weight_decay != 0 else w_before
    out = torch.empty(w.shape, dtype=torch.float32)
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
    from thimble.lattice import spacing_toward

    w = w_before.double()
    update = pre_rounding.double() - w
    bits = w_before.contiguous().view(torch.int16).numpy().view(np.uint16)
    half = spacing_toward(bits, np.where(update.numpy() < 0, -1, 1)) / 2
    return update.abs() / torch.from_numpy(half)


def half_spacing_exponent(w_bits: np.ndarray, downward: np.ndarray) -> np.ndarray:
    """log2 of half the lattice spacing from w (bf16 bit patterns) towards the move (int16); spacings
    are powers of two.

    Away from zero it is the spacing of w's binade, 2**(e - 134) (e the biased exponent field, 1 for
    zero and subnormals); towards zero from a binade's bottom (a zero mantissa) it is half that.
    """
    magnitude = w_bits & np.uint16(0x7FFF)
    field = np.maximum(magnitude >> np.uint16(7), np.uint16(1)).astype(np.int16)
    negative = w_bits >= np.uint16(0x8000)
    towards_zero = (magnitude != 0) & (downward != negative)
    finer = towards_zero & ((magnitude & np.uint16(0x7F)) == 0) & (magnitude >= np.uint16(0x100))
    field -= finer
    field -= 135
    return field


def log2_ratio_floor(w_bits: np.ndarray, pre_rounding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """floor(log2(update_ratio)) (int16, clipped to [-200, 200]: -200 where the update is 0, 200 past
    float32's range) and where the ratio is exactly 1 (a tie), from the float32 update's exponent
    bits and the bf16 weight's: the fast, exact form of ``update_ratio`` for histograms.

    ``pre_rounding - w`` is exact in float32 whenever the update is smaller than w (Sterbenz); a larger
    one has a ratio of at least 2**8, the histogram's last bin, where rounding cannot change the bin.
    """
    update = pre_rounding - (w_bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    bits = update.view(np.uint32)
    field = ((bits >> np.uint32(23)) & np.uint32(0xFF)).astype(np.int16)
    mantissa_zero = (bits & np.uint32(0x7FFFFF)) == 0
    floor = field - 127  # floor(log2 |update|) of a normal float32
    subnormal = np.flatnonzero((field == 0) & ~mantissa_zero)
    if subnormal.size:  # below 2**-126: rare, and exact through frexp
        fraction, exponent = np.frexp(update.reshape(-1)[subnormal])
        floor.reshape(-1)[subnormal] = exponent - 1
        mantissa_zero.reshape(-1)[subnormal] = np.abs(fraction) == 0.5
    floor -= half_spacing_exponent(w_bits, bits >= np.uint32(0x80000000))
    np.clip(floor, -199, 199, out=floor)
    floor[update == 0] = -200
    floor[field == 255] = 200
    return floor, mantissa_zero & (floor == 0)


def stays_from_ratio(w_bits: np.ndarray, log2_floor: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """``stays_put`` from the ratio's exponent: below half a spacing, or exactly half with an even w."""
    return (log2_floor < 0) | (tie & ((w_bits & np.uint16(1)) == 0))
