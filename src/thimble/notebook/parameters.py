"""A run's recorded parameters: ``run.param("transformer.h.0.attn.c_attn.weight").value[10:20]``.

A recording holds, for each parameter that ``record.tensors`` selected, its value, its gradient and the
optimizer's state at every step (``thimble.record.format``: ``params/<name>/value``, ``grad``, ``exp_avg``, ...;
a file written before that layout holds the embedding alone, under the seed's names). ``RecordedSeries`` serves
each stored dataset as one ``StepSeries`` (so the embedding's value is the same series whether it is asked for as
``run.W`` or as ``run.param("transformer.wte.weight").value``, and its chunks are cached once); ``Parameter``
is one parameter's view of them.

The embedding's axes are (step, token, dim) and its series keep the seed's names (W, grad_W, ...); any other
parameter's axes are (step, row, column), as the analyses view every tensor, and its series are named
``<parameter>/<key>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import h5py

from thimble.errors import ThimbleError
from thimble.notebook.chunk_cache import ChunkCache
from thimble.notebook.step_series import EMBEDDING_AXES, StepSeries, parameter_axes
from thimble.record.format import RecordedParam, RecordLayout, check_recorded_dataset, stream_tensors
from thimble.sizes import EMBEDDING, parameter_shapes
from thimble.update_rules import SEED_NAMES, STATE_KEYS, rule_of

if TYPE_CHECKING:
    import torch

#: the keys every recorded parameter has beside its optimizer state
VALUE, GRAD = "value", "grad"


class NotRecordedError(ThimbleError, KeyError, AttributeError):
    """A parameter or tensor the recording does not hold; the message lists what it holds and how to record more.

    A KeyError (the run's lookups by name) and an AttributeError (``run.W`` of a run without the embedding:
    ``hasattr`` is False)."""

    def __str__(self) -> str:  # KeyError's own would show the message quoted, as a key
        return str(self.args[0])


def parameter_axes_of(name: str, ndim: int) -> tuple[str, ...]:
    """The names of parameter ``name``'s axes after the step: the embedding's (token, dim), another's rows and
    columns."""
    return EMBEDDING_AXES if name == EMBEDDING else parameter_axes(ndim)


def series_name(param: str, key: str) -> str:
    """How a series names itself (in its repr and errors): the seed's names for the embedding (W, grad_W, ...),
    ``<parameter>/<key>`` for any other."""
    return SEED_NAMES[key] if param == EMBEDDING else f"{param}/{key}"


def model_parameters(attrs) -> list[str] | None:
    """The names of the model's parameters, from a recording's model attributes; None when it lacks them."""
    try:
        model = {key: int(attrs[key]) for key in ("vocab_size", "hidden_dim", "max_seq_len", "n_layers")}
    except KeyError:
        return None
    return list(parameter_shapes(model))


class RecordedSeries(Mapping[str, StepSeries]):
    """Every per-step tensor of a recording, each a ``StepSeries`` made when first asked for, all read through
    one ``ChunkCache``: any recorded parameter's by (parameter, key) with ``series``, and, as a mapping, the
    embedding's by the seed's names (W, grad_W, momentum_W, variance_W; under other update rules their own,
    e.g. master_W)."""

    def __init__(self, recording: h5py.File, cache: ChunkCache):
        self._recording, self._cache = recording, cache
        #: the recorded parameters in the model's order, and where each one's datasets are
        self.layout = RecordLayout.of_file(recording)
        #: the embedding's recorded tensors by the seed's names and their stored dtypes (float32 state under
        #: fp32_master); empty when the embedding is not recorded
        self.stored_dtypes = stream_tensors(recording)
        self._series: dict[str, StepSeries] = {}

    @property
    def filename(self) -> str:
        return self._recording.filename

    def recorded(self, name: str) -> RecordedParam:
        """Parameter ``name``'s entry in the layout; a NotRecordedError listing the recorded parameters, saying how
        to record it when it is a parameter of the model."""
        if name in self.layout.params:
            return self.layout.params[name]
        recorded = ", ".join(self.layout.params) or "none"
        if name in (model_parameters(self._recording.attrs) or ()):
            raise NotRecordedError(f"{self.filename} does not record {name}, a parameter of the model (recorded: "
                                   f"{recorded}): add it, or a pattern such as '*', to record.tensors in the "
                                   "experiment's config and train again")
        raise NotRecordedError(f"{name!r} is not a recorded parameter of {self.filename}; recorded: {recorded}")

    def series(self, param: str, key: str) -> StepSeries:
        """Parameter ``param``'s dataset ``key`` (``value``, ``grad``, ``exp_avg``, ...)."""
        recorded = self.recorded(param)
        if key not in recorded.paths:
            state = [name for name in recorded.paths if name not in (VALUE, GRAD)]
            seed = f" ({key} is the seed's name of {STATE_KEYS[key]})" if key in STATE_KEYS else ""
            raise NotRecordedError(f"{param} has no state {key!r} in {self.filename}{seed}; under update rule "
                                   f"{rule_of(self._recording.attrs)} it has {', '.join(state) or 'none'}")
        path = recorded.paths[key]
        if path not in self._series:
            axes = parameter_axes_of(param, len(recorded.shape))
            # as the attributes say (type, rank, shape, bytes inside the run), or a DataError naming it
            dataset = check_recorded_dataset(self._recording, path, self.layout)
            self._series[path] = StepSeries(dataset, series_name(param, key), self._cache, axes,
                                            "the run" if param == EMBEDDING else param)
        return self._series[path]

    def __getitem__(self, name: str) -> StepSeries:
        """The embedding's tensor by the seed's name (``W``, ``grad_W``, ``master_W``, ...)."""
        if EMBEDDING not in self.layout.params:
            raise NotRecordedError(
                f"{self.filename} does not record the embedding {EMBEDDING}, whose tensors {name} and the seed's other "
                f"names are (recorded: {', '.join(self.layout.params) or 'none'}): read a recorded parameter with "
                f"run.param(name), or add {EMBEDDING} to record.tensors in the experiment's config and train again")
        if name not in self.stored_dtypes:
            raise NotRecordedError(f"{name!r} is not recorded under update rule {rule_of(self._recording.attrs)}; "
                                   f"recorded: {', '.join(self.stored_dtypes)}")
        return self.series(EMBEDDING, STATE_KEYS[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.stored_dtypes)

    def __len__(self) -> int:
        return len(self.stored_dtypes)


class Parameter:
    """One recorded parameter of a run (``run.param(name)``): ``.value``, ``.grad``, ``.state(key)`` and, where the
    lattice stage has run, ``.delta_w_lattice``, each a ``StepSeries`` of shape (T+1, *shape) read lazily."""

    def __init__(self, recorded: RecordedParam, series: RecordedSeries,
                 delta_w_lattice: Callable[[str], StepSeries]):
        self._recorded, self._series, self._delta_w_lattice = recorded, series, delta_w_lattice
        self.name = recorded.name
        #: the parameter's shape (each step's)
        self.shape: tuple[int, ...] = tuple(recorded.shape)
        #: each recorded key's stored dtype ("bfloat16", "float16"; float32 optimizer state under fp32_master)
        self.stored_dtypes: dict[str, str] = dict(recorded.dtypes)
        #: the optimizer state keys recorded (``exp_avg``, ``exp_avg_sq``; ``kahan_comp``, ``master``)
        self.state_keys: list[str] = [key for key in recorded.paths if key not in (VALUE, GRAD)]
        #: the names of the axes after the step: (token, dim) for the embedding, else (row, column)
        self.axes = parameter_axes_of(self.name, len(self.shape))

    @property
    def value(self) -> StepSeries:
        """The parameter after step t, (T+1, *shape)."""
        return self._series.series(self.name, VALUE)

    @property
    def grad(self) -> StepSeries:
        """The gradient step t applied (zeros at t = 0)."""
        return self._series.series(self.name, GRAD)

    def state(self, key: str) -> StepSeries:
        """The optimizer's state ``key`` after step t (one of ``state_keys``)."""
        if key in (VALUE, GRAD):
            raise NotRecordedError(f"{key} is not optimizer state: read it as run.param({self.name!r}).{key}")
        return self._series.series(self.name, key)

    @property
    def keys(self) -> list[str]:
        """Every recorded key: value, grad and the state keys."""
        return list(self._recorded.paths)

    def series(self, key: str) -> StepSeries:
        """The series of any recorded key (one of ``keys``)."""
        return self._series.series(self.name, key)

    @property
    def delta_w_lattice(self) -> StepSeries:
        """ΔW′[t]: signed bf16 lattice steps from value[t-1] to value[t] (int16 or int32; row 0 is 0), from
        delta_w_lattice.h5."""
        return self._delta_w_lattice(self.name)

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype of ``value`` (bfloat16, or float16 in a float16 recording)."""
        return self.value.dtype

    def __len__(self) -> int:
        """The recorded steps, T+1."""
        return len(self.value)

    def __repr__(self) -> str:
        keys = ", ".join(self.keys)
        return f"<thimble parameter {self.name}: {self.shape} {self.stored_dtypes[VALUE]}; {keys}>"
