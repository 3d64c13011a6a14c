"""The analysis after rechunk on loops recorded by thimble.Recorder: ΔW′ in each tensor's own lattice, the freeze
tables and verdicts, the freeze drivers where the optimizer has Adam's moments, and every figure, each against
answers known by construction:

- an optimizer that moves float32 and float16 parameters by exactly k representable values a step (k its lr,
  set by a schedule) gives ΔW′ = k there, in the parameter's own lattice; a sign flip of 1e30 needs int64;
- a step with lr 0 is globally frozen, and its drivers' row is empty; a parameter that never had a gradient is
  frozen at every step, and the drivers say they do not apply to it;
- a bf16 model's dead tokens (token_groups=, never in the input) never move, and the tables have no token text
  without a tokenizer;
- a float32 model under bf16 autocast stepped by Adam with weight decay: the drivers' mean ratio is the direct
  float64 formula's with the schedule's lr, and float32's exp_avg_sq does not stall;
- SGD: the drivers do not apply (and say why), exp_avg_sq.csv has no rows, the figures say so.
"""

import json
import math

import h5py
import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_settings

import thimble
from thimble import cli
from thimble.analysis.delta_w import write_delta_w_lattice
from thimble.analysis.drivers import write_drivers
from thimble.analysis.freeze import analyse
from thimble.analysis.replay import RATIO_COLUMNS
from thimble.numerics.lattice import FLOAT32_LATTICE, ordinal, spacing_toward
from thimble.outputs import DRIVERS_OUTPUTS, FIGURES, FREEZE_OUTPUTS
from thimble.record.format import read_checked
from thimble.record.reader import RecordedTensor
from thimble.record.rechunk import rechunk_stream
from thimble.report.figures import experiment_figures

STEPS = 12
#: the ULP optimizer's moves at steps 1..STEPS (its lr, set by a schedule): 0 is a frozen step
ULP_MOVES = (3, 0, -5, 1, 40000, -40000, 0, 2, 0, 7, -1, 4)
ULP_MOVES_16 = tuple(int(np.sign(k)) * min(abs(k), 700) for k in ULP_MOVES)
#: the step (1-based) at which the ULP optimizer flips the sign of the parameter ``big``
FLIP_STEP = 4
#: the bf16 run's steps with lr 0 (a warm-up from 0, then a pause)
ZERO_LR_STEPS = (1, 6, 7)
LR = 1e-2


def analysis_settings(name: str) -> dict:
    return {"name": name, "analysis": {**tiny_settings()["analysis"], "trend_window_steps": 2}}


class UlpStepper(torch.optim.Optimizer):
    """Moves every parameter that has a gradient by exactly its group's lr (an integer k) representable values of
    its own dtype per step, one torch.nextafter at a time; a group with ``flip_at`` negates its parameters at that
    step instead. Keeps no state."""

    def __init__(self, params):
        super().__init__(params, {"lr": 1.0, "flip_at": 0})
        self.count = 0

    @torch.no_grad()
    def step(self, closure=None):
        self.count += 1
        for group in self.param_groups:
            k = int(round(group["lr"]))
            for param in group["params"]:
                if param.grad is None:
                    continue
                if group["flip_at"] == self.count:
                    param.neg_()
                    continue
                target = torch.full_like(param, math.inf if k > 0 else -math.inf)
                for _ in range(abs(k)):
                    param.copy_(torch.nextafter(param, target))


class UlpModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        # zero, signed zeros, subnormals and binade edges: the walks cross them
        edges32 = [0.0, -0.0, 1.0, -1.0, 2.0 ** -126, 1e-45, 0.75, -3.0e-39, 1024.0, 0.1, -0.1, 3.0]
        self.w32 = torch.nn.Parameter(torch.tensor(edges32, dtype=torch.float32).reshape(3, 4))
        self.w16 = torch.nn.Parameter(torch.tensor([0.0, 1.0, -2.0 ** -14, 6e-8, 0.5, -7.0], dtype=torch.float16))
        self.big = torch.nn.Parameter(torch.tensor([1e30, -3.0, 0.5], dtype=torch.float32))
        self.never = torch.nn.Parameter(torch.zeros(2, 2))  # no gradient: never stepped

    def loss(self):
        return self.w32.sum() + self.w16.float().sum() + self.big.sum()


def rechunked(run) -> str:
    rechunk_stream(run / "stream", run / "recording.h5", "auto", 1 << 26)
    return str(run / "recording.h5")


@pytest.fixture(scope="module")
def ulp_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ulp") / "ulp"
    model = UlpModel()
    optimizer = UlpStepper([model.w32, model.never])
    optimizer.add_param_group({"params": [model.w16]})  # float16's shorter walks: its range is ±65504
    optimizer.add_param_group({"params": [model.big], "flip_at": FLIP_STEP})
    with thimble.Recorder(run, model, optimizer, segment_steps=5) as rec:
        for step in range(STEPS):
            # the schedule: each group's lr for the step
            for group, moves in zip(optimizer.param_groups, (ULP_MOVES, ULP_MOVES_16, ULP_MOVES)):
                group["lr"] = float(moves[step])
            model.loss().backward()
            optimizer.step()
            rec.log(loss=float(step))
            optimizer.zero_grad()
    return rechunked(run)


def test_the_ulp_optimizer_moves_as_it_says():
    # the construction itself, against numpy's nextafter
    model = UlpModel()
    optimizer = UlpStepper(model.parameters())
    before = model.w32.detach().numpy().copy()
    optimizer.param_groups[0]["lr"] = 3.0
    model.loss().backward()
    optimizer.step()
    expected = before
    for _ in range(3):
        expected = np.nextafter(expected, np.float32(np.inf))
    np.testing.assert_array_equal(model.w32.detach().numpy(), expected)


@pytest.fixture(scope="module")
def ulp_outputs(ulp_run, tmp_path_factory):
    return run_stages(ulp_run, tmp_path_factory.mktemp("ulp_out"), "ulp")


def run_stages(recording: str, out, name: str) -> dict:
    """Every stage after rechunk, as the workflow runs them: lattice, freeze drivers, freeze (no tokenizer), and
    figures (with the replay's update-ratio table of no rows)."""
    paths = {"delta": str(out / "delta_w_lattice.h5"), **{key: str(out / file) for key, file in
                                                          DRIVERS_OUTPUTS.items()},
             **{f"freeze_{key}": str(out / file) for key, file in FREEZE_OUTPUTS.items()}}
    lattice = write_delta_w_lattice(recording, paths["delta"])
    drivers = write_drivers(recording, paths["table"], paths["summary"], threads=2, block_rows=5)
    summary = analyse(recording, analysis_settings(name), {key: str(out / file) for key, file in
                                                          FREEZE_OUTPUTS.items()},
                      delta_path=paths["delta"], drivers_path=paths["summary"], threads=2)
    ratio = out / "update_ratio.csv"
    pd.DataFrame(columns=["tensor", "step", *RATIO_COLUMNS]).to_csv(ratio, index=False)
    experiment_figures(str(out / "freeze.csv"), str(out / "summary.json"), str(out / "token_displacement.h5"),
                       str(out / "exp_avg_sq.csv"), str(ratio), str(out / "lattice_positions.csv"),
                       str(out / "figures"), str(out / "summary.html"), paths["table"])
    return {"out": out, "lattice": lattice, "drivers": drivers, "summary": summary,
            "freeze": pd.read_csv(out / "freeze.csv"), "drivers_table": pd.read_csv(paths["table"])}


def delta_w(out, name: str) -> np.ndarray:
    with h5py.File(out / "delta_w_lattice.h5", "r") as handle:
        tensor = RecordedTensor(handle[f"params/{name}/delta_w_lattice"])
        return tensor.bits().view(tensor.dtype).reshape(tensor.shape[0], -1)


def test_delta_w_is_the_number_of_representable_values_walked_in_each_tensors_own_lattice(ulp_outputs):
    out, tensors = ulp_outputs["out"], ulp_outputs["lattice"]["tensors"]
    assert {name: (entry["lattice"], entry["dtype"]) for name, entry in tensors.items()} == {
        "w32": ("float32", "int32"), "w16": ("float16", "int16"), "big": ("float32", "int64"),
        "never": ("float32", "int16")}
    w32, w16 = delta_w(out, "w32"), delta_w(out, "w16")
    assert (w32[0] == 0).all() and (w16[0] == 0).all()
    for step in range(1, STEPS + 1):
        assert (w32[step] == ULP_MOVES[step - 1]).all(), step
    with h5py.File(out / "delta_w_lattice.h5", "r") as handle:
        assert handle["params/w32/delta_w_lattice"].attrs["description"].startswith("signed float32 lattice steps")
        assert handle["params/w16/delta_w_lattice"].attrs["description"].startswith("signed float16 lattice steps")
        moves = read_checked(handle["params/w32/moves_per_step"])
    np.testing.assert_array_equal(moves[1:], [12 * (k != 0) for k in ULP_MOVES])


def test_a_float16_tensors_moves_are_counted_in_float16s_lattice(ulp_run, ulp_outputs):
    # w16 moved by its group's lr; its ΔW′ is the float16 values walked, which numpy's float16 nextafter counts
    with h5py.File(ulp_run, "r") as handle:
        values = RecordedTensor.of_recording(handle, "params/w16/value").bits().view(np.float16)
    steps = delta_w(ulp_outputs["out"], "w16")
    for step in range(1, STEPS + 1):
        walked = values[step - 1].copy()
        k = ULP_MOVES_16[step - 1]
        for _ in range(abs(k)):
            walked = np.nextafter(walked, np.float16(np.inf if k > 0 else -np.inf))
        np.testing.assert_array_equal(walked.view(np.uint16), values[step].view(np.uint16))
        assert (steps[step] == k).all()


def test_a_sign_flip_of_a_large_float32_value_is_held_in_int64(ulp_run, ulp_outputs):
    big = delta_w(ulp_outputs["out"], "big")
    assert big.dtype == np.int64
    start = np.float32([1e30, -3.0, 0.5])
    walked = start
    for k in ULP_MOVES[: FLIP_STEP - 1]:
        for _ in range(abs(k)):
            walked = np.nextafter(walked, np.float32(np.inf if k > 0 else -np.inf))
    np.testing.assert_array_equal(big[FLIP_STEP], -2 * ordinal(walked, FLOAT32_LATTICE))
    assert big[FLIP_STEP, 0] < np.iinfo(np.int32).min


def test_steps_with_lr_0_and_a_tensor_never_stepped_are_frozen_exactly_there(ulp_outputs):
    freeze, summary = ulp_outputs["freeze"], ulp_outputs["summary"]
    zero = {step for step, k in enumerate(ULP_MOVES, 1) if k == 0}
    for name in ("w32", "w16"):
        rows = freeze[freeze["tensor"] == name]
        assert set(rows.loc[rows["all_globally_frozen"], "step"]) == zero
    never = summary["tensors"]["never"]
    assert never["global_freeze_share"] == 1.0 and never["first_global_freeze_step"] == 1
    assert never["verdict"] == "stabilised" and never["dtype"] == "float32"
    assert summary["question_tensor"] == "w32" and summary["update_rule"].endswith("UlpStepper")
    assert summary["recorded_by"] == "thimble.Recorder" and summary["tensors"]["w16"]["dtype"] == "float16"


def test_drivers_do_not_apply_to_an_optimizer_without_adams_update(ulp_outputs):
    drivers = ulp_outputs["drivers"]
    assert drivers["applies"] is False and drivers["tensors"] == {}
    assert "UlpStepper forms its update otherwise" in drivers["why"]
    assert set(drivers["not_applicable"]) == {"w32", "w16", "big", "never"}
    assert ulp_outputs["drivers_table"].empty
    assert list(ulp_outputs["drivers_table"].columns)[:3] == ["tensor", "step", "group"]
    assert json.loads((ulp_outputs["out"] / "summary.json").read_text())["drivers"] == drivers


# -- a bf16 model with an embedding and token groups, AdamW, lr 0 at some steps ----------------------------------

class TokenModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(40, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 40)
        self.unused = torch.nn.Linear(2, 2, bias=False)  # no gradient: never stepped

    def forward(self, ids):
        return self.head(self.norm(self.embed(ids)))


@pytest.fixture(scope="module")
def token_run(tmp_path_factory):
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("tokens") / "tokens"
    model = TokenModel().to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.0 if s + 1 in ZERO_LR_STEPS else 1.0)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[30:] = True  # tokens 30..39 never occur
    with thimble.Recorder(run, model, optimizer, token_groups={"dead": dead}, segment_steps=5) as rec:
        for _ in range(STEPS):
            ids = torch.randint(0, 30, (4, 6))
            loss = torch.nn.functional.cross_entropy(model(ids).float().reshape(-1, 40), ids.reshape(-1))
            loss.backward()
            optimizer.step()
            schedule.step()
            rec.log(loss=loss)
            optimizer.zero_grad()
    return rechunked(run)


@pytest.fixture(scope="module")
def token_outputs(token_run, tmp_path_factory):
    return run_stages(token_run, tmp_path_factory.mktemp("tokens_out"), "tokens")


def test_the_token_groups_parameter_takes_the_embeddings_place(token_outputs):
    summary, freeze = token_outputs["summary"], token_outputs["freeze"]
    assert summary["question_tensor"] == "embed.weight" and list(summary["tensors"])[0] == "embed.weight"
    assert summary["tensors"]["embed.weight"]["groups"] == ["dead", "live", "all"]
    assert all(entry["groups"] == ["all"] for name, entry in summary["tensors"].items() if name != "embed.weight")
    embed = freeze[freeze["tensor"] == "embed.weight"]
    # dead tokens never occur: no gradient, no moment; the decay W·(1 − lr·λ) rounds back in bf16
    assert embed["dead_globally_frozen"].all()
    tokens = pd.read_csv(token_outputs["out"] / "token_freeze.csv")
    assert "token_text" not in tokens.columns  # no tokenizer: token ids alone
    assert (tokens["group"] == np.where(np.arange(40) >= 30, "dead", "live")).all()
    assert (tokens.loc[tokens["group"] == "dead", "frozen_share_all"] == 1.0).all()
    with h5py.File(token_outputs["out"] / "token_displacement.h5", "r") as handle:
        assert handle["norm"].shape == (STEPS + 1, 40) and handle["dead_mask"][...].sum() == 10


def test_lr_0_steps_are_globally_frozen_for_every_tensor_and_only_there(token_outputs):
    freeze = token_outputs["freeze"]
    stepped = freeze[freeze["tensor"] != "unused.weight"]
    frozen_everywhere = stepped.groupby("step")["all_globally_frozen"].all()
    assert set(frozen_everywhere[frozen_everywhere].index) == set(ZERO_LR_STEPS)
    live = freeze[freeze["tensor"] == "embed.weight"].set_index("step")["live_globally_frozen"]
    assert set(live[live].index) == set(ZERO_LR_STEPS)
    unused = token_outputs["summary"]["tensors"]["unused.weight"]
    assert unused["global_freeze_share"] == 1.0 and unused["first_global_freeze_step"] == 1


def test_the_drivers_use_each_steps_lr_and_leave_steps_without_an_update_empty(token_outputs):
    drivers, table = token_outputs["drivers"], token_outputs["drivers_table"]
    assert drivers["applies"] is True and drivers["question_tensor"] == "embed.weight"
    assert set(drivers["tensors"]) == {"embed.weight", "norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert "never stepped unused.weight" in drivers["not_applicable"]["unused.weight"]
    assert set(drivers["dead"]) >= {"onset_step", "driver", "learning_rate_bits", "answer"}
    embed = table[(table["tensor"] == "embed.weight") & (table["group"] == "all")].set_index("step")
    empty = embed.loc[list(ZERO_LR_STEPS)]
    assert (empty["elements"] == 0).all() and empty["mean_log2_ratio"].isna().all()
    assert empty["log2_lr"].isna().all() and empty["frozen_share"].isna().all()
    formed = embed.drop(index=list(ZERO_LR_STEPS))
    np.testing.assert_allclose(formed["log2_lr"], math.log2(LR), rtol=1e-12)
    assert (formed["elements"] > 0).all()
    # the mean ratio is the sum of its terms
    np.testing.assert_allclose(formed["mean_log2_ratio"], formed["log2_lr"] + formed["mean_log2_abs_m_hat"]
                               - formed["mean_log2_denominator"] - formed["mean_log2_half_spacing"], atol=1e-9)
    # the dead tokens never form an update: none of their elements is included, and none moves
    dead = table[(table["tensor"] == "embed.weight") & (table["group"] == "dead")]
    assert (dead["elements"] == 0).all()
    for tensor in drivers["tensors"].values():
        for result in tensor.values():
            if result["drop_bits"] is not None:
                terms = sum(result[f"{term}_bits"] for term in ("spacing", "statistics", "v_stall", "learning_rate"))
                assert abs(result["drop_bits"] - terms) < 1e-9
    summary = token_outputs["summary"]
    assert summary["tensors"]["embed.weight"]["onset_step"] == drivers["all"]["onset_step"]


def test_exp_avg_sq_tables_bias_corrections_are_the_steps_own(token_outputs):
    table = pd.read_csv(token_outputs["out"] / "exp_avg_sq.csv")
    head = table[table["tensor"] == "head.weight"]
    steps = head["step"].to_numpy(dtype=float)
    np.testing.assert_array_equal(head["bias_correction2"], np.where(steps > 0, 1 - 0.999 ** steps, 1.0))
    assert set(table["tensor"]) == {"embed.weight", "norm.weight", "norm.bias", "head.weight", "head.bias",
                                    "unused.weight"}


# -- a float32 model under bf16 autocast, Adam with (coupled) weight decay and a warm-up -----------------------

def warmup(step: int) -> float:
    return min(1.0, (step + 1) / 5)


def mlp() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def train_mlp(run, optimizer_of, steps_before: int = 0) -> str:
    """A recording of an MLP's training under bf16 autocast; ``steps_before``: optimizer steps taken before the
    recorder attaches (it finds the optimizer's state)."""
    model = mlp()
    optimizer = optimizer_of(model.parameters())
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for _ in range(steps_before):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    with thimble.Recorder(run, model, optimizer, segment_steps=5) as rec:
        for _ in range(STEPS):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            optimizer.step()
            schedule.step()
            rec.log(loss=loss)
            optimizer.zero_grad()
    return rechunked(run)


@pytest.fixture(scope="module")
def adam_run(tmp_path_factory):
    return train_mlp(tmp_path_factory.mktemp("adam") / "adam",
                     lambda params: torch.optim.Adam(params, lr=LR, weight_decay=0.05))


@pytest.fixture(scope="module")
def adam_outputs(adam_run, tmp_path_factory):
    return run_stages(adam_run, tmp_path_factory.mktemp("adam_out"), "adam")


def test_a_float32_tensors_drivers_are_the_direct_formula_with_the_schedules_lr(adam_run, adam_outputs):
    name, base = "0.weight", LR
    with h5py.File(adam_run, "r") as handle:
        w, m, v = (RecordedTensor.of_recording(handle, f"params/{name}/{key}").bits().view(np.float32)
                   .reshape(STEPS + 1, -1) for key in ("value", "exp_avg", "exp_avg_sq"))
    table = adam_outputs["drivers_table"]
    rows = table[(table["tensor"] == name) & (table["group"] == "all")].set_index("step")
    for step in range(1, STEPS + 1):
        lr = base * warmup(step - 1)
        m_hat = m[step].astype(np.float64) / (1 - 0.9 ** step)
        v_hat = v[step].astype(np.float64) / (1 - 0.999 ** step)
        update = -lr * m_hat / (np.sqrt(v_hat) + 1e-8)
        half = spacing_toward(w[step - 1], update, FLOAT32_LATTICE) / 2
        included = m[step] != 0
        expected = np.mean(np.log2(np.abs(update[included]) / half[included]))
        assert rows.loc[step, "mean_log2_ratio"] == pytest.approx(expected, abs=1e-9)
        assert rows.loc[step, "log2_lr"] == pytest.approx(math.log2(lr), abs=1e-10)
        frozen = np.mean(w[step] == w[step - 1])
        assert rows.loc[step, "frozen_share"] == frozen
        assert rows.loc[step, "median_abs_w"] == np.median(np.abs(w[step - 1].astype(np.float64)))
    # float32's exp_avg_sq decays as exact arithmetic does (Adam's decay joins the gradient in both)
    assert table["v_stall_bits"].abs().max() < 1e-4
    assert adam_outputs["summary"]["tensors"][name]["dtype"] == "float32"
    assert "float32's exp_avg_sq" in adam_outputs["drivers"]["all"]["answer"]


def test_a_float32_tensors_delta_w_counts_its_float32_moves(adam_run, adam_outputs):
    with h5py.File(adam_run, "r") as handle:
        w = RecordedTensor.of_recording(handle, "params/3.weight/value").bits().view(np.float32)
    steps = delta_w(adam_outputs["out"], "3.weight").reshape(w.shape)
    np.testing.assert_array_equal(steps[1:], ordinal(w[1:], FLOAT32_LATTICE) - ordinal(w[:-1], FLOAT32_LATTICE))
    # the moves of a float32 weight span many of its lattice steps, as no bf16 count would
    assert np.abs(steps[1:]).max() > 1 << 16


def test_an_optimizer_found_with_state_continues_its_counts_and_its_exact_average(tmp_path):
    before = 3
    recording = train_mlp(tmp_path / "warm", lambda params: torch.optim.AdamW(params, lr=LR), steps_before=before)
    outputs = run_stages(recording, tmp_path / "out", "warm")
    with h5py.File(recording, "r") as handle:
        assert handle.attrs["initial_state"] == "as_found"
    # the exact average starts from the exp_avg_sq found: float32's then tracks it (from 0 it would sit far below)
    assert outputs["drivers_table"]["v_stall_bits"].abs().max() < 1e-4
    table = pd.read_csv(tmp_path / "out" / "exp_avg_sq.csv")
    rows = table[table["tensor"] == "0.weight"]
    counts = rows["step"].to_numpy() + before
    np.testing.assert_allclose(rows["bias_correction1"], 1 - 0.9 ** counts, rtol=1e-15)


# -- SGD: no moments -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sgd_outputs(tmp_path_factory):
    recording = train_mlp(tmp_path_factory.mktemp("sgd") / "sgd",
                          lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4))
    return run_stages(recording, tmp_path_factory.mktemp("sgd_out"), "sgd")


def test_sgd_has_no_drivers_and_no_exp_avg_sq_rows_and_says_why(sgd_outputs):
    drivers = sgd_outputs["drivers"]
    assert drivers["applies"] is False and "SGD's update is lr times the gradient" in drivers["why"]
    assert sgd_outputs["drivers_table"].empty
    table = pd.read_csv(sgd_outputs["out"] / "exp_avg_sq.csv")
    assert table.empty and list(table.columns) == ["tensor", "step"]
    summary = sgd_outputs["summary"]
    assert summary["update_rule"] == "torch.optim.sgd.SGD" and summary["drivers"]["applies"] is False
    assert set(sgd_outputs["freeze"]["tensor"]) == {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"}


@pytest.mark.parametrize("outputs", ["ulp_outputs", "token_outputs", "adam_outputs", "sgd_outputs"])
def test_every_figure_is_drawn(outputs, request):
    out = request.getfixturevalue(outputs)["out"]
    for figure in FIGURES:
        image = matplotlib.image.imread(out / "figures" / f"{figure}.png")
        assert image.shape[0] > 100 and image.shape[1] > 100
    assert "verdict" in (out / "summary.html").read_text()


def test_the_stages_command_lines_run_without_a_tokenizer(token_run, tmp_path):
    delta, table, drivers = tmp_path / "delta.h5", tmp_path / "freeze_drivers.csv", tmp_path / "freeze_drivers.json"
    assert cli.main(["lattice", "--recording", token_run, "--output", str(delta)]) in (0, None)
    assert cli.main(["freeze-drivers", "--recording", token_run, "--table", str(table), "--summary",
                     str(drivers)]) in (0, None)
    outputs = [argument for key, file in FREEZE_OUTPUTS.items()
               for argument in (f"--{key.replace('_', '-')}", str(tmp_path / file))]
    assert cli.main(["freeze", "--settings", json.dumps(analysis_settings("tokens")), "--delta", str(delta),
                     "--recording", token_run, "--drivers", str(drivers), *outputs]) in (0, None)
    ratio = tmp_path / "update_ratio.csv"
    pd.DataFrame(columns=["tensor", "step", *RATIO_COLUMNS]).to_csv(ratio, index=False)
    assert cli.main(["figures", "--freeze", str(tmp_path / "freeze.csv"), "--summary", str(tmp_path / "summary.json"),
                     "--token-steps", str(tmp_path / "token_displacement.h5"), "--exp-avg-sq",
                     str(tmp_path / "exp_avg_sq.csv"), "--ratio", str(ratio), "--lattice-positions",
                     str(tmp_path / "lattice_positions.csv"), "--drivers", str(table), "--outdir",
                     str(tmp_path / "figures"), "--summary-html", str(tmp_path / "summary.html")]) in (0, None)
    assert all((tmp_path / "figures" / f"{figure}.png").exists() for figure in FIGURES)


def test_the_numpy_pass_on_bf16_tensors_is_the_compiled_pass(token_run, monkeypatch):
    # the pass of float16 and float32 tensors (LatticePass), given bf16's lattice, against the compiled pass on the
    # same bf16 tensor: the same columns up to the order of their sums; with Adam's coupled decay in both, and the
    # numpy pass's rows taken a few at a time
    from thimble.analysis import drivers

    monkeypatch.setattr(drivers.LatticePass, "SPAN_ELEMENTS", 20)
    from thimble.analysis.tensors import recorded_params, row_groups, step_settings
    from thimble.numerics.lattice import BF16_LATTICE
    from thimble.util.workers import WorkerPool

    with h5py.File(token_run, "r") as handle:
        param = next(param for param in recorded_params(handle) if param.name == "head.weight")
        bits = {role: RecordedTensor.of_recording(handle, path).bits().reshape(STEPS + 1, -1)
                for role, path in param.roles().items()}
        settings = step_settings(handle, param.name)
    groups = row_groups(param.name, 40, None)
    results = {}
    for coupled in (False, True):
        update = drivers.UpdateSettings.of_steps(settings, coupled)
        with WorkerPool(2) as pool:
            passes = {"compiled": drivers.DriverPass(param.name, groups, 8, update, pool, block_rows=STEPS),
                      "numpy": drivers.LatticePass(param.name, groups, 8, update, dict.fromkeys(
                          ("value", "grad", "exp_avg", "exp_avg_sq"), BF16_LATTICE))}
            for kind, analysis in passes.items():
                results[coupled, kind] = analysis.block(1, bits["W"][0], *(bits[role][1:] for role in
                                                                          ("W", "momentum_W", "variance_W", "grad_W")))
    for coupled in (False, True):
        compiled, numpy_pass = results[coupled, "compiled"]["all"], results[coupled, "numpy"]["all"]
        for column in ("step", *drivers.COLUMNS, drivers.LR_COLUMN):
            np.testing.assert_allclose(numpy_pass[column], compiled[column], rtol=1e-12, atol=1e-12, err_msg=column)
    # the coupled decay changes the exact average (and nothing else)
    assert not np.allclose(results[True, "compiled"]["all"]["mean_log2_exact_denominator"],
                           results[False, "compiled"]["all"]["mean_log2_exact_denominator"], equal_nan=True)


def test_the_exact_median_is_numpys():
    from thimble.analysis.drivers import exact_median

    rng = np.random.default_rng(3)
    for size in (1, 2, 7, 8, 1001):
        values = np.abs(rng.standard_normal(size)).astype(np.float32)
        assert exact_median(values) == np.median(values.astype(np.float64))
    assert math.isnan(exact_median(np.zeros(0, np.float16)))
