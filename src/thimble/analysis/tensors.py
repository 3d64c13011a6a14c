"""Every recorded tensor seen as the analyses see the embedding: rows x columns, and groups of rows.

The analyses were written for W, a (V, D) matrix whose rows are tokens in the dead, live and all groups. Any
recorded parameter of shape (r, *rest) is viewed as r rows of prod(rest) columns, a 1-D parameter of n values
as n rows of one (each value its own row), so that every per-row measure keeps its meaning ("a row is frozen":
every value of it unmoved). The embedding keeps its token groups; every other tensor is one group, ``all``.
"""

from __future__ import annotations

import math

import numpy as np

from thimble.record.format import RecordedParam, RecordLayout
from thimble.sizes import EMBEDDING

#: the group every tensor has: all its rows
ALL = "all"


def row_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) of a parameter of ``shape``."""
    if len(shape) == 0:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def has_token_groups(name: str) -> bool:
    """Whether the tensor's rows are the vocabulary's tokens (the embedding), which the live and dead masks group."""
    return name == EMBEDDING


def row_groups(name: str, rows: int, dead_mask: np.ndarray | None) -> dict[str, np.ndarray]:
    """The groups of a tensor's rows as boolean masks: the embedding's ``dead``, ``live`` and ``all`` (in the
    recording's ``dead_mask``), one group ``all`` for any other tensor."""
    if has_token_groups(name) and dead_mask is not None:
        dead = np.asarray(dead_mask, bool)
        if dead.shape != (rows,):
            raise ValueError(f"dead_mask has {dead.shape[0]} tokens, {name} {rows} rows")
        return {"dead": dead, "live": ~dead, ALL: np.ones(rows, bool)}
    return {ALL: np.ones(rows, bool)}


def recorded_params(handle) -> list[RecordedParam]:
    """The recorded parameters of a recording (or a stream) in the model's order."""
    return list(RecordLayout.of_file(handle).params.values())
