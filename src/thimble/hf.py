"""``thimble.hf.RecorderCallback``: a transformers ``Trainer`` run recorded by ``thimble.Recorder``.

```python
recording = thimble.hf.RecorderCallback("runs/my_run", tensors="*")
trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[recording])
with recording:          # optional: a train() that raises leaves a partial recording (else only the process's end)
    trainer.train()
```

The recorder attaches to the torch optimizer that steps the model's parameters, whatever wraps it (accelerate's
``AcceleratedOptimizer``): the callback does not take the ``optimizer`` a callback event hands it, which is not
always the one that steps (it can be None). At ``on_train_begin`` it registers torch's global optimizer step
pre-hook; the first optimizer whose step begins and that holds the model's parameters gets the recorder, created
right then: step 0 is the state before that step (after any checkpoint was loaded), step t the state after the
t-th optimizer step, so under gradient accumulation one recorded step per optimizer step.

The step's loss is the one ``Trainer`` logs for it (the ``loss`` of ``on_log``) when it logs every step
(``logging_steps=1``): the mean over the step's micro-batches and processes, as ``Trainer`` computes it; with
``logging_steps`` above 1 a logged loss is the mean over several steps, not a step's, and the recording's
``losses`` stay NaN. ``Trainer`` replaces a non-finite loss by the running mean in what it logs
(``logging_nan_inf_filter``), so such a step's recorded loss is that mean.

Only the world's process zero records (under data parallelism every process holds the same parameters).
"""

from __future__ import annotations

from pathlib import Path

try:
    import accelerate  # noqa: F401  (Trainer needs it; said here, where the extra is named)
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from transformers import TrainerCallback
except ImportError as missing:
    raise ImportError(f"thimble.hf needs transformers and accelerate ({missing}); install them with "
                      "pip install thimble[hf]") from missing

from thimble.outputs import STREAM_DIR
from thimble.record.recorder import Recorder, RecorderError, check_new_directory, select_recorded, unwrap_optimizer


class RecorderCallback(TrainerCallback):
    """Record a ``Trainer`` run's optimizer steps into ``<path>/stream/`` (``thimble.Recorder``).

    ``tensors``, ``token_groups`` and the keyword options (``embedding``, ``name``, ``segment_steps``, ...) are
    the recorder's. The recording is closed (``stream.h5`` written) at ``on_train_end``. ``Trainer`` tells a
    callback nothing when training raises: used as a context manager around ``trainer.train()``, or with
    ``abort()`` called, the callback stops the recorder then and leaves the complete segments (a partial
    recording, ``thimble.record.recorder.close_partial``); otherwise they stay as the process leaves them.
    """

    def __init__(self, path: str | Path, tensors: str | list[str] = "*", token_groups: dict | None = None,
                 **options):
        self.path = Path(path)
        self.tensors, self.token_groups, self.options = tensors, token_groups, options
        #: the recorder, once the optimizer stepping the model made its first step
        self.recorder: Recorder | None = None
        self._model = None
        self._hook = None
        self._logged_global_step = self._logged_recorded_step = None

    # -- the Trainer's events ----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.recorder is not None:
            raise RecorderError(f"{self.path}: this RecorderCallback already recorded a run; a new train() needs "
                                "a new callback and path")
        if model is None:
            raise RecorderError("Trainer handed the callback no model at on_train_begin: nothing to record")
        self._remove_hook()  # of a train() that raised before the recorder existed
        # what the recorder would refuse, refused before training starts
        check_new_directory(self.path / STREAM_DIR)
        select_recorded(self.tensors, dict(model.named_parameters()))
        self._model = model
        self._logged_global_step, self._logged_recorded_step = state.global_step, 0
        self._hook = register_optimizer_step_pre_hook(self._attach_at_first_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        # out of torch's loop over the global hooks (removing one inside it would change the dict it iterates)
        if self.recorder is not None:
            self._remove_hook()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._model is None or not logs or "loss" not in logs:
            return
        recorded_step = self.recorder.step if self.recorder is not None else 0
        # the loss of one Trainer step that was one recorded optimizer step (a step the scaler skipped is not)
        if state.global_step - self._logged_global_step == 1 and recorded_step - self._logged_recorded_step == 1:
            self.recorder.log(loss=logs["loss"])
        self._logged_global_step, self._logged_recorded_step = state.global_step, recorded_step

    def on_train_end(self, args, state, control, **kwargs):
        if self._model is None:
            return
        self._remove_hook()
        if self.recorder is None:
            raise RecorderError(f"{self.path}: the Trainer made no optimizer step of the model's parameters, so "
                                "there is nothing to record")
        self.recorder.close()

    # -- a train() that raises ---------------------------------------------------------------------
    def abort(self) -> None:
        """Stop recording where training stopped: every step recorded so far is written, no stream.h5 (a partial
        recording; ``thimble.record.recorder.close_partial`` makes it readable)."""
        self._remove_hook()
        if self.recorder is not None:
            self.recorder.abort()

    def __enter__(self) -> RecorderCallback:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None:
            self.abort()

    # -- finding the optimizer ---------------------------------------------------------------------
    def _attach_at_first_step(self, optimizer, args, kwargs):
        """torch's global step pre-hook: the recorder on the first optimizer that steps the model's parameters."""
        if self.recorder is not None or self._model is None:
            return
        inner = unwrap_optimizer(optimizer)
        held = {id(param) for group in inner.param_groups for param in group["params"]}
        if not any(id(param) in held for param in self._model.parameters()):
            return
        try:
            self.recorder = Recorder(self.path, self._model, inner, self.tensors, self.token_groups, **self.options)
        except BaseException:
            # the step raises this; the hook, which cannot be removed while torch runs the global hooks, does
            # nothing more (on_train_begin or abort removes it)
            self._model = None
            raise
        if optimizer is inner:
            # This step has begun: whether torch runs the pre-hook the recorder just registered in this same
            # call depends on how it iterates its hooks, so run it here (it acts once per step; its result, the
            # step's arguments with a closure wrapped, is this hook's). The post-hook runs after the step either
            # way: the step is recorded.
            return self.recorder.begin_step(inner, args, kwargs)
        # else a wrapper's step began, and the inner step it calls runs both of the recorder's hooks

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
