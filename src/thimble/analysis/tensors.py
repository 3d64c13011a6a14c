"""Every recorded tensor seen as the analyses see the embedding: rows x columns, and groups of rows.

The analyses were written for W, a (V, D) matrix whose rows are tokens in the dead, live and all groups. Any
recorded parameter of shape (r, *rest) is viewed as r rows of prod(rest) columns, a 1-D parameter of n values
as n rows of one (each value its own row), so that every per-row measure keeps its meaning ("a row is frozen":
every value of it unmoved). The embedding keeps its token groups; every other tensor is one group, ``all``.

A recording made by ``thimble.Recorder`` names the parameter its live and dead masks group (attribute
``token_groups_param``, empty when the loop gave none): that parameter takes the embedding's place. Each tensor is
counted in its own lattice (``stored_lattice``): bf16's, float16's or float32's, as it was stored.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from thimble.errors import DataError
from thimble.numerics.lattice import BF16_LATTICE, Lattice, lattice_named
from thimble.record.format import RecordedParam, RecordLayout, made_by_recorder
from thimble.sizes import EMBEDDING

#: the group every tensor has: all its rows
ALL = "all"


def row_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) of a parameter of ``shape``."""
    if len(shape) == 0:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def token_groups_param(attrs) -> str | None:
    """The parameter whose rows the recording's dead and live masks group: for a recorder's recording the one
    ``token_groups=`` was given for (None when none was), for thimble's own the embedding."""
    if made_by_recorder(attrs):
        return str(attrs.get("token_groups_param", "")) or None
    return EMBEDDING


def has_token_groups(name: str, grouped: str | None = EMBEDDING) -> bool:
    """Whether the tensor's rows are the ones the live and dead masks group (``grouped``, ``token_groups_param``:
    the embedding's tokens for thimble's own recordings)."""
    return grouped is not None and name == grouped


def row_groups(name: str, rows: int, dead_mask: np.ndarray | None,
               grouped: str | None = EMBEDDING) -> dict[str, np.ndarray]:
    """The groups of a tensor's rows as boolean masks: the grouped tensor's (the embedding's) ``dead``, ``live``
    and ``all`` (in the recording's ``dead_mask``), one group ``all`` for any other tensor."""
    if has_token_groups(name, grouped) and dead_mask is not None:
        dead = np.asarray(dead_mask, bool)
        if dead.shape != (rows,):
            raise ValueError(f"dead_mask has {dead.shape[0]} tokens, {name} {rows} rows")
        return {"dead": dead, "live": ~dead, ALL: np.ones(rows, bool)}
    return {ALL: np.ones(rows, bool)}


def grouped_first(params: list[RecordedParam], grouped: str | None) -> list[RecordedParam]:
    """The recorded parameters with the grouped one (the embedding) first, the others in the model's order."""
    return sorted(params, key=lambda param: not has_token_groups(param.name, grouped))  # stable


def stored_lattice(attrs, param: RecordedParam, key: str = "value") -> Lattice:
    """The lattice in which the analyses read a recorded parameter's dataset ``key``: its stored dtype's (bf16,
    float16 or float32), but bf16's for the seed's float16 storage, whose float16 values are bf16 values read
    back as bf16 (``thimble.record.reader.RecordedTensor``)."""
    if attrs.get("storage_dtype") == "float16":
        return BF16_LATTICE
    return lattice_named(param.dtypes[key])


def recorded_params(handle) -> list[RecordedParam]:
    """The recorded parameters of a recording (or a stream) in the model's order."""
    return list(RecordLayout.of_file(handle).params.values())


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """One recorded parameter's optimizer settings as each step t = 0..T used them (row 0: at attach).

    A recorder's recording holds them per step (its ``hyperparameters`` table: a scheduler may change lr at every
    step; ``param_steps``, ``param_stepped``); thimble's own hold the seed's constant attributes, and its
    optimizer steps every parameter at every step."""

    #: each numeric setting of the parameter's param group by the recorder's column name (``lr``, ``betas.0``,
    #: ``betas.1``, ``eps``, ``weight_decay``, flags as 0/1, ...), (T+1,) float64
    columns: dict[str, np.ndarray]
    #: (T+1,) the optimizer's step count of the parameter after step t, which its bias corrections use (NaN where
    #: the optimizer keeps none)
    counts: np.ndarray
    #: (T+1,) whether the optimizer stepped the parameter at step t (torch skips a parameter without a gradient)
    stepped: np.ndarray

    def get(self, key: str) -> np.ndarray | None:
        return self.columns.get(key)


#: the seed's attributes of AdamW's settings, by the recorder's column names
SEED_SETTINGS = {"lr": "learning_rate", "betas.0": "adam_beta1", "betas.1": "adam_beta2", "eps": "adam_epsilon",
                 "weight_decay": "weight_decay"}


def step_settings(handle, name: str) -> StepSettings:
    """The optimizer settings of the recorded parameter ``name`` at every step of the open recording ``handle``;
    a DataError naming the file and what is missing when the recording lacks them."""
    from thimble.record.format import read_checked

    attrs = handle.attrs
    n_steps = handle["losses"].shape[0]
    if not made_by_recorder(attrs):
        missing = [attr for attr in SEED_SETTINGS.values() if attr not in attrs]
        if missing:
            raise DataError(f"{handle.filename} has no attribute {', '.join(missing)}: AdamW's settings of the run")
        steps = np.arange(n_steps, dtype=np.float64)
        return StepSettings({key: np.full(n_steps, float(attrs[attr])) for key, attr in SEED_SETTINGS.items()},
                            steps, steps > 0)
    try:
        columns = json.loads(attrs["hyperparameter_columns"])
        groups = json.loads(attrs["param_groups"])
        names = json.loads(attrs["param_names"])
    except KeyError as error:
        raise DataError(f"{handle.filename} has no attribute {error.args[0]}, which a recording of "
                        f"thimble.Recorder holds; the file is not what the recorder wrote") from None
    group = next((index for index, entry in enumerate(groups) if name in entry["params"]), None)
    if group is None or name not in names:
        raise DataError(f"{handle.filename}: {name} is in no param group of its attribute param_groups")
    tables = {}
    for table in ("hyperparameters", "param_steps", "param_stepped"):
        if table not in handle:
            raise DataError(f"{handle.filename} has no {table} table, which a recording of thimble.Recorder holds")
        tables[table] = read_checked(handle[table])
    hyper = tables["hyperparameters"]
    if hyper.shape != (n_steps, len(groups), len(columns)):
        raise DataError(f"{handle.filename}:/hyperparameters has shape {hyper.shape}, expected ({n_steps}, "
                        f"{len(groups)}, {len(columns)}) (steps, param groups, hyperparameter_columns)")
    index = names.index(name)
    return StepSettings({column: hyper[:, group, position].astype(np.float64) for position, column in
                         enumerate(columns)}, tables["param_steps"][:, index].astype(np.float64),
                        tables["param_stepped"][:, index].astype(bool))
