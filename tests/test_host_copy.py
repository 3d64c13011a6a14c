"""thimble.training.host_copy on the CPU: copies that do not alias what the optimizer changes next, the loss a float.

The CUDA path (pinned copies on a side stream) needs a GPU: bench/gpu_bench.py measures it there."""

import math

import torch

from thimble.training.host_copy import HostCopies


def test_cpu_copies_are_clones_taken_when_asked():
    copies = HostCopies(torch.device("cpu"))
    grad = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    weight = torch.ones(2, 3, dtype=torch.bfloat16)
    host = copies.copy({"grad_W": grad})
    grad.zero_()  # what zero_grad or a next backward would do
    host = copies.copy({"W": weight}, into=host, loss=torch.tensor(2.5))
    weight.add_(1)  # the next optimizer step, in place
    assert host.ready and host.loss == 2.5
    assert torch.equal(host.tensors["grad_W"], torch.arange(6, dtype=torch.bfloat16).reshape(2, 3))
    assert torch.equal(host.tensors["W"], torch.ones(2, 3, dtype=torch.bfloat16))
    assert set(host.tensors) == {"grad_W", "W"} and math.isnan(copies.copy({}).loss)
