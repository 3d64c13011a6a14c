"""``thimble.lightning.RecorderCallback``: a Lightning ``Trainer`` run recorded by ``thimble.Recorder``.

```python
trainer = lightning.pytorch.Trainer(..., callbacks=[thimble.lightning.RecorderCallback("runs/my_run", tensors="*")])
trainer.fit(module, data)
```

The recorder attaches when training starts (``on_train_start``: the optimizers exist, a checkpoint ``fit``
resumes from is loaded, the sanity check is over) to the torch optimizer that steps the recorded parameters
(Lightning's ``LightningOptimizer`` unwrapped), so step 0 is the state then. Lightning's automatic optimization
runs the forward and backward in a closure inside ``optimizer.step()``, and clips the gradients there: the
recorder wraps the closure and copies the gradient as it returns, so what it records is the gradient the step
consumed. The recording is closed at ``on_train_end``, and stopped at ``on_exception`` (every step made so far
written, no ``stream.h5``: a partial recording, which ``thimble.record.recorder.close_partial`` makes readable).

The step's loss is the loss ``training_step`` returned (``on_train_batch_end``'s ``outputs``) when it belongs to
exactly one optimizer step: under automatic optimization the sum over the step's ``accumulate_grad_batches``
batches of what Lightning backpropagates (each batch's loss divided by their number: their mean); under manual
optimization the loss of a batch that made one optimizer step. Otherwise (a batch that made several, a training
step that returned no loss) the recording's ``losses`` stay NaN for that step.

Only the global process zero records (under data parallelism every process holds the same parameters).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

try:
    import torch
    from lightning.pytorch import Callback
except ImportError as missing:
    raise ImportError(f"thimble.lightning needs lightning ({missing}); install it with "
                      "pip install thimble[lightning]") from missing

from thimble.record.recorder import Recorder, RecorderError, select_recorded, unwrap_optimizer


class RecorderCallback(Callback):
    """Record a Lightning ``Trainer``'s optimizer steps into ``<path>/stream/`` (``thimble.Recorder``).

    ``tensors``, ``token_groups`` and the keyword options (``embedding``, ``name``, ``segment_steps``, ...) are
    the recorder's; the names are those of the LightningModule's ``named_parameters()``. A module with several
    optimizers is recorded one optimizer per callback: ``tensors`` selects parameters of one of them.
    """

    def __init__(self, path: str | Path, tensors: str | list[str] = "*", token_groups: dict | None = None,
                 **options):
        self.path = Path(path)
        self.tensors, self.token_groups, self.options = tensors, token_groups, options
        #: the recorder, from the start of training
        self.recorder: Recorder | None = None
        self._automatic = True
        self._losses: list[float | None] = []
        self._logged_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        if self.recorder is not None:
            raise RecorderError(f"{self.path}: this RecorderCallback already recorded a run; a new fit needs a new "
                                "callback and path")
        optimizer = self._optimizer_of(trainer.optimizers, pl_module)
        self.recorder = Recorder(self.path, pl_module, optimizer, self.tensors, self.token_groups, **self.options)
        self._automatic = bool(pl_module.automatic_optimization)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.recorder is None:
            return
        loss = _loss_of(outputs)
        stepped = self.recorder.step - self._logged_step
        if self._automatic:
            self._losses.append(loss)
        else:
            self._losses = [loss]
        if stepped == 0:
            if not self._automatic:
                self._losses = []
            return
        if stepped == 1 and all(part is not None for part in self._losses):
            self.recorder.log(loss=sum(self._losses))
        self._losses = []
        self._logged_step = self.recorder.step

    def on_train_end(self, trainer, pl_module) -> None:
        if self.recorder is not None:
            self.recorder.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.recorder is not None:
            self.recorder.abort()

    def _optimizer_of(self, optimizers, pl_module) -> torch.optim.Optimizer:
        """The one optimizer that steps the recorded parameters."""
        params = dict(pl_module.named_parameters())
        names = select_recorded(self.tensors, params)
        recorded = {id(params[name]) for name in names}
        inner = [unwrap_optimizer(optimizer) for optimizer in optimizers]
        holding = [optimizer for optimizer in inner
                   if any(id(param) in recorded for group in optimizer.param_groups for param in group["params"])]
        if not holding:
            raise RecorderError(f"no optimizer of the Trainer ({len(inner)}) steps the recorded parameters "
                                f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
        if len(holding) > 1:
            raise RecorderError(f"{len(holding)} optimizers step the recorded parameters; record each with its own "
                                "RecorderCallback (its own path), tensors=... selecting that optimizer's parameters")
        return holding[0]


def _loss_of(outputs) -> float | None:
    """The loss in what ``training_step`` returned, as Lightning hands it to ``on_train_batch_end``."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor) and outputs.numel() == 1:
        return float(outputs.detach().float().item())
    return None
