"""The seed's causal-LM loss computed row block by row block, bit for bit, without the float32 logits matrix.

The seed's loss is transformers' ``ForCausalLMLoss``: the bf16 logits upcast to float32, the labels
padded with ``-100`` and shifted by one, ``cross_entropy`` (``log_softmax`` then ``nll_loss`` with
``ignore_index=-100``, mean over the rows not ignored). At thimble_7's shape that is a 16384 x 10000
float32 matrix written and read several times a step (the upcast copy, ``log_softmax``'s output, the zeros
``nll_loss``'s backward fills, ``log_softmax``'s backward): most of a CPU step, and all of it memory traffic.

``row_block_causal_lm_loss`` does the same arithmetic on blocks of rows small enough to stay in cache:

- forward, per block: the upcast, torch's own ``log_softmax`` kernel, the log-probability of each row's
  target gathered; then ``nll_loss`` over the gathered column (an ``(N, 1)`` input whose targets are 0, or
  ``-100`` where the seed's are), so the mean is reduced by the same kernel, in the same order, over the same
  values as over the full matrix;
- backward, per block: the gradient ``nll_loss``'s backward would give (``-grad / total_weight`` at each
  target, zeros elsewhere), torch's own ``_log_softmax_backward_data`` kernel, and the cast back to bf16
  (what the upcast's backward does), written into the one bf16 gradient of the logits.

CPU kernels reduce each row of a last-dimension ``log_softmax`` on its own, so a block's rows get the bits
the full matrix's rows get: ``tests/test_causal_lm_loss.py`` holds the loss and every gradient element
equal to transformers' at thimble_mini's size and at thimble_7's shape. The two GEMMs of the tied LM head
stay as they are (one matmul each for W's and the hidden states' gradients): splitting them would split
W's gradient sum and change its rounding.

When the loss's gradient is the 1.0 of ``loss.backward()`` (every training step), the backward is done
within the forward, block by block while the block is in cache, and kept in bf16; any other incoming
gradient is computed again from the logits with that value.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
#: rows per block: 16 rows of a 10000-token vocabulary are 640 kB of float32, a few such arrays stay in L2
BLOCK_ROWS = 16
#: the names the recording's provenance gives the two loss paths
LOSS_PATHS = ("transformers", "row_blocks")


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """``ForCausalLMLoss``'s targets: the labels padded with ``-100`` and shifted by one, flattened."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].contiguous().view(-1)


class _Scratch:
    """The float32 arrays of one block, allocated once per call: fresh ones per block would each be new pages
    from the kernel (their first touch costs more than the arithmetic on them)."""

    def __init__(self, block_rows: int, vocab: int):
        self.upcast, self.log_probs, self.upstream, self.grad = (
            torch.empty((block_rows, vocab), dtype=torch.float32) for _ in range(4))

    def log_softmax(self, block: torch.Tensor) -> torch.Tensor:
        """The upcast block's log_softmax (the seed's ``logits.float()`` then ``log_softmax``)."""
        rows = block.shape[0]
        upcast, log_probs = self.upcast[:rows], self.log_probs[:rows]
        upcast.copy_(block)
        torch._log_softmax(upcast, 1, False, out=log_probs)
        return log_probs

    def gradient(self, log_probs: torch.Tensor, targets: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The float32 gradient of the block's upcast logits, from ``nll_loss``'s backward (``value`` at each
        target not ignored, zeros elsewhere) through ``log_softmax``'s backward kernel."""
        rows = log_probs.shape[0]
        upstream, grad = self.upstream[:rows], self.grad[:rows]
        upstream.zero_()
        kept = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        upstream[kept, targets[kept]] = value
        torch._log_softmax_backward_data(upstream, log_probs, 1, torch.float32, out=grad)
        return grad


def _row_spans(rows: int, block_rows: int, parts: int) -> list[tuple[int, int]]:
    """``rows`` cut into at most ``parts`` spans of whole blocks, in order."""
    blocks = -(-rows // block_rows)
    parts = max(1, min(parts, blocks))
    edges = [min(rows, (blocks * part // parts) * block_rows) for part in range(parts + 1)]
    return [(lo, hi) for lo, hi in zip(edges, edges[1:]) if hi > lo]


def _blocks(logits: torch.Tensor, targets: torch.Tensor, span: tuple[int, int], block_rows: int,
            picked: torch.Tensor | None, grad: torch.Tensor | None, value: torch.Tensor) -> None:
    """One span of rows, block by block: the targets' log-probabilities into ``picked`` and the gradient of
    the logits (for ``nll_loss``'s backward ``value``) into ``grad``, each where not None."""
    lo, hi = span
    scratch = _Scratch(min(block_rows, hi - lo), logits.shape[1])
    safe_targets = torch.where(targets[lo:hi] != IGNORE_INDEX, targets[lo:hi], 0).unsqueeze(1)
    with torch.no_grad():  # grad mode is per thread: a pool's thread does not inherit the Function's
        for start in range(lo, hi, block_rows):
            stop = min(start + block_rows, hi)
            log_probs = scratch.log_softmax(logits[start:stop])
            if picked is not None:
                torch.gather(log_probs, 1, safe_targets[start - lo:stop - lo], out=picked[start:stop].unsqueeze(1))
            if grad is not None:  # the upcast's backward: the cast back to the logits' dtype
                grad[start:stop].copy_(scratch.gradient(log_probs, targets[start:stop], value))


def _all_blocks(logits, targets, block_rows, picked, grad, value) -> None:
    """``_blocks`` over every row, the spans on torch's intra-op threads (``torch.get_num_threads()``).

    Each row's values come from that row alone (the kernels reduce a row on one thread), so how the rows are
    shared out changes no bit; the threads only run side by side what one would run in turn.
    """
    spans = _row_spans(logits.shape[0], block_rows, torch.get_num_threads())
    if len(spans) == 1:
        _blocks(logits, targets, spans[0], block_rows, picked, grad, value)
        return
    futures = [_pool(len(spans)).submit(_blocks, logits, targets, span, block_rows, picked, grad, value)
               for span in spans]
    for future in futures:
        future.result()


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="row-block-loss")
    return _POOLS[workers]


class _RowBlockCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, block_rows: int) -> torch.Tensor:
        kept = targets != IGNORE_INDEX
        total_weight = int(kept.sum())
        # nll_loss's backward: -grad_output / total_weight, in float32 (an incoming gradient of 1.0 here)
        unit = _nll_gradient_value(torch.ones((), dtype=torch.float32), total_weight)
        picked = torch.empty(logits.shape[0], dtype=torch.float32)
        eager = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if eager else None
        _all_blocks(logits, targets, block_rows, picked, grad, unit)
        column_targets = torch.where(kept, 0, IGNORE_INDEX)
        loss = F.nll_loss(picked.unsqueeze(1), column_targets, ignore_index=IGNORE_INDEX, reduction="mean")
        ctx.block_rows, ctx.total_weight = block_rows, total_weight
        ctx.save_for_backward(logits, targets, torch.empty(0) if grad is None else grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, targets, grad = ctx.saved_tensors
        if grad.numel() and bool(grad_loss == 1.0):
            return grad, None, None
        value = _nll_gradient_value(grad_loss.float(), ctx.total_weight)
        grad = torch.empty_like(logits)
        _all_blocks(logits, targets, ctx.block_rows, None, grad, value)
        return grad, None, None


def _nll_gradient_value(grad_loss: torch.Tensor, total_weight: int) -> torch.Tensor:
    """``nll_loss``'s backward at each kept target for a mean: ``-grad_loss / total_weight`` in float32."""
    if not total_weight:  # every row ignored: the mean is NaN and nothing has a gradient but zeros
        return torch.zeros((), dtype=torch.float32)
    return -(grad_loss / torch.tensor(float(total_weight), dtype=torch.float32))


def row_block_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                             num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
                             shift_labels: torch.Tensor | None = None, block_rows: int = BLOCK_ROWS,
                             **kwargs) -> torch.Tensor:
    """``transformers``' ``ForCausalLMLoss``, the same bits, on the CPU, without the float32 logits matrix.

    Takes what transformers passes a model's ``loss_function``; the cases the seed never uses (a sum over
    ``num_items_in_batch``, another ``ignore_index``, a non-CPU tensor) are refused rather than approximated.
    """
    if num_items_in_batch is not None or ignore_index != IGNORE_INDEX or logits.device.type != "cpu":
        raise ValueError("row_block_causal_lm_loss computes the seed's loss on the CPU only: mean over the rows, "
                         "ignore_index -100")
    targets = shifted_targets(labels) if shift_labels is None else shift_labels.reshape(-1)
    return _RowBlockCrossEntropy.apply(logits.reshape(-1, vocab_size), targets.to(logits.device), block_rows)
