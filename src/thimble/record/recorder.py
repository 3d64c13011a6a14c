"""``thimble.Recorder``: any PyTorch training loop recorded bit for bit at every optimizer step.

The recorder attaches to a torch optimizer through its step hooks (``register_step_pre_hook``,
``register_step_post_hook``), so it sees exactly what the optimizer consumed and produced, whatever the loop does
around it (clipping, unscaling, a closure that runs the forward and backward inside ``step()``, a scheduler):

- step 0: each recorded parameter's value when the recorder attaches, and its gradient and optimizer state as
  zeros (the state the optimizer already holds, when it holds one);
- step t (after the t-th optimizer step): each recorded parameter's value after the step, the gradient the step
  consumed and every tensor of the optimizer's state of the parameter's shape (``exp_avg``, ``exp_avg_sq``,
  ``momentum_buffer``, ...), each in its own dtype (bfloat16, float16 or float32: stored losslessly). The
  gradient is copied as the step receives it: in the pre-hook, or, when ``step(closure)`` computes it (Lightning's
  automatic optimization), as the closure returns; never after the step, which may change it in place (SGD's
  foreach Nesterov adds the momentum into ``.grad``);
- per step, tables beside the tensors: each param group's hyperparameters as the step used them
  (``hyperparameters``: lr a scheduler set, betas, eps, weight decay, ...), each recorded parameter's optimizer
  step count (``param_steps``) and whether the optimizer stepped it (``param_stepped``: a parameter without a
  gradient is skipped), and the loss handed to ``log``.

It writes ``<path>/stream/`` in thimble's recording format (``thimble.record.format``): segments written in the
background, each complete and checksummed before it gets its name, and ``stream.h5`` over them when the recorder
closes. A loop killed before that leaves its complete segments and no ``stream.h5``: a partial recording, which
``close_partial`` turns into a readable one (marked ``interrupted``). Nothing is unpickled, here or in a reader.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import sys
from pathlib import Path

import numpy as np

from thimble.errors import ThimbleError
from thimble.outputs import RECORDER_RUN_FILE as RUN_FILE
from thimble.outputs import STREAM_DIR, STREAM_FILE
from thimble.record.format import NATIVE_STORAGE, RECORDER, RecordLayout, list_segments, open_h5
from thimble.record.optimizer_tables import STEP_TABLES, OptimizerTables, as_float, optimizer_class_name
from thimble.record.writer import StreamRecorder, write_stream_file
from thimble.sizes import select_parameters

log = logging.getLogger(__name__)

#: the stored dtype of each torch dtype a recorder keeps losslessly
STORED_DTYPES = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32"}


class RecorderError(ThimbleError):
    """A loop, model or optimizer the recorder cannot record as asked."""


def library_versions() -> dict[str, str]:
    """The versions of the libraries a loop ran with (those it imported)."""
    import h5py
    import torch

    from thimble.version import __version__

    versions = {"thimble_version": __version__, "torch_version": str(torch.__version__),
                "numpy_version": np.__version__, "h5py_version": h5py.__version__,
                "hdf5_version": h5py.version.hdf5_version, "python_version": platform.python_version()}
    for module, key in (("transformers", "transformers_version"), ("accelerate", "accelerate_version"),
                        ("lightning", "lightning_version"), ("pytorch_lightning", "pytorch_lightning_version")):
        if module in sys.modules:
            versions[key] = str(getattr(sys.modules[module], "__version__", "unknown"))
    return versions


class Recorder:
    """Record a training loop's optimizer steps into ``<path>/stream/``.

    ``model``: the module whose ``named_parameters()`` name what is recorded; ``optimizer``: the torch optimizer
    that steps them (an ``accelerate`` or Lightning wrapper is unwrapped to it). ``tensors``: ``"*"`` (every
    parameter), a name, or a list of names and shell-style patterns. ``token_groups``: ``{"dead": mask}`` (and
    optionally ``"live"``, the complement by default), a boolean mask over the rows of the embedding
    ``embedding`` (a parameter's name; by default the one recorded ``nn.Embedding`` with as many rows as the
    mask), which the analyses then split as they split the seed's live and dead tokens. ``name``: the
    experiment's name in the recording (default: the directory's name). Use it as a context manager, or call
    ``close()``; ``log(loss=...)`` adds the last step's loss. Up to ``queue_steps`` recorded steps wait in host
    memory for the background writer (each a copy of every recorded tensor: lower it for a large model), which
    compresses on ``threads`` threads into segments of ``segment_steps`` steps.
    """

    def __init__(self, path: str | Path, model, optimizer, tensors: str | list[str] = "*",
                 token_groups: dict | None = None, *, embedding: str | None = None, name: str | None = None,
                 segment_steps: int = 100, queue_steps: int = 16, compression_level: int = 1, threads: int = 2):

        self.path = Path(path)
        self.directory = self.path / STREAM_DIR
        self.optimizer = unwrap_optimizer(optimizer)
        self.name = name or self.path.resolve().name
        check_new_directory(self.directory)
        patterns = [tensors] if isinstance(tensors, str) else list(tensors)
        params = dict(model.named_parameters())
        if patterns == ["*"]:
            # every parameter the optimizer steps: a frozen one (a LoRA base, a frozen backbone) is not trained
            stepped = {id(param) for group in self.optimizer.param_groups for param in group["params"]}
            left_out = [name for name, param in params.items() if id(param) not in stepped]
            if left_out:
                log.info("tensors='*': %d parameters the optimizer does not step are not recorded (%s%s)",
                         len(left_out), ", ".join(left_out[:5]), ", ..." if len(left_out) > 5 else "")
            params = {name: param for name, param in params.items() if id(param) in stepped}
        self.params = {name: params[name] for name in select_recorded(tensors, params)}
        self.tables = OptimizerTables(self.optimizer, self.params)
        if self.tables.missing:
            missing = self.tables.missing
            raise RecorderError(f"the optimizer ({optimizer_class_name(self.optimizer)}) does not step "
                                f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}: record only "
                                "parameters it updates (tensors=...)")
        self.group_of = self.tables.group_of
        for name, param in self.params.items():
            if str(param.dtype) not in STORED_DTYPES:
                raise RecorderError(f"{name} is {param.dtype}; the recorder stores bfloat16, float16 and float32 "
                                    "parameters (losslessly)")
        self.token_groups_param, self.masks = token_masks(token_groups, embedding, model, self.params)
        self.segment_steps, self.queue_steps = segment_steps, queue_steps
        self.compression_level, self.threads = compression_level, threads
        self.step = 0
        self._writer: StreamRecorder | None = None
        self._layout: RecordLayout | None = None
        self._pending: tuple[int, dict, dict] | None = None
        self._loss = math.nan
        self._row_hyper = None
        self._grads: dict = {}
        #: the arguments of the step whose pre-hook ran (its post-hook clears them): a second pre-hook call for
        #: the same ``step()`` call acts not again, one for a step after a step that raised does
        self._step_args = None
        self._skipped_by_scaler = False
        self._closed = False
        self._logged_early = False
        #: step 0, taken as the first step begins (a checkpoint loaded after the recorder was made is in it)
        self._zero: dict | None = None
        self._initial_state = "empty"
        self._handles = [self.optimizer.register_step_pre_hook(self.begin_step),
                         self.optimizer.register_step_post_hook(self._after_step)]
        log.info("recording %d parameters of %s stepped by %s into %s", len(self.params), type(model).__name__,
                 optimizer_class_name(self.optimizer), self.directory)

    # -- the loop's side ---------------------------------------------------------------------------
    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is None:
            self.close()
        else:
            self.abort()

    def log(self, loss=None) -> None:
        """The loss of the last optimizer step (a float or a one-element tensor): call it after
        ``optimizer.step()``; the loss is filed under the step the optimizer made last."""
        if loss is None:
            return
        if self._pending is None and not self._logged_early:
            self._logged_early = True
            log.warning("Recorder.log(loss=...) was called with no optimizer step since the last one it filed (or "
                        "before the first): it files the loss under the step made last, so call it after "
                        "optimizer.step(); this loss is %s", "dropped" if self.step == 0 else "ignored")
        if self._pending is not None:
            self._loss = as_float(loss.detach() if hasattr(loss, "detach") else loss)

    def close(self) -> Path:
        """Write every step to disk and ``stream.h5`` over them; return the stream's directory."""
        if self._closed:
            return self.directory
        self._detach()
        self._closed = True
        if self._writer is None:
            raise RecorderError(f"{self.directory}: the optimizer made no step while the recorder was attached, so "
                                "there is nothing to record")
        self._flush_pending()
        self._writer.close()
        last = self._writer.last_written
        write_stream_file(self.directory, self._layout, last, NATIVE_STORAGE, self.masks, self.attrs(),
                          STEP_TABLES)
        log.info("recorded steps 0..%d -> %s", last, self.directory)
        return self.directory

    def abort(self) -> None:
        """Stop recording where the loop stopped (it raised): every step recorded so far is written, the last
        segment ending at the last step, and no ``stream.h5``: a partial recording, which ``close_partial`` makes
        readable. If the writer itself failed, its complete segments stay and the open one is dropped."""
        self._detach()
        self._closed = True
        if self._writer is None:
            return
        try:
            self._flush_pending()
            self._writer.close()
        except BaseException:
            self._writer.abort()
            log.exception("the recorder's writer failed while the loop stopped")
        log.warning("the loop stopped after optimizer step %d: %s holds a partial recording (steps 0..%s in complete "
                    "segments, no %s); thimble.record.recorder.close_partial(%r) makes it readable", self.step,
                    self.directory, self._writer.last_written, STREAM_FILE, str(self.path))

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- the optimizer's hooks ---------------------------------------------------------------------
    def begin_step(self, optimizer, args, kwargs):
        """The optimizer's step pre-hook (public for an integration that attaches the recorder from inside a step
        that has begun: run twice for one step, it acts once). Takes the hyperparameters the step is about to use
        (a scheduler set them before it) and the gradients it receives; a closure that computes them inside the
        step is wrapped to copy them as it returns (the hook's return value: torch's new step arguments)."""
        if args is self._step_args:
            return None
        self._step_args = args
        self._flush_pending()
        self._check_groups(optimizer)
        if getattr(optimizer, "grad_scale", None) is not None:
            raise RecorderError(
                f"{self.directory}: GradScaler hands {optimizer_class_name(optimizer)} (fused) scaled gradients that "
                "its kernel unscales inside the step, so the gradient it consumes is never a tensor the recorder can "
                "copy; call scaler.unscale_(optimizer) before scaler.step(optimizer)")
        found_inf = getattr(optimizer, "found_inf", None)
        # GradScaler's found_inf: a fused kernel then leaves every parameter and its state as they were
        self._skipped_by_scaler = found_inf is not None and bool(as_float(found_inf))
        self._row_hyper = self.tables.hyperparameters()
        if self._zero is None:
            self._take_step_zero()
        # torch hands the hook step()'s own arguments, the optimizer first: (self, closure)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if not callable(closure):
            self._grads = self._copy_grads()
            return None
        # the closure computes the step's gradients: they are copied as it returns, not here

        def closure_copying_gradients():
            result = closure()
            self._grads = self._copy_grads()
            return result

        if "closure" in kwargs:
            self._step_args = args
            return args, {**kwargs, "closure": closure_copying_gradients}
        self._step_args = (args[0], closure_copying_gradients, *args[2:])
        return self._step_args, kwargs

    def _take_step_zero(self) -> None:
        """Step 0: the recorded parameters' values, their optimizer state (zeros where it has none yet) and step
        counts, and the groups' settings, as the first recorded step begins."""
        import torch

        with torch.no_grad():
            values = {name: param.detach().to("cpu", copy=True) for name, param in self.params.items()}
            state = {name: {key: value.detach().to("cpu", copy=True)
                            for key, value in self.optimizer.state.get(param, {}).items()
                            if _is_state_tensor(value, param, key)}
                     for name, param in self.params.items()}
        self._zero = {"values": values, "state": state, "steps": self.tables.steps(),
                      "hyperparameters": self._row_hyper}
        self._initial_state = "as_found" if any(state.values()) else "empty"

    def _check_groups(self, optimizer) -> None:
        if len(optimizer.param_groups) != len(self.tables.groups):
            raise RecorderError(
                f"{self.directory}: the optimizer has {len(optimizer.param_groups)} param groups, "
                f"{len(self.tables.groups)} when the recorder attached (add_param_group, e.g. a backbone unfrozen "
                "later): one recording holds one set of groups; close this recorder and record the next phase "
                "into another path")

    def _copy_grads(self) -> dict:
        import torch

        with torch.no_grad():
            return {name: param.grad.detach().to("cpu", copy=True) for name, param in self.params.items()
                    if param.grad is not None}

    def _after_step(self, optimizer, args, kwargs) -> None:
        import torch

        self._step_args = None
        with torch.no_grad():
            if self._writer is None:
                self._open()
            self.step += 1
            tensors, stepped = {}, np.zeros(len(self.params), dtype=np.uint8)
            for index, (name, param) in enumerate(self.params.items()):
                entry = self._layout.params[name]
                state = self.optimizer.state.get(param, {})
                for key, path in entry.paths.items():
                    if key == "value":
                        tensors[path] = param.detach().to("cpu", copy=True)
                    elif key == "grad":
                        grad = self._grads.get(name)
                        stepped[index] = grad is not None and not self._skipped_by_scaler
                        if grad is not None and STORED_DTYPES.get(str(grad.dtype)) != entry.dtypes[key]:
                            raise RecorderError(f"{name}'s gradient is {grad.dtype} at step {self.step}; the "
                                                f"recording stores it as {entry.dtypes[key]}")
                        tensors[path] = grad if grad is not None else torch.zeros(
                            param.shape, dtype=torch_dtype(entry.dtypes[key]))
                    else:
                        value = state.get(key)
                        if value is None:
                            tensors[path] = torch.zeros(param.shape, dtype=torch_dtype(entry.dtypes[key]))
                        elif not _is_state_tensor(value, param, key) or STORED_DTYPES.get(str(value.dtype)) \
                                != entry.dtypes[key]:
                            raise RecorderError(f"{name}'s optimizer state {key!r} changed kind at step {self.step} "
                                                f"({value.dtype}, shape {tuple(value.shape)}); the recording "
                                                f"stores it as {entry.dtypes[key]} {tuple(param.shape)}")
                        else:
                            tensors[path] = value.detach().to("cpu", copy=True)
                unknown = [key for key, value in state.items() if key not in entry.paths
                           and _is_state_tensor(value, param, key)]
                if unknown:
                    raise RecorderError(f"{name} gained optimizer state {unknown} at step {self.step}, after the "
                                        f"recording's layout was fixed at step 1 ({sorted(entry.paths)})")
        tables = self.tables.rows(self._row_hyper, stepped)
        self._pending = (self.step, tensors, tables)
        self._grads = {}
        self._loss = math.nan

    # -- the recording -----------------------------------------------------------------------------
    def _open(self) -> None:
        """Fix the layout at the first step (its state keys are the optimizer's, known once it made them) and
        hand step 0 to a new writer."""
        import torch

        entries = {}
        for name, param in self.params.items():
            grad = self._grads.get(name)
            keys = {"value": STORED_DTYPES[str(param.dtype)],
                    "grad": STORED_DTYPES[str(grad.dtype if grad is not None else param.dtype)]}
            state = self.optimizer.state.get(param, {})
            for key, value in state.items():
                if _is_state_tensor(value, param, key):
                    if str(value.dtype) not in STORED_DTYPES:
                        raise RecorderError(f"{name}'s optimizer state {key!r} is {value.dtype}; the recorder "
                                            "stores bfloat16, float16 and float32 tensors")
                    keys[key] = STORED_DTYPES[str(value.dtype)]
            entries[name] = (tuple(param.shape), keys)
        self._fill_unstepped_keys(entries)
        self._layout = RecordLayout.of_parameters_each(entries)
        self.directory.mkdir(parents=True, exist_ok=True)
        from thimble.util.files import write_json

        # the layout's attributes too (each parameter's shape and tensors' dtypes): the workflow sizes its jobs
        # from this file while it plans, when it may not open an HDF5 file
        write_json(self.directory / RUN_FILE, {"attrs": {**self.attrs(), **self._layout.attrs()},
                                               "masks": {key: value.tolist() for key, value in self.masks.items()}})
        self._writer = StreamRecorder(self.directory, self._layout, None, storage=NATIVE_STORAGE,
                                      segment_steps=self.segment_steps, queue_steps=self.queue_steps,
                                      level=self.compression_level, threads=self.threads,
                                      step_tables=self.tables.specs())
        taken, zero = self._zero, {}
        self._zero = {}  # handed to the writer (not None: step 0 is not taken again)
        for name, entry in self._layout.params.items():
            for key, path in entry.paths.items():
                if key == "value":
                    zero[path] = taken["values"][name]
                elif key in taken["state"][name]:
                    zero[path] = taken["state"][name][key]
                else:
                    zero[path] = torch.zeros(entry.shape, dtype=torch_dtype(entry.dtypes[key]))
        self._writer.record(0, zero, math.nan, {"hyperparameters": taken["hyperparameters"],
                                                "param_steps": taken["steps"],
                                                "param_stepped": np.zeros(len(self.params), dtype=np.uint8)})

    def _fill_unstepped_keys(self, entries: dict) -> None:
        """A parameter the first step skipped (no gradient) has no state yet: it gets the keys of a parameter its
        group stepped, else of one another group stepped (a group unfrozen later), each in the parameter's own
        dtype where the other's state is in that one's."""
        stepped = [(other, other_keys) for other, (_, other_keys) in entries.items() if len(other_keys) > 2]
        for name, (shape, keys) in entries.items():
            if len(keys) > 2:
                continue
            same_group = [item for item in stepped if self.group_of[item[0]] == self.group_of[name]]
            for other, other_keys in (same_group or stepped)[:1]:
                for key, dtype in other_keys.items():
                    if key not in ("value", "grad"):
                        keys.setdefault(key, keys["value"] if dtype == other_keys["value"] else dtype)

    def _flush_pending(self, ignore_errors: bool = False) -> None:
        if self._pending is None:
            return
        step, tensors, tables = self._pending
        self._pending = None
        try:
            self._writer.record(step, tensors, self._loss, tables)
        except BaseException:
            if not ignore_errors:
                raise
        self._loss = math.nan

    def attrs(self) -> dict:
        """The recording's attributes: what made it (the optimizer, its param groups, the parameters, the device,
        the CPU, the libraries)."""
        import torch

        dtypes = {name: str(param.dtype).removeprefix("torch.") for name, param in self.params.items()}
        return {
            "experiment": self.name,
            "recorded_by": RECORDER,
            **self.tables.attrs(dtypes),
            "initial_state": self._initial_state,
            "token_groups_param": self.token_groups_param or "",
            "device": ",".join(sorted({str(param.device) for param in self.params.values()})),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(),
            **library_versions(),
        }


def _is_state_tensor(value, param, key: str = "") -> bool:
    """A state entry the recorder keeps: a tensor of the parameter's shape (a moment, a buffer), not the step
    count (the ``param_steps`` table; of a 0-d parameter's shape too)."""
    return key != "step" and hasattr(value, "shape") and hasattr(value, "dtype") \
        and tuple(value.shape) == tuple(param.shape) and value.dtype.is_floating_point


def select_recorded(tensors: str | list[str], params: dict) -> list[str]:
    """The names of ``params`` (name: parameter, in the model's order) that ``tensors`` selects: a name, a
    shell-style pattern or a list of them; a RecorderError naming a pattern that selects none."""
    try:
        return select_parameters([tensors] if isinstance(tensors, str) else list(tensors), params, key="tensors")
    except ThimbleError as error:
        raise RecorderError(str(error)) from None


def torch_dtype(stored: str):
    """The torch dtype of a stored dtype's name (``bfloat16``, ``float16``, ``float32``)."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[stored]


def unwrap_optimizer(optimizer):
    """The torch optimizer inside a wrapper (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``): the one whose ``step()`` runs the hooks."""
    import torch

    seen = optimizer
    for _ in range(8):
        if isinstance(seen, torch.optim.Optimizer) and type(seen).__name__ not in ("AcceleratedOptimizer",):
            return seen
        inner = getattr(seen, "optimizer", None) or getattr(seen, "_optimizer", None)
        if inner is None:
            break
        seen = inner
    if isinstance(seen, torch.optim.Optimizer):
        return seen
    raise RecorderError(f"{type(optimizer).__name__} is not a torch optimizer (torch.optim.Optimizer), nor does it "
                        "wrap one; the recorder attaches to the optimizer's step hooks")


def check_new_directory(directory: Path) -> None:
    """Refuse to record over a recording: a finished one, or the segments a killed loop left."""
    if (directory / STREAM_FILE).exists():
        raise RecorderError(f"{directory} already holds a recording ({STREAM_FILE}); record into another path, or "
                            f"delete {directory} to record again")
    segments = list_segments(directory) if directory.is_dir() else []
    if segments:
        raise RecorderError(f"{directory} holds a partial recording (segments of steps 0..{segments[-1][1]}, no "
                            f"{STREAM_FILE}: the loop that wrote it did not close its recorder); make it readable "
                            f"with thimble.record.recorder.close_partial({str(directory.parent)!r}), or delete "
                            f"{directory} to record again")


def token_masks(token_groups: dict | None, embedding: str | None, model, params: dict
                ) -> tuple[str | None, dict[str, np.ndarray]]:
    """The embedding's name and the live and dead masks and ids of ``token_groups`` over its rows, as the seed's
    recordings hold them (``live_mask``, ``dead_mask``, ``live_ids``, ``dead_ids``)."""
    if token_groups is None:
        return None, {}
    unknown = sorted(set(token_groups) - {"dead", "live"})
    if unknown or "dead" not in token_groups:
        raise RecorderError(f"token_groups takes masks 'dead' (and optionally 'live') over the embedding's rows, "
                            f"got {sorted(token_groups)}")
    dead = np.asarray(_to_numpy(token_groups["dead"]), dtype=bool)
    live = np.asarray(_to_numpy(token_groups["live"]), dtype=bool) if "live" in token_groups else ~dead
    if dead.ndim != 1 or live.shape != dead.shape:
        raise RecorderError(f"token_groups' masks must be 1-D and of one length, got {dead.shape} and {live.shape}")
    name = embedding or _find_embedding(model, params, len(dead))
    if name not in params:
        raise RecorderError(f"embedding={name!r} is not a recorded parameter ({', '.join(list(params)[:6])})")
    if params[name].shape[0] != len(dead):
        raise RecorderError(f"token_groups' masks have {len(dead)} rows, {name} {params[name].shape[0]}")
    return name, {"live_mask": live, "dead_mask": dead, "live_ids": np.flatnonzero(live).astype(np.int64),
                  "dead_ids": np.flatnonzero(dead).astype(np.int64)}


def _to_numpy(mask):
    return mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask


def _find_embedding(model, params: dict, rows: int) -> str:
    import torch

    names = {id(param): name for name, param in params.items()}
    found = [names[id(module.weight)] for module in model.modules()
             if isinstance(module, torch.nn.Embedding) and id(module.weight) in names
             and module.weight.shape[0] == rows]
    found = list(dict.fromkeys(found))
    if len(found) != 1:
        raise RecorderError(f"token_groups: {'no' if not found else 'more than one'} recorded nn.Embedding has "
                            f"{rows} rows ({', '.join(found) or 'none'}); name it with embedding=...")
    return found[0]


def close_partial(path: str | Path) -> Path:
    """Make the partial recording a killed loop left in ``<path>/stream/`` readable: ``stream.h5`` over its
    complete segments (steps 0..the last one written whole), marked ``interrupted``. The open segment the loop
    was writing (a ``.tmp`` file) is left as it is."""
    directory = Path(path) / STREAM_DIR
    if (directory / STREAM_FILE).exists():
        raise RecorderError(f"{directory} already holds {STREAM_FILE}: nothing to close")
    segments = list_segments(directory) if directory.is_dir() else []
    if not segments or segments[0][0] != 0:
        raise RecorderError(f"{directory} holds no complete segment from step 0: nothing was recorded whole")
    run = json.loads((directory / RUN_FILE).read_text())
    with open_h5(segments[0][2]) as first:
        layout = RecordLayout.of_file(first)
    last = segments[-1][1]
    masks = {key: np.asarray(value, dtype=bool if key.endswith("mask") else np.int64)
             for key, value in run["masks"].items()}
    attrs = {**run["attrs"], "interrupted": True}
    write_stream_file(directory, layout, last, NATIVE_STORAGE, masks, attrs, STEP_TABLES)
    log.warning("closed the partial recording %s at step %d (the loop stopped before closing its recorder)",
                directory, last)
    return directory
