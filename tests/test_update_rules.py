"""The update rules: each trains, records what it keeps, and replays bit for bit through its own step()."""

import h5py
import numpy as np
import pytest

from thimble.record.format import param_dataset
from thimble.sizes import EMBEDDING
import torch

from conftest import run_train, tiny_settings
from thimble.training.adamw import build_update_rule
from thimble.config import ConfigError, resolve_config
from thimble.record.rechunk import rechunk_stream
from thimble.record.format import stream_tensors
from thimble.record.reader import read_steps
from thimble.record.stream_reader import open_stream
from thimble.analysis.replay import replay_recording
from thimble.update_rules import UPDATE_RULES, recorded_keys, recorded_tensors, stochastic_rounding_seed

OTHER_RULES = [rule for rule in UPDATE_RULES if rule != "bf16"]


def rule_settings(rule: str, steps: int = 12) -> dict:
    settings = tiny_settings()
    settings["training"].update(update_rule=rule, steps=steps)
    return settings


@pytest.mark.parametrize("rule", OTHER_RULES)
def test_each_rule_records_its_state_and_replays_bit_for_bit(data, tmp_path, rule):
    stream = run_train(data, tmp_path / "stream", rule_settings(rule))
    with open_stream(stream) as handle:
        tensors = stream_tensors(handle)
        assert tensors == recorded_tensors(rule) and handle.attrs["update_rule"] == rule
        for name, dtype in tensors.items():
            assert handle[name].id.get_type().get_size() == {"bfloat16": 2, "float32": 4}[dtype]
        w = read_steps(handle["W"]).view(np.uint16)
        assert not np.array_equal(w[0], w[-1])  # it trained
        if rule == "fp32_master":
            master = read_steps(handle["master_W"]).view(np.float32)
            # W is the master rounded to nearest, at every step
            rounded = torch.from_numpy(master).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            assert np.array_equal(rounded, w)
            # the master moves where the bf16 W does not: the point of the rule
            assert (master[1:] != master[:-1]).sum() > (w[1:] != w[:-1]).sum()
    summary = replay_recording(str(stream), str(tmp_path / "replay.csv"), str(tmp_path / "replay.json"),
                            str(tmp_path / "ratio.csv"), threads=2)
    assert summary["update_rule"] == rule and summary["bitwise_match"], summary["total_mismatches"]
    assert set(summary["total_mismatches"]) == {f"{name}_mismatches" for name in recorded_tensors(rule)
                                                if name != "grad_W"}
    assert summary["freeze_criterion"]["applies"] is False
    # the rechunked file holds every recorded tensor, float32 ones included, bit for bit
    checksums = rechunk_stream(stream, tmp_path / "recording.h5", 5, 2**31)
    assert set(checksums) == {param_dataset(EMBEDDING, key) for key in recorded_keys(rule)}
    with h5py.File(tmp_path / "recording.h5") as out, open_stream(stream) as handle:
        for name in checksums:
            assert np.array_equal(read_steps(out[name]), read_steps(handle[name]))


def test_a_replay_with_other_random_bits_differs(data, tmp_path, monkeypatch):
    """Stochastic rounding's replay is exact because it draws the training's bits, and only then."""
    stream = run_train(data, tmp_path / "stream", rule_settings("stochastic_rounding", steps=6))
    monkeypatch.setattr("thimble.training.adamw.stochastic_rounding_seed", lambda seed, step: seed + step + 12345)
    summary = replay_recording(str(stream), str(tmp_path / "replay.csv"), str(tmp_path / "replay.json"),
                            str(tmp_path / "ratio.csv"))
    assert not summary["bitwise_match"] and summary["total_mismatches"]["W_mismatches"] > 0


def test_stochastic_rounding_is_unbiased_and_round_to_nearest_is_not():
    """An update of a quarter spacing: round to nearest never moves the weight, stochastic rounding
    moves it a quarter of the time."""
    w = torch.full((4096,), 1.0, dtype=torch.bfloat16)
    grad = torch.ones_like(w)
    moved = {}
    for rule in ("bf16", "stochastic_rounding"):
        param = torch.nn.Parameter(w.clone())
        # lr chosen so the first Adam step (|update| = lr) is a quarter of the spacing below 1.0 (2**-8)
        optimizer = build_update_rule(rule, [param], {"lr": 2.0**-10, "betas": (0.9, 0.999), "eps": 1e-8,
                                                      "weight_decay": 0.0}, "auto", torch.device("cpu"), 0)
        param.grad = grad.clone()
        optimizer.step(1)
        moved[rule] = (param.detach() != w).float().mean().item()
    assert moved["bf16"] == 0.0
    assert 0.2 < moved["stochastic_rounding"] < 0.3


def test_seeds_differ_by_step_and_seed():
    seeds = {stochastic_rounding_seed(seed, step) for seed in (0, 1) for step in range(100)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)


def test_rule_settings_that_cannot_work_are_config_errors():
    base = {"datasets": {"toy": {"source": {"local": "texts"}, "tokenizer_texts": ["*"], "model_texts": ["*"],
                                 "vocab_size": 300}}}
    config = {**base, "experiments": {"x": {"dataset": "toy", "training": {"update_rule": "kahan"},
                                            "record": {"dtype": "float16"}}}}
    with pytest.raises(ConfigError, match="experiments.x.record.dtype"):
        resolve_config(config)
    config["experiments"]["x"] = {"dataset": "toy", "training": {"update_rule": "stochastic_rounding",
                                                                 "optimizer_impl": "foreach"}}
    with pytest.raises(ConfigError, match="experiments.x.training.optimizer_impl"):
        resolve_config(config)


def test_the_eager_step_is_torchaos_kernel():
    """Without stochastic rounding, the eager kernel and torchao's compiled step give the same bits:
    the rule runs torchao's arithmetic, only not through torch.compile."""
    from torchao.optim import _AdamW

    from thimble.training.adamw import torchao_stochastic_rounding_adamw

    generator = torch.Generator().manual_seed(3)
    shapes = [(64, 8), (8,)]
    values = [(torch.randn(shape, generator=generator) * 0.02).bfloat16() for shape in shapes]
    grads = [[(torch.randn(shape, generator=generator) * 1e-3).bfloat16() for shape in shapes] for _ in range(4)]
    hyper = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    results = []
    for build in (lambda ps: _AdamW(ps, **hyper), lambda ps: torchao_stochastic_rounding_adamw(ps, hyper)):
        params = [torch.nn.Parameter(value.clone()) for value in values]
        optimizer = build(params)
        optimizer.bf16_stochastic_round = False
        for step_grads in grads:
            for param, grad in zip(params, step_grads):
                param.grad = grad.clone()
            optimizer.step()
        results.append([param.detach().view(torch.int16) for param in params]
                       + [optimizer.state[param][key].view(torch.int16) for param in params
                          for key in ("exp_avg", "exp_avg_sq")])
    assert all(torch.equal(a, b) for a, b in zip(*results))
