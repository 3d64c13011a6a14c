"""The bitwise replay of a recording that ``thimble.Recorder`` made in any torch training loop.

Each recorded parameter's steps are recomputed by torch's own optimizer of the recorded class (``AdamW``,
``Adam``, ``SGD``), in the implementation the recording names for its param group (single_tensor, foreach or
fused, set explicitly, as torch resolved it when the run stepped), with the settings the group had at each step
(the ``hyperparameters`` table: the lr a scheduler set, betas, eps, weight decay, amsgrad, maximize, momentum,
dampening, Nesterov). One optimizer over one parameter of the recorded shape and dtype serves all steps of a
tensor: before step t it is loaded with the recorded value and state after step t-1 (``state['step']`` the
float32 tensor torch keeps, from ``param_steps``), given the recorded gradient of step t and its group's
settings of row t, and stepped. Its value, every state tensor and its step count are compared bit for bit with
the recording's row t.

State torch had not made yet before a step is left absent, as torch found it, not loaded as zeros: Adam's
moments before a parameter's first step of a fresh optimizer (its step count is NaN), SGD's momentum buffer
before a parameter's first step, whose first step copies the gradient (a zero buffer would be scaled by
1 - dampening instead). A step the optimizer skipped for a parameter (it had no gradient: ``param_stepped`` 0)
is not replayed: its value, state and step count must be those of the row before, which is checked.

One parameter's step can depend on the others of its group: torch's foreach SGD updates the momentum buffers of a
group by ``_foreach_mul_`` and ``_foreach_add_`` when every parameter stepped has one, and one tensor at a time by
``mul_`` and ``add_`` (which round a bf16 buffer differently) when one has none yet. Where the recording says
another parameter of the group was stepped without a buffer, the replay steps a companion parameter without one
beside the replayed parameter, so that torch takes the same path (``companion_steps``).

What cannot be replayed (another optimizer class, a state tensor the recording lacks, a tensor-valued setting, a
step torch refuses on the replay's device) is said in replay.json, for the recording or per tensor, and the stage
still succeeds.

The bf16 rule's freeze criterion (``thimble.training.adamw.pre_rounding_weight``) applies to a bf16 parameter that
Adam or AdamW steps with bf16 moments: the float32 weight that ``addcdiv_`` forms before rounding is computed with
each step's own lr, betas, eps and weight decay (Adam's L2 decay is inside the moments, so none is applied to the
weight) and step count, amsgrad dividing by ``max_exp_avg_sq``; a skipped step forms no update. Its predictions
are compared with the observed ΔW′ = 0 as for thimble's own runs, and the update-ratio histograms are written.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from thimble.analysis.replay_base import (
    CRITERION_RULE,
    GRADIENT,
    LISTED_DISAGREEMENTS,
    ReplayResult,
    TensorReplay,
    bits_view,
    explain,
    log_mismatches,
    replay_device,
    replay_environments,
    replay_tensor,
    same_lattice_point,
)
from thimble.analysis.replay_kernel import count_steps
from thimble.analysis.tensors import recorded_params, row_shape
from thimble.errors import DataError
from thimble.numerics.bf16 import torch_to_bits
from thimble.numerics.lattice import log2_ratio_floor, stays_from_ratio
from thimble.record.format import NATIVE_STORAGE, RECORDER, read_checked
from thimble.record.optimizer_tables import STEP_TABLES
from thimble.record.recorder import torch_dtype
from thimble.training.adamw import IMPLEMENTATIONS, pre_rounding_weight
from thimble.update_rules import STATE_KEYS

log = logging.getLogger(__name__)

#: the optimizer classes the replay recomputes, by the recording's ``optimizer_class``: torch's own
OPTIMIZERS = {"torch.optim.adamw.AdamW": "AdamW", "torch.optim.adam.Adam": "Adam", "torch.optim.sgd.SGD": "SGD"}
#: those that keep Adam's moments and a step count
ADAM_CLASSES = ("torch.optim.adamw.AdamW", "torch.optim.adam.Adam")
#: group settings not taken from the hyperparameters table: the table holds what the loop set (None: torch's
#: default), the recording's param_groups the implementation torch resolved, which the replay builds with
IMPLEMENTATION_FLAGS = ("foreach", "fused")
#: the recorded tensors of a parameter that are not optimizer state, and the state key of Adam's step count
VALUE, GRAD, STEP_COUNT = "value", "grad", "step"
#: the stored dtypes as torch's
#: replay.csv's columns besides the mismatch columns and the criterion's
STEPPED, OBSERVED, ELEMENTS = "stepped", "observed_frozen", "elements"
#: the count of Adam's state['step'] compared with param_steps (0 or 1 a row)
STEP_COUNT_COLUMN = "step_count_mismatches"
#: the criterion's columns, for tensors it applies to (empty for the others)
CRITERION_COLUMNS = ("replay_frozen", "predicted_frozen", "criterion_disagreements", "ties", "freeze_agreement")
#: elements whose value after a step differs from the same step replayed with weight_decay 0: what the decay did
#: (a tensor whose group decays at some step)
DECAY_COLUMN = "decay_changed"


class OptimizerRefused(Exception):
    """torch's optimizer raised on building or stepping a replayed parameter (a setting or dtype it does not
    take on the replay's device): the tensor is not replayed, and replay.json says why."""


@dataclass
class RecorderRun:
    """What a recorder's recording says of the optimizer that stepped it: its class, its param groups and their
    implementations, the settings of each group at each step, each parameter's step count and whether it was
    stepped."""

    filename: str
    optimizer: str
    implementation: str
    device: str
    initial_state: str
    columns: list[str]
    param_names: list[str]
    groups: list[dict]
    #: (T+1, G, K): row t = each group's settings as step t used them
    hyperparameters: np.ndarray
    #: (T+1, P): each parameter's state['step'] after step t (NaN: none)
    param_steps: np.ndarray
    #: (T+1, P): 1 where step t stepped the parameter
    param_stepped: np.ndarray

    @classmethod
    def of_file(cls, handle, attrs: dict) -> RecorderRun:
        missing = [f"attribute {key}" for key in ("optimizer_class", "hyperparameter_columns", "param_names",
                                                  "param_groups") if key not in attrs]
        missing += [f"table {name}" for name in STEP_TABLES if name not in handle]
        if missing:
            raise DataError(f"{handle.filename} says thimble.Recorder made it (attribute recorded_by) but has no "
                            f"{', '.join(missing)}; the file is not what the recorder wrote: record the run again")
        tables = {name: read_checked(handle[name]) for name in STEP_TABLES}
        run = cls(handle.filename, str(attrs["optimizer_class"]), str(attrs.get("optimizer_impl", "")),
                  str(attrs.get("device", "cpu")).split(",")[0], str(attrs.get("initial_state", "empty")),
                  json.loads(attrs["hyperparameter_columns"]), json.loads(attrs["param_names"]),
                  json.loads(attrs["param_groups"]), tables["hyperparameters"], tables["param_steps"],
                  tables["param_stepped"])
        run.check_tables(handle)
        return run

    def check_tables(self, handle) -> None:
        rows = len(self.hyperparameters)
        expected = {"hyperparameters": (rows, len(self.groups), len(self.columns)),
                    "param_steps": (rows, len(self.param_names)), "param_stepped": (rows, len(self.param_names))}
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise DataError(f"{self.filename}:/{name} has shape {getattr(self, name).shape}, not {shape} as its "
                                "steps, param_groups, hyperparameter_columns and param_names say; record the run again")
        if "losses" in handle and handle["losses"].shape[0] != rows:
            raise DataError(f"{self.filename}:/hyperparameters has {rows} rows, losses {handle['losses'].shape[0]}: "
                            "the tables cover other steps than the tensors; record the run again")

    @property
    def steps(self) -> int:
        return len(self.hyperparameters) - 1

    def first_stepped(self) -> np.ndarray:
        """(P,): the first step that stepped each parameter (T+1 where none did)."""
        stepped = self.param_stepped[1:].astype(bool)
        return np.where(stepped.any(axis=0), stepped.argmax(axis=0) + 1, self.steps + 1)

    def __post_init__(self):
        self._group_of = {name: index for index, group in enumerate(self.groups) for name in group.get("params", ())}

    def group_of(self, name: str) -> int | None:
        """The index of the param group that holds parameter ``name`` (None: none does)."""
        return self._group_of.get(name)

    def settings(self, group: int, defaults: dict) -> list[dict]:
        """The settings of param group ``group`` that the optimizer's step reads (the keys of its ``defaults``,
        less the implementation), at each row of the table, each in the type the loop gave it (bools as bools,
        an int kept an int, betas a tuple); an unset value (NaN) is None."""
        attach = self.groups[group].get("settings_at_attach", {})
        spec = []
        for index, column in enumerate(self.columns):
            key, _, entry = column.partition(".")
            if key in defaults and key not in IMPLEMENTATION_FLAGS:
                reference = attach.get(key, defaults[key])
                if entry:
                    reference = reference[int(entry)] if isinstance(reference, (list, tuple)) else None
                spec.append((key, entry, index, reference))
        found = []
        for row in self.hyperparameters[:, group]:
            settings: dict = {}
            for key, entry, index, reference in spec:
                value = setting_value(float(row[index]), reference)
                if entry:
                    settings.setdefault(key, []).append(value)
                else:
                    settings[key] = value
            found.append({key: tuple(value) if isinstance(value, list) else value for key, value in settings.items()})
        return found

    def tensor_valued(self, group: int, defaults: dict) -> list[str]:
        """Settings of the group that were tensors when the recorder attached: the table keeps their values,
        not the dtype and device the optimizer computed with (the recording's ``settings_at_attach`` keeps
        numbers only)."""
        attach = self.groups[group].get("settings_at_attach", {})
        keys = dict.fromkeys(column.partition(".")[0] for column in self.columns)
        return [key for key in keys if key in defaults and key not in IMPLEMENTATION_FLAGS and key not in attach]


def setting_value(value: float, reference):
    """A number of the hyperparameters table as the setting the loop gave (``reference``: its value at attach)."""
    if math.isnan(value):
        return None
    if isinstance(reference, bool):
        return bool(value)
    if isinstance(reference, int) and value.is_integer():
        return int(value)
    return value


@dataclass(frozen=True)
class TensorPlan:
    """How one recorded parameter is replayed."""

    name: str
    #: its column of param_steps and param_stepped
    column: int
    group: int
    implementation: str
    #: the optimizer state keys it records, in order
    state_keys: tuple[str, ...]
    #: Adam's state['step'] (SGD keeps none)
    keeps_count: bool
    #: why the bf16 freeze criterion does not apply to it; None where it does
    criterion_why: str | None


def expected_state(optimizer: str, settings: list[dict]) -> list[str]:
    """The state tensors torch's optimizer keeps for a parameter under the group's settings at these steps."""
    if optimizer in ADAM_CLASSES:
        return ["exp_avg", "exp_avg_sq", *(["max_exp_avg_sq"] if any(row.get("amsgrad") for row in settings)
                                           else [])]
    return ["momentum_buffer"] if any(row.get("momentum") for row in settings) else []


def buffers_absent(handle, run: RecorderRun, layout_params: dict) -> np.ndarray:
    """(T+1, P): True where a parameter has no momentum buffer before step t, as SGD, which keeps no step count,
    leaves it: none before the parameter's first step when it had none when the recorder attached. An
    optimizer that had stepped before (initial_state as_found) may have held one: its row 0 says so, the
    recorder storing zeros for none (a buffer of exact zeros everywhere reads as none)."""
    from thimble.record.reader import RecordedTensor

    at_attach = np.ones(len(run.param_names), dtype=bool)
    if run.initial_state != "empty":
        for column, name in enumerate(run.param_names):
            param = layout_params.get(name)
            if param is not None and "momentum_buffer" in param.paths:
                at_attach[column] = not RecordedTensor.of_recording(handle, param.paths["momentum_buffer"]).bits(
                    0, 1).any()
    steps = np.arange(run.steps + 1)[:, None]
    return at_attach[None, :] & (steps <= run.first_stepped()[None, :])


def companion_steps(run: RecorderRun, absent: np.ndarray, name: str, dtypes: dict[str, str]) -> np.ndarray:
    """(T+1,): the steps at which another parameter of the same param group and dtype as ``name`` was stepped
    without a momentum buffer. There torch's foreach SGD updates every buffer of the group one tensor at a time
    (``mul_``, ``add_``) instead of by ``_foreach_mul_`` and ``_foreach_add_``, which round differently: the
    replay then steps a companion parameter without a buffer beside the replayed one, so that torch takes the
    same path. (Only the recorded parameters are known: one the recording left out cannot be accounted for.)"""
    group = run.group_of(name)
    others = [column for column, other in enumerate(run.param_names) if other != name
              and run.group_of(other) == group and dtypes.get(other) == dtypes[name]]
    if not others:
        return np.zeros(run.steps + 1, dtype=bool)
    return (run.param_stepped[:, others].astype(bool) & absent[:, others]).any(axis=1)


def plan_tensor(run: RecorderRun, param, defaults: dict, settings_of: dict[int, list[dict]]) -> TensorPlan | str:
    """The replay of a recorded parameter, or why it cannot be replayed. ``settings_of``: each param group's
    settings at each row (``RecorderRun.settings``), filled as groups are met."""
    short = OPTIMIZERS[run.optimizer]
    if VALUE not in param.dtypes or GRAD not in param.dtypes:
        return f"it is recorded without its {'value' if VALUE not in param.dtypes else 'gradient'}"
    if param.name not in run.param_names:
        return "the recording's param_names do not name it, so its step counts and whether each step stepped it " \
               "are not recorded"
    group = run.group_of(param.name)
    if group is None:
        return "no param group of the recording's param_groups holds it"
    implementation = run.groups[group].get("implementation")
    if implementation not in IMPLEMENTATIONS:
        return f"its param group's implementation is {implementation!r}; torch's are {', '.join(IMPLEMENTATIONS)}"
    tensors = run.tensor_valued(group, defaults)
    if tensors:
        return (f"param group {group}'s {', '.join(tensors)} {'was a tensor' if len(tensors) == 1 else 'were tensors'}"
                " when the recorder attached: the recording keeps the value at each step, not the tensor's dtype "
                "and device the optimizer computed with")
    if group not in settings_of:
        settings_of[group] = run.settings(group, defaults)
    settings = settings_of[group][1:]
    expected = expected_state(run.optimizer, settings)
    # a 0-d parameter's step count has its shape, so the recorder keeps it as a tensor too; param_steps has it
    recorded = [key for key in param.dtypes if key not in (VALUE, GRAD, STEP_COUNT)]
    missing = [key for key in expected if key not in recorded]
    if missing:
        return f"the recording lacks its optimizer state {', '.join(missing)}, which torch's {short} keeps under the " \
               "recorded settings (the recorder keeps float tensors of the parameter's shape only)"
    extra = [key for key in recorded if key not in expected]
    if extra:
        return f"it records optimizer state {', '.join(extra)}, which torch's {short} does not keep under the " \
               "recorded settings"
    return TensorPlan(param.name, run.param_names.index(param.name), group, implementation, tuple(recorded),
                      run.optimizer in ADAM_CLASSES, criterion_why(run.optimizer, param, recorded, settings))


def criterion_why(optimizer: str, param, state_keys: list[str], settings: list[dict]) -> str | None:
    """Why the bf16 rule's freeze criterion does not apply to a parameter; None where it does."""
    if optimizer not in ADAM_CLASSES:
        return (f"the criterion predicts the round-to-nearest weight of Adam and AdamW (the float32 sum addcdiv_ "
                f"forms); torch's {OPTIMIZERS.get(optimizer, optimizer)} forms its update otherwise")
    if param.dtypes[VALUE] != "bfloat16":
        return f"it is {param.dtypes[VALUE]}: the criterion predicts rounding onto the bf16 lattice"
    other = {key: param.dtypes[key] for key in state_keys if param.dtypes[key] != "bfloat16"}
    if other:
        return (f"its state is {', '.join(f'{key} {dtype}' for key, dtype in other.items())}: the criterion follows "
                "the arithmetic of bf16 moments (denom rounded to bf16)")
    flags = sorted({key for row in settings for key in ("capturable", "differentiable") if row.get(key)})
    if flags:
        return f"its group steps with {', '.join(flags)}, whose update is tensor arithmetic the criterion does " \
               "not follow"
    return None


class OptimizerStepper:
    """torch's optimizer of the recorded class over one parameter of the recorded shape and dtype, stepped from
    any recorded step: built once (building one per step costs more than the step), its group's settings and
    the parameter's state replaced before each step."""

    def __init__(self, kind: type, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 implementation: str):
        self.param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        #: stepped beside the parameter, without state, where the run stepped another parameter that had none
        #: (``companion_steps``); its own results are not read
        self.companion = torch.nn.Parameter(torch.zeros(1, dtype=dtype, device=device))
        self.optimizer = kind([self.param, self.companion], foreach=implementation == "foreach",
                              fused=implementation == "fused")
        self.group = self.optimizer.param_groups[0]

    def step(self, value: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor] | None,
             count: float | None, settings: dict, companion: bool = False
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor], float | None]:
        """One step from ``value`` and ``state`` (None: the parameter has no state yet) with step count ``count``
        (None: none kept), given ``grad``, with the companion stepped beside it or not; returns the value, the
        state tensors and the step count after it (the optimizer's own tensors: read them before the next
        step)."""
        self.group.update(settings)
        self.optimizer.state.pop(self.companion, None)
        self.companion.grad = torch.zeros_like(self.companion) if companion else None
        with torch.no_grad():
            self.param.copy_(value)
        self.param.grad = grad
        held = self.optimizer.state[self.param]
        if state is None:
            held.clear()
        else:
            for key, before in state.items():
                current = held.get(key)
                if isinstance(current, torch.Tensor) and current.dtype == before.dtype:
                    current.copy_(before)
                else:
                    held[key] = before.clone()
            if count is not None:
                # where torch keeps the count: on the CPU, or on the parameter's device for fused and capturable
                device = self.param.device if self.group.get("fused") or self.group.get("capturable") else "cpu"
                held["step"] = torch.tensor(count, dtype=torch.float32, device=device)
        self.optimizer.step()
        after = self.optimizer.state[self.param]
        step = after.get("step")
        return self.param.detach(), {key: tensor for key, tensor in after.items() if key != "step"
                                     and isinstance(tensor, torch.Tensor)}, None if step is None else float(step)


def torch_of_bits(bits: np.ndarray, stored: str) -> torch.Tensor:
    """Stored bits as the torch tensor of the stored dtype they hold, without copying."""
    signed = np.int16 if bits.dtype.itemsize == 2 else np.int32
    return torch.from_numpy(np.ascontiguousarray(bits).view(signed)).view(torch_dtype(stored))


def count_mismatches(got: torch.Tensor | None, expected: torch.Tensor) -> int:
    """Elements whose bits differ; a state the optimizer does not hold is what the recorder stores for one
    (zeros)."""
    if got is None:
        return int(torch.count_nonzero(expected.view(bits_view(expected))))
    got = got.detach().cpu()
    if got.dtype != expected.dtype or got.shape != expected.shape:
        return expected.numel()
    return int((got.view(bits_view(got)) != expected.view(bits_view(expected))).sum())


def unmoved(before: np.ndarray, after: np.ndarray) -> int:
    """Elements whose stored bits did not change, ±0 as one value, of any float width."""
    magnitude = before.dtype.type((1 << (8 * before.dtype.itemsize - 1)) - 1)
    return int(np.count_nonzero((before == after) | (((before | after) & magnitude) == 0)))


def same_count(a: float | None, b: float) -> bool:
    """Step counts equal, or neither kept (NaN in the table)."""
    a = math.nan if a is None else a
    return (math.isnan(a) and math.isnan(b)) or a == b


class RecorderTensorReplay(TensorReplay):
    """The replay of one parameter of a recorder's recording, step by step through torch's optimizer of the
    recorded class, comparing its value, every state tensor and its step count bit for bit; under the criterion
    (``criterion_why`` None) the bf16 rule's counts too."""

    def __init__(self, param, plan: TensorPlan, run: RecorderRun, settings: list[dict], kind: type,
                 target: torch.device, absent: np.ndarray | None = None, companion: np.ndarray | None = None):
        """``absent``: (T+1,) where SGD's buffer is absent before step t (``buffers_absent``; Adam's count says
        it); ``companion``: (T+1,) the steps that need the stepper's companion (``companion_steps``)."""
        super().__init__(param)
        self.plan, self.run, self.settings, self.kind, self.target = plan, run, settings, kind, target
        self.stored = param.role_dtypes()
        roles = {key: role for role, key in ((role, STATE_KEYS.get(role, role)) for role in param.roles())}
        self.value_role = roles[VALUE]
        #: the roles compared after each step: the value, then the state, each with its state key
        self.compared = [(self.value_role, VALUE), *((roles[key], key) for key in plan.state_keys)]
        self.mismatch_columns = [f"{role}_mismatches" for role, _ in self.compared]
        if plan.keeps_count:
            self.mismatch_columns.append(STEP_COUNT_COLUMN)
        self.criterion_applies = plan.criterion_why is None
        #: whether the tensor's group decays at some step: each such step is replayed once more without the decay
        self.decays = any(step_settings.get("weight_decay") for step_settings in settings[1:])
        self.columns = ["tensor", "step", *self.mismatch_columns, STEPPED, OBSERVED,
                        *(CRITERION_COLUMNS if self.criterion_applies else ()),
                        *((DECAY_COLUMN,) if self.decays else ()), ELEMENTS]
        self.decay_changed = 0
        if self.criterion_applies:
            moment = "max_exp_avg_sq" if "max_exp_avg_sq" in plan.state_keys else "exp_avg_sq"
            self.criterion_roles = (self.value_role, roles["exp_avg"], roles[moment])
        self.skipped = 0
        self.stepper: OptimizerStepper | None = None
        self.absent, self.companion = absent, companion
        self.histograms: list[np.ndarray] = []
        self.listed: list[dict] = []
        self.disagreements = self.ties = 0

    def block(self, first: int, recorded: dict[str, np.ndarray]) -> None:
        """Replay steps first.. of ``recorded_block`` one at a time, and compare each recorded tensor."""
        values = {role: torch_of_bits(bits, self.stored[role]) for role, bits in recorded.items()}
        grads = values[GRADIENT]
        criterion = self.criterion_block(len(grads)) if self.criterion_applies else None
        column = self.plan.column
        for index, step in enumerate(range(first, first + len(grads))):
            stepped = bool(self.run.param_stepped[step, column])
            count_before, count_recorded = (float(x) for x in self.run.param_steps[step - 1: step + 1, column])
            if stepped:
                replayed, count_after = self.step(step, index, values, grads[index], count_before)
            else:
                self.skipped += 1
                replayed = {role: values[role][index] for role, _ in self.compared}
                count_after = count_before
            row = {"tensor": self.name, "step": step}
            for role, _ in self.compared:
                row[f"{role}_mismatches"] = count_mismatches(replayed[role], values[role][index + 1])
            if self.plan.keeps_count:
                row[STEP_COUNT_COLUMN] = int(not same_count(count_after, count_recorded))
            w_bits = recorded[self.value_role]
            row[STEPPED] = int(stepped)
            row[OBSERVED] = unmoved(w_bits[index], w_bits[index + 1])
            row[ELEMENTS] = self.elements
            if criterion is not None:
                self.criterion_step(criterion, index, step, stepped, values, replayed,
                                    count_recorded if not math.isnan(count_recorded) else count_after)
            if self.decays:
                # last: the replay without decay reuses the optimizer whose tensors ``replayed`` holds
                row[DECAY_COLUMN] = self.decay_effect(step, index, values, grads[index], count_before) \
                    if stepped and self.settings[step].get("weight_decay") else 0
                self.decay_changed += row[DECAY_COLUMN]
            self.rows.append(row)
        if criterion is not None:
            self.count_criterion(first, recorded, criterion)

    def decay_effect(self, step: int, index: int, values: dict[str, torch.Tensor], grad: torch.Tensor,
                     count_before: float) -> int:
        """Elements of the recorded value after ``step`` that the same step without weight decay would leave
        elsewhere: where the decay changed the weight (0 where rounding threw the decay term away)."""
        without, _ = self.step(step, index, values, grad, count_before, {"weight_decay": 0.0})
        return count_mismatches(without[self.value_role], values[self.value_role][index + 1])

    def step(self, step: int, index: int, values: dict[str, torch.Tensor], grad: torch.Tensor,
             count_before: float, changed: dict | None = None) -> tuple[dict[str, torch.Tensor | None], float | None]:
        """Step ``step`` through torch's optimizer: the recorded value and state of row step-1 (or no state where
        torch had none), the recorded gradient, the group's settings of row ``step`` (with ``changed``'s)."""
        if self.plan.keeps_count:
            absent = math.isnan(count_before)
        else:
            absent = self.absent is not None and bool(self.absent[step])
        state = None if absent else {key: values[role][index].to(self.target) for role, key in self.compared[1:]}
        try:
            if self.stepper is None:
                self.stepper = OptimizerStepper(self.kind, self.shape, torch_dtype(self.stored[self.value_role]),
                                                self.target, self.plan.implementation)
            value, state_after, count_after = self.stepper.step(
                values[self.value_role][index].to(self.target), grad.to(self.target, copy=True), state,
                None if absent or not self.plan.keeps_count else count_before,
                {**self.settings[step], **(changed or {})}, self.companion is not None and bool(self.companion[step]))
        except (RuntimeError, ValueError, TypeError) as error:
            raise OptimizerRefused(f"torch's {OPTIMIZERS[self.run.optimizer]} ({self.plan.implementation}, on "
                                   f"{self.target}) raised at step {step}: {error}") from error
        return {self.value_role: value, **{role: state_after.get(key) for role, key in self.compared[1:]}}, \
            count_after

    # -- the bf16 rule's freeze criterion -----------------------------------------------------------

    def criterion_block(self, steps: int) -> dict[str, np.ndarray]:
        """Buffers of a block's replayed W, m, v bits and the criterion's float32 weights."""
        buffers = {role: np.empty((steps, *self.shape), dtype=np.uint16) for role in self.criterion_roles}
        buffers["pre_rounding"] = np.empty((steps, *self.shape), dtype=np.float32)
        return buffers

    def criterion_step(self, buffers: dict[str, np.ndarray], index: int, step: int, stepped: bool,
                       values: dict[str, torch.Tensor], replayed: dict, count: float | None) -> None:
        """The replayed bits and the float32 weight before rounding of one step: what addcdiv_ forms from the
        recorded W of t-1 and the moments of t with the step's settings; no update where the step skipped it."""
        for role in self.criterion_roles:
            got = replayed[role]
            buffers[role][index] = torch_to_bits(got.detach().cpu()) if got is not None else 0
        w_before = values[self.value_role][index: index + 1]
        if not stepped or count is None:
            buffers["pre_rounding"][index] = w_before.float().numpy()[0]
            return
        settings = self.settings[step]
        decoupled = self.run.optimizer == "torch.optim.adamw.AdamW" or settings.get("decoupled_weight_decay")
        hyper = {"lr": settings["lr"], "betas": settings["betas"], "eps": settings["eps"],
                 # Adam's L2 decay went into the gradient, so into the moments: none on the weight
                 "weight_decay": settings["weight_decay"] if decoupled else 0.0}
        _, m_role, v_role = self.criterion_roles
        pre = pre_rounding_weight(w_before, values[m_role][index + 1: index + 2], values[v_role][index + 1: index + 2],
                                  torch.tensor([count], dtype=torch.float64), hyper)
        buffers["pre_rounding"][index] = pre.numpy()[0]

    def count_criterion(self, first: int, recorded: dict[str, np.ndarray], buffers: dict[str, np.ndarray]) -> None:
        """The criterion's counts of a block (the compiled pass of the bf16 rule's replay) into its rows, its
        ratio histograms, and the first disagreements listed."""
        w_role, m_role, v_role = self.criterion_roles
        counted, histograms = count_steps(recorded[w_role], recorded[m_role], recorded[v_role],
                                          tuple(buffers[role] for role in self.criterion_roles),
                                          buffers["pre_rounding"])
        rows = self.rows[-len(histograms):]
        for index, row in enumerate(rows):
            for column in CRITERION_COLUMNS[:-1]:
                row[column] = int(counted[column][index])
            row["freeze_agreement"] = 1 - row["criterion_disagreements"] / self.elements
        self.histograms.extend(histograms)
        self.disagreements += int(counted["criterion_disagreements"].sum())
        self.ties += int(counted["ties"].sum())
        for index in np.flatnonzero(counted["criterion_disagreements"]).tolist():
            if len(self.listed) >= LISTED_DISAGREEMENTS:
                break
            self.list_disagreements(first + index, recorded[w_role][index: index + 2], buffers[w_role][index],
                                    buffers["pre_rounding"][index])

    def list_disagreements(self, step: int, w: np.ndarray, replayed_w: np.ndarray, pre_rounding: np.ndarray) -> None:
        """The elements of one step where the criterion and the recording disagree, by row and column."""
        w, replayed_w, pre_rounding = w.reshape(2, -1), replayed_w.reshape(-1), pre_rounding.reshape(-1)
        log2_floor, tie = log2_ratio_floor(w[0], pre_rounding)
        predicted = stays_from_ratio(w[0], log2_floor, tie)
        observed = same_lattice_point(w[1], w[0])
        values = torch_of_bits(w, "bfloat16")
        columns = row_shape(self.shape)[1]
        for flat in np.flatnonzero(predicted != observed)[:LISTED_DISAGREEMENTS - len(self.listed)].tolist():
            self.listed.append({
                "tensor": self.name, "step": step, "element": list(divmod(flat, columns)),
                "w_before": float(values[0, flat]), "w_after": float(values[1, flat]),
                "pre_rounding_weight": float(pre_rounding[flat]), "predicted_frozen": bool(predicted[flat]),
                "observed_frozen": bool(observed[flat]),
                "reason": explain(bool(replayed_w[flat] != w[1, flat]), NATIVE_STORAGE, self.plan.implementation),
            })

    def criterion(self) -> dict:
        observed = int(sum(row[OBSERVED] for row in self.rows))
        if not self.criterion_applies:
            return {"applies": False, "why": self.plan.criterion_why, "observed_frozen": observed}
        elements = len(self.rows) * self.elements
        return {"applies": True, "elements": elements, "disagreements": self.disagreements,
                "agreement": 1 - self.disagreements / elements if elements else None,
                "ties_at_half_spacing": self.ties,
                "predicted_frozen": int(sum(row["predicted_frozen"] for row in self.rows)),
                "observed_frozen": observed, "listed": self.listed}

    def ratio_rows(self) -> list[list]:
        """update_ratio.csv's rows of this tensor where the criterion applies: tensor, step, the bins' counts."""
        return [[self.name, row["step"], *counts.tolist()] for row, counts in zip(self.rows, self.histograms)]

    def tensor_summary(self) -> dict:
        return {"replayed": True, "implementation": self.plan.implementation, "param_group": self.plan.group,
                "dtypes": {role: self.stored[role] for role, _ in self.compared}, **super().tensor_summary(),
                "skipped_steps": self.skipped, "weight_decay": self.decay_summary()}

    def decay_summary(self) -> dict:
        """What the weight decay did to the tensor: the element-steps it changed, of those it applied to."""
        if not self.decays:
            return {"applies": False}
        decayed = sum(1 for row in self.rows if row[STEPPED] and self.settings[row["step"]].get("weight_decay"))
        elements = decayed * self.elements
        return {"applies": True, "decayed_steps": decayed, "element_steps": elements,
                "changed": self.decay_changed, "changed_share": self.decay_changed / elements if elements else None}


def log_recorder_result(summary: dict) -> None:
    """Whether the replay matched, where it did not, why what was not replayed was not, the criterion's count."""
    if not summary["replayed"]:
        log.warning("the replay does not recompute %s: %s", summary["optimizer"], summary["why"])
        return
    where = f"{OPTIMIZERS[summary['optimizer']]} {summary['optimizer_impl']} on {summary['replayed_on']['device']}"
    if summary["bitwise_match"]:
        log.info("replay (%s) matches the recording bit for bit at all %d steps of %d tensors (%d parameter "
                 "steps skipped by the optimizer, each unchanged)", where, summary["steps"],
                 len(summary["tensors"]), summary["skipped_steps"])
    else:
        log.warning("replay (%s) differs from the recording: %s over %d steps with mismatches (replayed on %s, "
                    "recorded on %s)", where, summary["total_mismatches"], summary["steps_with_mismatches"],
                    summary["replayed_on"], summary["recorded_on"])
    log_mismatches(summary)
    criterion = summary["freeze_criterion"]
    if criterion["applies"]:
        log.info("freeze criterion vs observed ΔW′ = 0 (%d tensors): %d disagreements in %d elements (%d ties at "
                 "exactly half a spacing, resolved by rounding)", len(criterion["tensors"]),
                 criterion["disagreements"], criterion["elements"], criterion["ties_at_half_spacing"])


def union(lists) -> list[str]:
    return list(dict.fromkeys(item for items in lists for item in items))


def replay_recorder_recording(handle, attrs: dict, device: str, block_steps: int, pool) -> ReplayResult:
    """Replay every recorded parameter of a recorder's recording (the file open as ``handle``) one after the
    other on ``device`` (``auto``: the recording's device type where this machine has it)."""
    run = RecorderRun.of_file(handle, attrs)
    params = recorded_params(handle)
    target = replay_device(device, run.device)
    replays: list[RecorderTensorReplay] = []
    not_replayed: dict[str, str] = {}
    why = None
    if run.optimizer not in OPTIMIZERS:
        why = (f"the recording's optimizer is {run.optimizer}; the replay recomputes torch's own "
               f"{', '.join(OPTIMIZERS.values())} (torch.optim) only: another class's step is code the recording "
               "does not hold. Its recorded tensors are analysed all the same")
        not_replayed = {param.name: f"its optimizer, {run.optimizer}, is not one the replay recomputes"
                        for param in params}
    else:
        kind = getattr(torch.optim, OPTIMIZERS[run.optimizer])
        defaults = kind([torch.nn.Parameter(torch.zeros(1))]).defaults
        settings: dict[int, list[dict]] = {}
        plans = {}
        for param in params:
            plan = plan_tensor(run, param, defaults, settings)
            if isinstance(plan, str):
                not_replayed[param.name] = plan
            else:
                plans[param.name] = plan
        layout = {param.name: param for param in params}
        dtypes = {param.name: param.dtypes.get(VALUE) for param in params}
        absent = buffers_absent(handle, run, layout) if run.optimizer not in ADAM_CLASSES else None
        with tqdm(total=run.steps * len(plans), desc=f"replay ({OPTIMIZERS[run.optimizer]})", unit="step",
                  mininterval=5) as bar:
            for param in params:
                if param.name not in plans:
                    continue
                plan = plans[param.name]
                companion = companion_steps(run, absent, param.name, dtypes) \
                    if absent is not None and plan.implementation == "foreach" and plan.state_keys else None
                replay = RecorderTensorReplay(param, plan, run, settings[plan.group], kind, target,
                                              None if absent is None else absent[:, plan.column], companion)
                try:
                    replay_tensor(handle, param, replay, run.steps, block_steps, pool, bar)
                except OptimizerRefused as refused:
                    not_replayed[param.name] = str(refused)
                    continue
                replays.append(replay)
        if not replays:
            why = f"no recorded tensor of {run.optimizer} can be replayed: {'; '.join(union([not_replayed.values()]))}"
    return ReplayResult(recorder_columns(replays), [row for replay in replays for row in replay.rows],
                        [row for replay in replays for row in replay.ratio_rows()],
                        recorder_summary(run, attrs, target, replays, not_replayed, why), log_recorder_result)


def recorder_columns(replays: list[RecorderTensorReplay]) -> list[str]:
    """replay.csv's columns: every replayed tensor's (a column a tensor lacks is left empty in its rows)."""
    mismatches = union(replay.mismatch_columns for replay in replays)
    criterion = list(CRITERION_COLUMNS) if any(replay.criterion_applies for replay in replays) else []
    decay = [DECAY_COLUMN] if any(replay.decays for replay in replays) else []
    return ["tensor", "step", *mismatches, STEPPED, OBSERVED, *criterion, *decay, ELEMENTS]


def varying_settings(run: RecorderRun) -> dict[str, dict]:
    """The hyperparameter columns that change over the recorded steps (a scheduler's lr), each with its first
    and last value and range over steps 1..T (of the first group that varies)."""
    varying = {}
    for index, column in enumerate(run.columns):
        for group in range(len(run.groups)):
            values = run.hyperparameters[1:, group, index]
            if len(values) and not np.array_equal(values, np.full_like(values, values[0]), equal_nan=True):
                varying[column] = {"param_group": group, "first": float(values[0]), "last": float(values[-1]),
                                   "min": float(np.nanmin(values)), "max": float(np.nanmax(values))}
                break
    return varying


def recorder_summary(run: RecorderRun, attrs: dict, target: torch.device, replays: list[RecorderTensorReplay],
                     not_replayed: dict[str, str], why: str | None) -> dict:
    """replay.json of a recorder's recording: which optimizer, whether and where it was replayed, the mismatch
    totals over every replayed tensor, the freeze criterion's account, each tensor's summary, and each tensor
    not replayed with why."""
    columns = union(replay.mismatch_columns for replay in replays)
    rows = [row for replay in replays for row in replay.rows]
    totals = {column: int(sum(row.get(column, 0) for row in rows)) for column in columns}
    mismatched = {row["step"] for row in rows if any(row.get(column, 0) for column in columns)}
    where = replay_environments({**attrs, "device": run.device}, target, run.implementation)
    summary = {
        "recorded_by": RECORDER, "optimizer": run.optimizer, "optimizer_impl": run.implementation,
        "replayed": bool(replays), **({"why": why} if why else {}),
        "steps": run.steps, "storage_dtype": attrs.get("storage_dtype"), "initial_state": run.initial_state,
        "hyperparameter_columns": run.columns, "varying_hyperparameters": varying_settings(run), **where,
        "total_mismatches": totals, "steps_with_mismatches": len(mismatched),
        "bitwise_match": (not any(totals.values())) if replays else None,
        "skipped_steps": sum(replay.skipped for replay in replays),
        "freeze_criterion": freeze_criterion(replays, why),
        "weight_decay": weight_decay_summary(replays),
        "tensors": {replay.name: replay.tensor_summary() for replay in replays}, "not_replayed": not_replayed,
    }
    notes = kernel_notes(run, replays, str(attrs.get("torch_version")))
    if notes:
        summary["kernel_notes"] = notes
    if replays and not where["same_device"]:
        summary["note"] = (f"recorded on {where['recorded_on']['device']}, replayed on "
                           f"{where['replayed_on']['device']}: a cross-device replay; mismatches are expected "
                           "where the kernels round differently")
    return summary


def weight_decay_summary(replays: list[RecorderTensorReplay]) -> dict:
    """Over every tensor whose group decays: the element-steps whose value the decay changed (each step replayed
    once more with weight_decay 0), against those it applied to."""
    decaying = [replay.decay_summary() for replay in replays if replay.decays]
    if not decaying:
        return {"applies": False, "why": "no replayed tensor's group has a weight decay"}
    elements = sum(summary["element_steps"] for summary in decaying)
    changed = sum(summary["changed"] for summary in decaying)
    return {"applies": True, "measure": DECAY_COLUMN + ": elements whose value after the step differs from the "
                                        "same step replayed with weight_decay 0",
            "element_steps": elements, "changed": changed, "changed_share": changed / elements if elements else None}


def kernel_notes(run: RecorderRun, replays: list[RecorderTensorReplay], torch_version: str) -> list[str]:
    """What a known fault of the kernel that trained the run means for its replay and its freezing."""
    faulty = [replay.name for replay in replays if run.optimizer == "torch.optim.sgd.SGD"
              and replay.plan.implementation == "fused" and torch.device(run.device).type == "cpu"
              and replay.stored[replay.value_role] in ("bfloat16", "float16")]
    if not faulty:
        return []
    return [f"torch's fused SGD on the CPU for bfloat16 and float16 parameters (seen with torch 2.13; this run's is "
            f"{torch_version}) skips the "
            "update of every full SIMD block of a parameter and can write stray values into its momentum buffer: "
            "the replay runs the same kernel, so the weights match (unmoved, as in training), and stray values that "
            "differ between the run and the replay are counted as mismatches. Where "
            f"{', '.join(faulty[:5])}{', ...' if len(faulty) > 5 else ''} do not move, that may be the kernel's "
            "skipped update, not the lattice"]


def freeze_criterion(replays: list[RecorderTensorReplay], why: str | None) -> dict:
    """The bf16 rule's criterion over the tensors it applies to, or why it applies to none."""
    applied = [replay for replay in replays if replay.criterion_applies]
    if not applied:
        reasons = union([[replay.plan.criterion_why] for replay in replays]) or [why or "no tensor was replayed"]
        return {"applies": False, "why": "; ".join(reasons)}
    criteria = [replay.criterion() for replay in applied]
    elements, disagreements = sum(c["elements"] for c in criteria), sum(c["disagreements"] for c in criteria)
    return {"applies": True, "rule": CRITERION_RULE,
            "hyperparameters": "each step's own lr, betas, eps and weight decay (the hyperparameters table) and "
                               "the parameter's step count (param_steps)",
            "tensors": [replay.name for replay in applied],
            "not_applied": {replay.name: replay.plan.criterion_why for replay in replays
                            if not replay.criterion_applies},
            "elements": elements, "disagreements": disagreements,
            "agreement": 1 - disagreements / elements if elements else None,
            "ties_at_half_spacing": sum(c["ties_at_half_spacing"] for c in criteria),
            "listed": [listed for c in criteria for listed in c["listed"]][:LISTED_DISAGREEMENTS]}
