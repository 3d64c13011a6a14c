"""The optimizer builder, the replay through ``step()``, and the freeze criterion against oracles."""

import numpy as np
import pytest
import torch

from thimble.numerics.lattice import log2_ratio_floor, stays_from_ratio
from thimble.training.adamw import (build_adamw, pre_rounding_weight, replay_steps, resolve_implementation, stays_put,
                                    update_ratio)
from thimble.numerics.bf16 import all_bfloat16, torch_to_bits as bits_of
from thimble.numerics.lattice import ordinal, spacing_toward

HYPER = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}


def test_auto_is_torchs_default_on_the_cpu():
    assert resolve_implementation("auto", torch.device("cpu")) == "single_tensor"
    assert resolve_implementation("fused", torch.device("cpu")) == "fused"
    with pytest.raises(ValueError, match="unknown optimizer implementation"):
        build_adamw([torch.nn.Parameter(torch.zeros(2))], HYPER, "vectorised")


@pytest.mark.parametrize("implementation", ["single_tensor", "foreach", "fused"])
def test_replay_steps_equal_a_continuous_run_of_the_same_optimizer(implementation):
    torch.manual_seed(0)
    param = torch.nn.Parameter((torch.randn(40, 8) * 0.02).to(torch.bfloat16))
    optimizer = build_adamw([param], HYPER, implementation)
    history = {"w": [param.detach().clone()], "m": [torch.zeros_like(param)], "v": [torch.zeros_like(param)], "g": []}
    for _ in range(7):
        grad = (torch.randn(40, 8) * 1e-3).to(torch.bfloat16)
        history["g"].append(grad)
        param.grad = grad.clone()
        optimizer.step()
        state = optimizer.state[param]
        history["w"].append(param.detach().clone())
        history["m"].append(state["exp_avg"].clone())
        history["v"].append(state["exp_avg_sq"].clone())
    stack = {key: torch.stack(values) for key, values in history.items()}
    # steps 3..7 from the recorded state of steps 2..6, in one call
    w, m, v = replay_steps(stack["w"][2:7], stack["m"][2:7], stack["v"][2:7], stack["g"][2:7], 3, HYPER,
                           implementation)
    for replayed, recorded in ((w, stack["w"][3:]), (m, stack["m"][3:]), (v, stack["v"][3:])):
        assert torch.equal(replayed.view(torch.int16), recorded.view(torch.int16))


def test_criterion_is_exact_against_torchs_own_step_including_ties():
    """Every bf16 weight of moderate size, with downward updates of 1/2, 3/4, 1 - 2^-7, 1, 1 + 2^-7, 5/4
    and 3/2 half spacings: the criterion says 'stays' exactly where the optimizer's own step leaves it.

    Late in a run the bias corrections are 1 (step 10^6), lr = 2^-10 and exp_avg_sq = 1 give denom 1,
    so an exp_avg of factor * half spacing * 2^10 makes an update of exactly factor half spacings.
    """
    values = all_bfloat16().astype(np.float32)
    w = torch.from_numpy(values[np.isfinite(values) & (np.abs(values) > 2**-100) & (np.abs(values) < 2**-4)])
    w = w.to(torch.bfloat16)
    hyper = {"lr": 2**-10, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    half = torch.from_numpy(spacing_toward(w.view(torch.int16).numpy().view(np.uint16), -1) / 2)
    steps = torch.tensor([10**6])
    ties = 0
    for factor in (0.5, 0.75, 1 - 2**-7, 1.0, 1 + 2**-7, 1.25, 1.5):
        m = (factor * half * 2**10).to(torch.bfloat16)
        assert torch.equal(m.double(), factor * half * 2**10)  # exactly representable
        v = torch.ones_like(w)
        w_after, m_after, v_after = replay_steps(w[None], m[None], v[None], m[None], int(steps[0]), hyper,
                                                 "single_tensor")
        assert torch.equal(m_after[0], m) and torch.equal(v_after[0], v)  # lerp of equal values; bf16 v stays 1
        pre = pre_rounding_weight(w[None], m_after, v_after, steps, hyper)
        stays = stays_put(w[None], pre)[0]
        # the replay's form, from the ratio's exponent, is the same rule
        floor, tie = log2_ratio_floor(bits_of(w)[None], pre.numpy())
        np.testing.assert_array_equal(stays_from_ratio(bits_of(w)[None], floor, tie)[0], stays.numpy())
        moved = torch.from_numpy(ordinal(w_after[0].view(torch.int16).numpy().view(np.uint16))
                                 != ordinal(w.view(torch.int16).numpy().view(np.uint16)))
        assert torch.equal(stays, ~moved)
        ratio = update_ratio(w[None], pre)[0]
        np.testing.assert_array_equal(ratio.numpy(), factor)
        if factor == 1.0:  # a tie: rounding keeps w exactly where its last mantissa bit is even
            assert torch.equal(stays, (w.view(torch.int16) & 1) == 0)
            ties += int(stays.numel())
        else:
            assert bool(stays.all()) == (factor < 1) and bool((~stays).all()) == (factor > 1)
    assert ties > 20000


def test_update_ratio_uses_the_spacing_towards_the_move():
    # just above a power of two, a downward move meets the finer spacing below it
    w = torch.tensor([1.0, 1.0, 0.0], dtype=torch.bfloat16)
    pre = torch.tensor([1.0 + 2**-8, 1.0 - 2**-9, -(2.0**-134)], dtype=torch.float32)
    np.testing.assert_allclose(update_ratio(w[None], pre[None])[0].numpy(), [1.0, 1.0, 1.0])


def test_the_fast_ratio_exponent_equals_the_exact_ratio_on_every_bf16_weight():
    """floor(log2(ratio)) and ties from float32 exponents, against the float64 ratio, for every finite
    bf16 weight and updates of many sizes in both directions."""
    values = all_bfloat16()
    w = torch.from_numpy(values.astype(np.float32)[np.isfinite(values.astype(np.float32))]).to(torch.bfloat16)
    w32 = w.float()
    rng = np.random.default_rng(0)
    for scale in (2.0**-12, 2.0**-9, 2.0**-8, 2.0**-7, 2.0**-3, 1.0, 0.0):
        update = torch.from_numpy(rng.choice([-1.0, 1.0], w.numel()) * scale).float() * w32.abs().clamp(min=2**-140)
        pre = w32 + update
        exact = update_ratio(w[None], pre[None])[0].numpy()
        floor, tie = log2_ratio_floor(bits_of(w)[None], pre[None].numpy())
        nonzero = exact > 0
        below_top = nonzero & (exact < 2**8)
        np.testing.assert_array_equal(floor[0][below_top], np.floor(np.log2(exact[below_top])))
        assert (floor[0][nonzero & (exact >= 2**8)] >= 8).all()
        assert (floor[0][(pre - w32).numpy() == 0] == -200).all()
        np.testing.assert_array_equal(tie[0], exact == 1)
    # exact half spacings both ways, from above and below powers of two: ties
    w = torch.tensor([1.0, 1.0, 0.75, -1.0], dtype=torch.bfloat16)
    pre = torch.tensor([1.0 + 2**-8, 1.0 - 2**-9, 0.75 - 2**-9, -1.0 + 2**-9])
    assert log2_ratio_floor(bits_of(w)[None], pre[None].numpy())[1].tolist() == [[True, True, True, True]]
