"""Copies of a step's recorded tensors to host memory that do not make the training loop wait for the device.

The recorder compresses host copies in its own threads. How they get there decides whether a GPU can run at
its own pace: a blocking ``.to("cpu")`` per tensor and a ``loss.item()`` per step each wait for the device
to finish the step, so the host cannot queue the next one meanwhile (on an H100, thimble_7 trained at 0.29
of its unrecorded speed that way). Here:

- on the CPU a copy is a clone (the optimizer updates its tensors in place) and the loss a float: the bits
  and the order of operations are what they were;
- on CUDA the copies go into pinned host memory on a side stream that first waits for the compute stream
  (the tensors are final), and the compute stream waits for the copies (on the device, not the host) before
  the next step can change those tensors; an event marks the step's copies done. The recorder waits on that
  event in its writer thread, and the loss is read from its pinned copy there, so the training loop itself
  never synchronises with the device for the recording. ``record_stream`` keeps the caching allocator from
  handing a copied tensor's memory (a freed gradient) to the compute stream before the copy has read it.

The tests run the CPU path; the CUDA path needs a GPU, where ``bench/gpu_bench.py`` checks its bits and measures
its pace.
"""

from __future__ import annotations

import math

import torch


class HostStep:
    """One step's host copies: ``tensors`` (filled once ``wait`` returns) and the loss."""

    def __init__(self, tensors: dict[str, torch.Tensor], loss: torch.Tensor | float, event=None):
        self.tensors, self._loss, self._event = tensors, loss, event

    def wait(self) -> None:
        """Block until the copies are complete (on CUDA: the step's event; elsewhere they already are)."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None

    @property
    def ready(self) -> bool:
        return self._event is None or self._event.query()

    @property
    def loss(self) -> float:
        self.wait()
        return float(self._loss) if not isinstance(self._loss, torch.Tensor) else float(self._loss.item())


class HostCopies:
    """Makes ``HostStep``s for the training loop on ``device`` (see the module's docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.asynchronous = device.type == "cuda"
        self._side = torch.cuda.Stream(device) if self.asynchronous else None

    def _copy_async(self, tensors: dict[str, torch.Tensor], into: dict[str, torch.Tensor]) -> None:
        compute = torch.cuda.current_stream(self.device)
        self._side.wait_stream(compute)
        with torch.cuda.stream(self._side):
            for name, tensor in tensors.items():
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor.detach(), non_blocking=True)
                tensor.record_stream(self._side)
                into[name] = host
        # the next step's kernels change these tensors in place: they run after the copies
        compute.wait_stream(self._side)

    def copy(self, tensors: dict[str, torch.Tensor], into: HostStep | None = None,
             loss: torch.Tensor | None = None) -> HostStep:
        """Host copies of ``tensors`` (added to ``into``'s, if given) and, when given, of ``loss``."""
        step = into or HostStep({}, math.nan)
        if not self.asynchronous:
            for name, tensor in tensors.items():
                step.tensors[name] = tensor.detach().to("cpu", copy=True)
            if loss is not None:
                step._loss = loss.item()
            return step
        if loss is not None:
            tensors = {**tensors, "__loss__": loss.detach().reshape(1)}
        self._copy_async(tensors, step.tensors)
        if loss is not None:
            step._loss = step.tensors.pop("__loss__")
        event = torch.cuda.Event(blocking=True)  # the recorder's thread sleeps on it rather than spinning
        event.record(self._side)
        step._event = event
        return step
