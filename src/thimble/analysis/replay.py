"""Replay every recorded tensor's optimizer steps from the recording, bit for bit, and test the freeze criterion.

For every recorded parameter (in the model's order, the embedding first) and every step t, the optimizer that
trained the run (under the bf16 rule the recorded ``optimizer_impl``: single_tensor, foreach or fused; under
another rule the rule's own) is rebuilt on the replay device, loaded with the recorded value and state after
step t-1 and step count t-1, given the recorded gradient of step t, and its own ``step()`` is called. Its result
is compared with the recorded value and state after t element by element: on the device and kernels that
recorded the run, every mismatch is real. Each tensor keeps its own shape (the elementwise kernels get what
training gave them) and the tensors are replayed one after the other, so the replay holds one tensor's
blocks at a time. Steps are replayed in blocks (one parameter per step), decoded in parallel.

Beside it, under the bf16 rule, the freeze criterion (``thimble.training.adamw``): from the float32 sum that
the weight update forms before rounding, predict which elements stay put, and compare with the observed
ΔW′ = 0. Every disagreement is counted, and the first ones are listed in ``replay.json`` with the values
involved and the reason.

Stochastic rounding draws each parameter's rounding bits from torch's global generator, seeded before each
step, in the optimizer's parameter order: a later parameter's bits come after those of every parameter stepped
before it, which the replay draws again first (``rounding_draws``), sized by the recorded model settings.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from thimble.analysis.replay_base import (
    CRITERION_RULE,
    GRADIENT,
    LISTED_DISAGREEMENTS,
    RATIO_COLUMNS,
    RATIO_EDGES,
    ReplayResult,
    TensorReplay,
    bits_view,
    explain,
    log_mismatches,
    replay_device,
    replay_environments,
    replay_summary,
    replay_tensor,
    same_lattice_point,
    tensor_of_bits,
    write_replay_outputs,
)
from thimble.analysis.replay_kernel import COUNT_COLUMNS, count_steps
from thimble.analysis.tensors import recorded_params, row_shape
from thimble.analysis.torch_replay import replay_recorder_recording
from thimble.errors import DataError
from thimble.numerics.bf16 import bits_to_torch, torch_to_bits
from thimble.numerics.lattice import log2_ratio_floor, stays_from_ratio
from thimble.record.format import made_by_recorder
from thimble.sizes import EMBEDDING, REPLAY_BLOCK_STEPS, parameter_shapes
from thimble.training.adamw import pre_rounding_weight, replay_rule_step, replay_steps, update_ratio
from thimble.update_rules import UPDATE_RULES, hyperparameters, rule_of
from thimble.util.workers import WorkerPool, thread_spans

if TYPE_CHECKING:
    from thimble.record.format import RecordedParam

log = logging.getLogger(__name__)

#: replay.csv's columns under the bf16 rule: a row per tensor and step
COLUMNS = ("tensor", "step", *COUNT_COLUMNS, "freeze_agreement", "elements")
#: the mismatch columns of the bf16 rule's table
MISMATCH_COLUMNS = COLUMNS[2:5]
#: steps replayed per optimizer call
BLOCK_STEPS = REPLAY_BLOCK_STEPS


def ratio_histograms(log2_floor: np.ndarray) -> np.ndarray:
    """Per step (dimension 0), counts of floor(log2(ratio)) in RATIO_COLUMNS' bins (power-of-two intervals;
    the first also takes a zero update, the last everything above)."""
    steps = log2_floor.shape[0]
    bins = np.clip(log2_floor.reshape(steps, -1), RATIO_EDGES[0] - 1, RATIO_EDGES[-1]).astype(np.int16)
    bins -= RATIO_EDGES[0] - 1  # 0 .. len(RATIO_EDGES)
    bins += (np.arange(steps, dtype=np.int16) * len(RATIO_COLUMNS))[:, None]
    return np.bincount(bins.reshape(-1), minlength=steps * len(RATIO_COLUMNS)).reshape(steps, len(RATIO_COLUMNS))


def per_step(flags: np.ndarray) -> np.ndarray:
    """True elements per step (dimension 0)."""
    return np.count_nonzero(flags.reshape(len(flags), -1), axis=1)


def step_statistics(w: np.ndarray, m: np.ndarray, v: np.ndarray, replayed: tuple, pre_rounding: np.ndarray) -> dict:
    """Per-step counts of a run of steps, from bf16 bit patterns: ``w``, ``m``, ``v`` hold the recorded
    rows t-1 and t (one more row than steps), ``replayed`` the optimizer's W, m, v after each step,
    ``pre_rounding`` the criterion's float32 weights. Also the ratio histograms and where the criterion
    and the recording disagree.

    The numpy reference of ``thimble.analysis.replay_kernel.count_steps`` (which the replay runs: one compiled
    pass instead of these dozen); the replay uses it to find the elements behind a disagreement."""
    w_before, w_after = w[:-1], w[1:]
    log2_floor, tie = log2_ratio_floor(w_before, pre_rounding)
    predicted = stays_from_ratio(w_before, log2_floor, tie)
    observed = same_lattice_point(w_after, w_before)
    differs = predicted != observed
    columns = {
        "W_mismatches": per_step(replayed[0] != w_after),
        "momentum_mismatches": per_step(replayed[1] != m[1:]),
        "variance_mismatches": per_step(replayed[2] != v[1:]),
        "replay_frozen": per_step(same_lattice_point(replayed[0], w_before)),
        "predicted_frozen": per_step(predicted),
        "observed_frozen": per_step(observed),
        "criterion_disagreements": per_step(differs),
        "ties": per_step(tie),
    }
    return {"columns": columns, "histograms": ratio_histograms(log2_floor), "differs": differs,
            "predicted": predicted}


class Bf16Replay(TensorReplay):
    """The bf16 rule's replay of one tensor, a block of steps at a time: the optimizer's own ``step()`` on the
    block, the per-step counts of the compiled pass, the first disagreements of the criterion listed."""

    #: replay.csv's columns
    columns = COLUMNS
    mismatch_columns = MISMATCH_COLUMNS

    def __init__(self, param: RecordedParam, attrs: dict, target: torch.device, block_steps: int,
                 pool: WorkerPool):
        super().__init__(param)
        self.attrs, self.target, self.pool = attrs, target, pool
        self.hyper = hyperparameters(attrs)
        # recordings made before the setting existed were trained by the CPU's default, single-tensor AdamW
        self.implementation = str(attrs.get("optimizer_impl", "single_tensor"))
        self.storage = attrs.get("storage_dtype")
        self.columns_per_row = row_shape(self.shape)[1]
        self.histograms: list[np.ndarray] = []
        self.listed: list[dict] = []
        self.disagreements = self.ties = 0
        self._replayed_out = tuple(torch.empty((block_steps, *self.shape), dtype=torch.bfloat16, device=target)
                                   for _ in range(3))
        self._pre_rounding_out = torch.empty((block_steps, *self.shape), dtype=torch.float32)

    def block(self, first: int, recorded: dict[str, np.ndarray]) -> None:
        """Replay steps first.. of ``recorded_block`` and count them."""
        w, m, v, grads = (bits_to_torch(recorded[name]) for name in ("W", "momentum_W", "variance_W", GRADIENT))
        replayed, pre_rounding = self.replay(first, w, m, v, grads)
        columns, histograms = self.count(recorded, replayed, pre_rounding)
        for index, step in enumerate(range(first, first + len(grads))):
            row = {"tensor": self.name, "step": step, **{key: int(value[index]) for key, value in columns.items()}}
            row["freeze_agreement"] = 1 - row["criterion_disagreements"] / self.elements
            row["elements"] = self.elements
            self.rows.append(row)
        self.histograms.extend(histograms)
        self.disagreements += int(columns["criterion_disagreements"].sum())
        self.ties += int(columns["ties"].sum())
        self.list_disagreements(first, columns["criterion_disagreements"], recorded, (w, m, v), replayed,
                                pre_rounding)

    def finish(self) -> None:
        self._replayed_out = self._pre_rounding_out = None

    def replay(self, first: int, w: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
               grads: torch.Tensor) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
        """The optimizer's W, m, v after each step (bits) and the criterion's float32 weights before rounding."""
        replayed = replay_steps(*(x.to(self.target) for x in (w[:-1], m[:-1], v[:-1], grads)), first, self.hyper,
                                self.implementation, out=self._replayed_out)
        steps = torch.arange(first, first + len(grads))
        pre_rounding = pre_rounding_weight(w[:-1], m[1:], v[1:], steps, self.hyper, out=self._pre_rounding_out)
        return tuple(torch_to_bits(x.cpu()) for x in replayed), pre_rounding.numpy()

    def count(self, recorded: dict[str, np.ndarray], replayed: tuple[np.ndarray, ...],
              pre_rounding: np.ndarray) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        """Per-step counts (COUNT_COLUMNS) and ratio histograms: one compiled pass per element, which releases
        the GIL, so the block's steps are split across the pool's threads."""
        w, m, v = (recorded[name] for name in ("W", "momentum_W", "variance_W"))
        results = [self.pool.submit(count_steps, w[a: b + 1], m[a: b + 1], v[a: b + 1],
                                    tuple(x[a: b] for x in replayed), pre_rounding[a: b])
                   for a, b in thread_spans(len(pre_rounding), self.pool.threads)]
        results = [result.result() for result in results]
        columns = {key: np.concatenate([counted[key] for counted, _ in results]) for key in COUNT_COLUMNS}
        return columns, [histogram for _, histograms in results for histogram in histograms]

    def list_disagreements(self, first: int, disagreements: np.ndarray, recorded: dict[str, np.ndarray],
                           values: tuple[torch.Tensor, ...], replayed: tuple[np.ndarray, ...],
                           pre_rounding: np.ndarray) -> None:
        """Add the elements behind the block's disagreements to ``listed`` until LISTED_DISAGREEMENTS are: found
        by the numpy reference, one step at a time and only for the steps with disagreements. An element is
        named by its row and column (``thimble.analysis.tensors.row_shape``)."""
        w_bits, m_bits, v_bits = (recorded[name] for name in ("W", "momentum_W", "variance_W"))
        w, m, v = values
        for index in np.flatnonzero(disagreements).tolist():
            room = LISTED_DISAGREEMENTS - len(self.listed)
            if room <= 0:
                break
            one = slice(index, index + 1)
            reference = step_statistics(w_bits[index: index + 2], m_bits[index: index + 2],
                                        v_bits[index: index + 2], tuple(x[one] for x in replayed),
                                        pre_rounding[one])
            for element in np.argwhere(reference["differs"][0])[:room].tolist():
                at = (index, *element)
                row, column = divmod(int(np.ravel_multi_index(element, self.shape)), self.columns_per_row)
                self.listed.append({
                    "tensor": self.name, "step": first + index, "element": [row, column],
                    "w_before": float(w[at]), "w_after": float(w[1:][at]), "exp_avg": float(m[1:][at]),
                    "exp_avg_sq": float(v[1:][at]), "pre_rounding_weight": float(pre_rounding[at]),
                    "ratio": float(update_ratio(w[:-1][at].reshape(1), torch.tensor([pre_rounding[at]]))[0]),
                    "predicted_frozen": bool(reference["predicted"][(0, *element)]),
                    "observed_frozen": bool(same_lattice_point(w_bits[1:][at], w_bits[:-1][at])),
                    "reason": explain(bool(replayed[0][at] != w_bits[1:][at]), self.storage, self.implementation),
                })

    def criterion(self) -> dict:
        """The freeze criterion's account of this tensor: every element at every step."""
        elements = len(self.rows) * self.elements
        return {"elements": elements, "disagreements": self.disagreements,
                "agreement": 1 - self.disagreements / elements if elements else None,
                "ties_at_half_spacing": self.ties,
                "predicted_frozen": int(sum(row["predicted_frozen"] for row in self.rows)),
                "observed_frozen": int(sum(row["observed_frozen"] for row in self.rows)), "listed": self.listed}

    def ratio_rows(self) -> list[list]:
        """update_ratio.csv's rows of this tensor: tensor, step, the bins' counts."""
        return [[self.name, row["step"], *counts.tolist()] for row, counts in zip(self.rows, self.histograms)]

    @staticmethod
    def summary(replays: list[Bf16Replay], not_replayed: dict[str, str]) -> dict:
        """replay.json: the mismatch totals and the freeze criterion's account, over every tensor and each."""
        first = replays[0]
        criteria = [replay.criterion() for replay in replays]
        elements, disagreements = sum(c["elements"] for c in criteria), sum(c["disagreements"] for c in criteria)
        criterion = {
            "rule": CRITERION_RULE, "elements": elements, "disagreements": disagreements,
            "agreement": 1 - disagreements / elements if elements else None,
            "ties_at_half_spacing": sum(c["ties_at_half_spacing"] for c in criteria),
            "listed": [listed for c in criteria for listed in c["listed"]][:LISTED_DISAGREEMENTS],
        }
        return replay_summary({"steps": len(first.rows), "update_rule": "bf16", "storage_dtype": first.storage},
                              replay_environments(first.attrs, first.target, first.implementation), replays,
                              not_replayed, criterion)

    @staticmethod
    def log_result(summary: dict) -> None:
        where = f"{summary['replayed_on']['optimizer_impl']} AdamW on {summary['replayed_on']['device']}"
        if summary["bitwise_match"]:
            log.info("replay (%s) matches the recording bit for bit at all %d steps of %d tensors", where,
                     summary["steps"], len(summary["tensors"]))
        else:
            log.warning("replay differs from the recording: %s over %d steps with mismatches (replayed on %s, "
                        "recorded on %s)", summary["total_mismatches"], summary["steps_with_mismatches"],
                        summary["replayed_on"], summary["recorded_on"])
        log_mismatches(summary)
        criterion = summary["freeze_criterion"]
        log.info("freeze criterion vs observed ΔW′ = 0: %d disagreements in %d elements (%d ties at exactly half "
                 "a spacing, resolved by rounding)", criterion["disagreements"], criterion["elements"],
                 criterion["ties_at_half_spacing"])


#: replay.csv's columns for a rule other than bf16, beside one ``<tensor>_mismatches`` column per recorded tensor
OTHER_RULE_COLUMNS = ("tensor", "step", "observed_frozen", "elements")


class OtherRuleReplay(TensorReplay):
    """The replay of one tensor of a recording made under stochastic rounding, Kahan or fp32 master weights,
    step by step through the rule's own ``step()``, comparing every recorded tensor bit for bit.

    The freeze criterion and the update-ratio histograms are the bf16 rule's (round to nearest from the
    addcdiv_ sum); for these rules ``replay.json`` says so, and the ratio table has its header only.
    ``stepped_before``: under stochastic rounding, the shapes of the parameters whose rounding bits the step
    drew before this one's (``rounding_draws``).
    """

    def __init__(self, param: RecordedParam, attrs: dict, target: torch.device,
                 stepped_before: tuple[tuple[int, ...], ...] = ()):
        super().__init__(param)
        self.attrs, self.target, self.stepped_before = attrs, target, stepped_before
        self.tensors = param.role_dtypes()
        self.rule = str(attrs["update_rule"])
        self.hyper = hyperparameters(attrs)
        self.implementation, self.seed = str(attrs["optimizer_impl"]), int(attrs["seed"])
        self.state_names = [name for name in self.tensors if name != GRADIENT]
        self.mismatch_columns = [f"{name}_mismatches" for name in self.state_names]
        self.columns = [*OTHER_RULE_COLUMNS[:2], *self.mismatch_columns, *OTHER_RULE_COLUMNS[2:]]

    def block(self, first: int, recorded: dict[str, np.ndarray]) -> None:
        """Replay steps first.. of ``recorded_block``, one at a time, and compare each recorded tensor."""
        state = {name: tensor_of_bits(recorded[name]) for name in self.state_names}
        grads = tensor_of_bits(recorded[GRADIENT])
        for index, step in enumerate(range(first, first + len(grads))):
            before = {name: values[index].to(self.target) for name, values in state.items()}
            after = replay_rule_step(self.rule, before, grads[index].to(self.target), step, self.hyper,
                                     self.implementation, self.seed, self.stepped_before)
            row = {"tensor": self.name, "step": step}
            for name in self.state_names:
                expected = state[name][index + 1]
                got = after[name].cpu()
                row[f"{name}_mismatches"] = int((got.view(bits_view(got)) != expected.view(bits_view(expected)))
                                                .sum())
            w_bits = recorded["W"]
            row["observed_frozen"] = int(same_lattice_point(w_bits[index + 1], w_bits[index]).sum())
            row["elements"] = self.elements
            self.rows.append(row)

    def criterion(self) -> dict:
        return {"applies": False, "observed_frozen": int(sum(row["observed_frozen"] for row in self.rows))}

    def ratio_rows(self) -> list[list]:
        """None: the ratio is the bf16 rule's."""
        return []

    @staticmethod
    def summary(replays: list[OtherRuleReplay], not_replayed: dict[str, str]) -> dict:
        """replay.json: the mismatch totals, why the freeze criterion does not apply, and how a stochastic
        rounding replay draws the training's random bits."""
        first = replays[0]
        criterion = {"applies": False,
                     "why": f"the criterion predicts round-to-nearest bf16 AdamW (update_rule bf16); under "
                            f"{first.rule} the weight is rounded another way, so only the replay's bits are compared"}
        random_bits = {"random_bits": "torch's generator is seeded from (training.seed, t) before step t "
                                      "(thimble.update_rules.stochastic_rounding_seed), so the replay draws the "
                                      "training's bits; a parameter's bits follow those of every parameter the "
                                      "optimizer stepped before it (model.parameters() order), which the replay "
                                      "draws first, sized by the recorded model settings"
                       } if first.rule == "stochastic_rounding" else {}
        return replay_summary({"steps": len(first.rows), "update_rule": first.rule,
                               "storage_dtype": first.attrs.get("storage_dtype"), "recorded_tensors": first.tensors},
                              replay_environments(first.attrs, first.target, first.implementation), replays,
                              not_replayed, criterion, random_bits)

    @staticmethod
    def log_result(summary: dict) -> None:
        if summary["bitwise_match"]:
            log.info("replay (%s, %s on %s) matches the recording bit for bit at all %d steps of %d tensors",
                     summary["update_rule"], summary["replayed_on"]["optimizer_impl"],
                     summary["replayed_on"]["device"], summary["steps"], len(summary["tensors"]))
        else:
            log.warning("replay (%s) differs from the recording: %s over %d steps with mismatches",
                        summary["update_rule"], summary["total_mismatches"], summary["steps_with_mismatches"])
        log_mismatches(summary)


#: the recording's attributes that size the model (``thimble.sizes.parameter_shapes``)
MODEL_ATTRS = ("vocab_size", "hidden_dim", "n_layers", "n_heads", "max_seq_len")


def rounding_draws(attrs: dict, params: list[RecordedParam]) -> tuple[dict[str, tuple], dict[str, str]]:
    """Under stochastic rounding: per recorded parameter, the shapes of the parameters that training's optimizer
    stepped before it (``model.parameters()`` order, the embedding first: ``build_optimizer``), whose rounding
    bits the step drew first from the generator it seeded; and the recorded parameters whose draws cannot be
    known, each with why. Every parameter's shape follows from the recorded model settings."""
    missing = [key for key in MODEL_ATTRS if key not in attrs]
    model = None if missing else {key: int(attrs[key]) for key in MODEL_ATTRS}
    shapes = None if model is None else parameter_shapes(model)
    names = [] if shapes is None else list(shapes)
    before, not_replayed = {}, {}
    for param in params:
        if param.name == EMBEDDING:
            before[param.name] = ()
        elif shapes is None:
            not_replayed[param.name] = (
                "stochastic rounding draws its bits after those of every parameter stepped before it, whose sizes "
                f"follow from the model's settings; the recording lacks the attributes {', '.join(missing)}")
        elif tuple(shapes.get(param.name, ())) != tuple(param.shape):
            found = f"shape {list(shapes[param.name])}" if param.name in shapes else "no such parameter"
            not_replayed[param.name] = (
                f"stochastic rounding draws its bits after those of every parameter stepped before it, sized by the "
                f"model of the recorded settings ({model}), which has {found} where the recording has shape "
                f"{list(param.shape)}: the bits drawn before it are unknown")
        else:
            before[param.name] = tuple(shapes[name] for name in names[:names.index(param.name)])
    return before, not_replayed


#: the roles every rule records for each parameter, and the replay needs
REQUIRED_ROLES = ("W", GRADIENT, "momentum_W", "variance_W")


def check_roles(filename: str, params: list[RecordedParam]) -> None:
    """Every parameter records the roles the replay needs, and all the same ones (one rule recorded them all):
    else a DataError naming the file and the parameter."""
    first = params[0].roles()
    for param in params:
        roles = param.require_roles(filename, REQUIRED_ROLES, "the replay needs its value, gradient and both "
                                                              "moments")
        if set(roles) != set(first):
            raise DataError(f"{filename}: {param.name} records {', '.join(roles)}, {params[0].name} "
                            f"{', '.join(first)}; under one update rule every parameter records the same tensors")


def replay_recording(recording: str, output_csv: str, output_json: str, ratio_csv: str, device: str = "auto",
                     threads: int = 1, block_steps: int = BLOCK_STEPS) -> dict:
    """Replay every step of every recorded tensor of a recording (recording.h5, or the stream folder it was
    rechunked from), one tensor after the other; write the per-tensor, per-step table, the update-ratio
    histograms and a summary. A recording of thimble's own training is replayed under its update rule, one that
    ``thimble.Recorder`` made in another loop by torch's optimizer of its class (``thimble.analysis.torch_replay``)."""
    from thimble.record.reader import RecordingSource

    torch.set_num_threads(threads)
    source = RecordingSource.of_path(recording)
    with source.open() as handle, WorkerPool(threads) as pool:
        attrs = {key: (value.decode() if isinstance(value, bytes) else value) for key, value in handle.attrs.items()}
        if made_by_recorder(attrs):
            replayed = replay_recorder_recording(handle, attrs, device, block_steps, pool)
        else:
            replayed = replay_rule_recording(recording, handle, attrs, device, block_steps, pool)
    write_replay_outputs(output_csv, replayed.columns, replayed.rows, ratio_csv, replayed.ratio_rows, output_json,
                         replayed.summary, source.file, attrs)
    replayed.log_result(replayed.summary)
    return replayed.summary


def replay_rule_recording(recording: str, handle, attrs: dict, device: str, block_steps: int,
                          pool: WorkerPool) -> ReplayResult:
    """The replay of a recording of thimble's own training, under the update rule it was trained with."""
    rule = rule_of(attrs)
    if rule not in UPDATE_RULES:  # the recording's attribute, not the config: a file this version cannot replay
        raise DataError(f"{recording} was recorded under training.update_rule {rule!r}, which this version of "
                        f"thimble cannot replay (it knows {', '.join(UPDATE_RULES)}); replay it with the thimble "
                        f"version that recorded it (its git_commit attribute), or train it again")
    target = replay_device(device, str(attrs.get("device", "cpu")))
    params = recorded_params(handle)
    if rule == "stochastic_rounding":
        stepped_before, not_replayed = rounding_draws(attrs, params)
    else:
        stepped_before, not_replayed = {param.name: () for param in params}, {}
    replayable = [param for param in params if param.name not in not_replayed]
    if not replayable:
        reasons = "; ".join(f"{name}: {why}" for name, why in not_replayed.items()) or "it records no tensor"
        raise DataError(f"{recording}: no recorded tensor can be replayed ({reasons})")
    if rule == "bf16" and attrs.get("storage_dtype") == "float16":
        log.warning("%s stores float16 (record.dtype float16): the replay reads the stored values back as "
                    "bf16, so it reports mismatches wherever float16 altered them", recording)
    check_roles(handle.filename, replayable)
    steps = handle[replayable[0].roles()["W"]].shape[0] - 1
    replays: list[TensorReplay] = []
    with tqdm(total=steps * len(replayable), desc="replay" if rule == "bf16" else f"replay ({rule})",
              unit="step", mininterval=5) as bar:
        for param in replayable:
            if rule == "bf16":
                replay = Bf16Replay(param, attrs, target, block_steps, pool)
            else:
                replay = OtherRuleReplay(param, attrs, target, stepped_before[param.name])
            replay_tensor(handle, param, replay, steps, block_steps, pool, bar)
            replays.append(replay)
    kind = type(replays[0])
    return ReplayResult(replays[0].columns, [row for replay in replays for row in replay.rows],
                        [row for replay in replays for row in replay.ratio_rows()], kind.summary(replays, not_replayed),
                        kind.log_result)
