"""What a recording says about the optimizer that made it: per step, each param group's hyperparameters, each
recorded parameter's optimizer step count and whether the step touched it; once, the optimizer's class, its
param groups and the parameters' names and dtypes.

Every recording carries these, whoever drove the loop: ``thimble.Recorder`` on a user's optimizer and
``thimble train`` on the update rule's. The tables (``STEP_TABLES``) are small per-step arrays stored beside the
tensors (``thimble.record.writer.StreamRecorder``'s step tables):

- ``hyperparameters`` (T+1, groups, columns) float64: each group's numeric settings as step t used them (row 0:
  when recording began); ``hyperparameter_columns`` names the columns (``lr``, ``betas.0``, ``betas.1``, ``eps``,
  ``weight_decay``, ...; flags 0/1, an unset value NaN);
- ``param_steps`` (T+1, parameters) float64: the optimizer's ``state["step"]`` of each recorded parameter after
  step t (NaN where it keeps none);
- ``param_stepped`` (T+1, parameters) uint8: 1 where step t updated the parameter (torch skips one without a
  gradient).
"""

from __future__ import annotations

import json
import math
import numbers

import numpy as np

#: the per-step tables of a recording
STEP_TABLES = ("hyperparameters", "param_steps", "param_stepped")


def optimizer_class_name(optimizer) -> str:
    """The optimizer's class as ``module.QualName`` (``torch.optim.adamw.AdamW``)."""
    kind = type(optimizer)
    return f"{kind.__module__}.{kind.__qualname__}"


def group_implementation(group: dict, params: list) -> str:
    """How torch runs a param group's step: ``fused``, ``foreach`` or ``single_tensor``, as the optimizer resolves
    an unset ``foreach``/``fused`` for these parameters (torch's own default)."""
    if group.get("fused"):
        return "fused"
    foreach = group.get("foreach")
    if foreach is None and "foreach" in group:
        from torch.optim.optimizer import _default_to_fused_or_foreach

        _, foreach = _default_to_fused_or_foreach(params, bool(group.get("differentiable", False)), use_fused=False)
    return "foreach" if foreach else "single_tensor"


def _is_number(value) -> bool:
    if isinstance(value, (bool, numbers.Real)):
        return True
    return hasattr(value, "numel") and value.numel() == 1  # a tensor lr


def as_float(value) -> float:
    """A number, a one-element tensor or None (NaN) as a float."""
    if value is None:
        return math.nan
    if hasattr(value, "item"):
        return float(value.item())
    return float(value)


def numeric_entries(key: str, value):
    """The columns of one group setting: a number or flag as itself, a tuple of numbers one column per entry."""
    if isinstance(value, (tuple, list)):
        if all(_is_number(item) for item in value):
            for index, item in enumerate(value):
                yield f"{key}.{index}", item
        return
    if value is None or _is_number(value):
        yield key, value


class OptimizerTables:
    """The tables and attributes of an optimizer stepping ``params`` (recorded name: the tensor the optimizer
    steps, in the recording's order)."""

    def __init__(self, optimizer, params: dict):
        self.optimizer, self.params = optimizer, params
        # the groups when recording began (a group added later is not in the tables: the recorder refuses it)
        self.groups = list(optimizer.param_groups)
        index = {id(param): name for name, param in params.items()}
        self.group_of: dict[str, int] = {}
        for number, group in enumerate(self.groups):
            for param in group["params"]:
                if id(param) in index:
                    self.group_of[index[id(param)]] = number
        self.missing = [name for name in params if name not in self.group_of]
        self.columns: list[str] = []
        for group in self.groups:
            for key, value in group.items():
                if key != "params":
                    self.columns.extend(column for column, _ in numeric_entries(key, value)
                                        if column not in self.columns)
        self._column_of = {column: index for index, column in enumerate(self.columns)}
        self.implementations: list[str] | None = None

    def specs(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """The tables as ``StreamRecorder`` takes them: dtype and the shape of a step's row."""
        return {"hyperparameters": (np.dtype(np.float64), (len(self.groups), len(self.columns))),
                "param_steps": (np.dtype(np.float64), (len(self.params),)),
                "param_stepped": (np.dtype(np.uint8), (len(self.params),))}

    def hyperparameters(self) -> np.ndarray:
        """Each group's settings now: the row of the step about to run."""
        if self.implementations is None:
            self.implementations = [group_implementation(group, list(group["params"])) for group in self.groups]
        row = np.full((len(self.groups), len(self.columns)), np.nan)
        for number, group in enumerate(self.groups):
            for key, value in group.items():
                if key != "params":
                    for column, item in numeric_entries(key, value):
                        # a setting the optimizer adds to its groups later (optimi's step count) has no column
                        if column in self._column_of:
                            row[number, self._column_of[column]] = as_float(item)
        return row

    def steps(self) -> np.ndarray:
        """Each parameter's optimizer step count now (NaN where the optimizer keeps none)."""
        return np.array([as_float(self.optimizer.state.get(param, {}).get("step")) for param in self.params.values()],
                        dtype=np.float64)

    def rows(self, hyperparameters: np.ndarray, stepped, steps: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """One step's rows: the hyperparameters it used, the step counts after it (read from the optimizer's state
        unless ``steps`` gives them), which parameters it updated."""
        return {"hyperparameters": hyperparameters, "param_steps": self.steps() if steps is None else steps,
                "param_stepped": np.asarray(stepped, dtype=np.uint8)}

    def attrs(self, dtypes: dict[str, str]) -> dict:
        """The recording's attributes of the optimizer: its class and implementation, its param groups (each
        with its recorded parameters, implementation and settings when recording began (``settings_at_attach``)), the table's columns,
        the recorded parameters' names and ``dtypes``."""
        implementations = self.implementations or [None] * len(self.groups)
        groups = []
        for number, group in enumerate(self.groups):
            # plain values only (a tensor lr or betas is in the table, per step)
            settings = {key: list(value) if isinstance(value, tuple) else value for key, value in group.items()
                        if key != "params" and (value is None or isinstance(value, (bool, int, float, str))
                                                or (isinstance(value, (tuple, list))
                                                    and all(isinstance(v, (bool, int, float)) for v in value)))}
            groups.append({"params": [name for name in self.params if self.group_of.get(name) == number],
                           "implementation": implementations[number], "settings_at_attach": settings})
        used = sorted({groups[self.group_of[name]]["implementation"] for name in self.params
                       if name in self.group_of and groups[self.group_of[name]]["implementation"]})
        return {"optimizer_class": optimizer_class_name(self.optimizer),
                "optimizer_impl": ",".join(used) if used else "unknown",
                "param_groups": json.dumps(groups), "hyperparameter_columns": json.dumps(self.columns),
                "param_names": json.dumps(list(self.params)), "param_dtypes": json.dumps(dtypes)}
