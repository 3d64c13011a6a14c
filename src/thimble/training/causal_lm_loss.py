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

Each thread holds two float32 arrays of one block, each used in place twice. The blocks are shared out on
torch's intra-op thread count, each thread's kernels on that thread alone (``_one_openmp_thread``).

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

import ctypes
import functools
import glob
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
#: rows per block: 32 rows of a 10000-token vocabulary are 1.28 MB of float32, two such arrays per thread stay
#: in cache; the fastest of 16, 32 and 64 on a 2-core AMD EPYC at 1 and 2 threads (docs/benchmarks.md)
BLOCK_ROWS = 32
#: the names the recording's provenance gives the two loss paths
LOSS_PATHS = ("transformers", "row_blocks")
#: the file names of the OpenMP runtimes torch is built with (GNU's, LLVM's, Intel's)
_OPENMP_NAMES = ("libgomp", "libomp", "libiomp5")


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """``ForCausalLMLoss``'s targets: the labels padded with ``-100`` and shifted by one, flattened."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].contiguous().view(-1)


def _row_spans(rows: int, block_rows: int, parts: int) -> list[tuple[int, int]]:
    """``rows`` cut into at most ``parts`` spans of whole blocks, in order."""
    blocks = -(-rows // block_rows)
    parts = max(1, min(parts, blocks))
    edges = [min(rows, (blocks * part // parts) * block_rows) for part in range(parts + 1)]
    return [(lo, hi) for lo, hi in zip(edges, edges[1:]) if hi > lo]


def _blocks(logits: torch.Tensor, targets: torch.Tensor, span: tuple[int, int], block_rows: int,
            picked: torch.Tensor | None, grad: torch.Tensor | None, value: torch.Tensor) -> None:
    """One span of rows, block by block: the targets' log-probabilities into ``picked`` and the gradient of
    the logits (for ``nll_loss``'s backward ``value``) into ``grad``, each where not None.

    Two float32 arrays of one block, allocated once per span (fresh ones per block would each be new pages
    from the kernel, whose first touch costs more than the arithmetic on them), and each used twice: the
    upcast block becomes its log_softmax in place, and ``nll_loss``'s backward (``value`` at each target not
    ignored, zeros elsewhere) becomes ``log_softmax``'s backward in place. Both kernels finish reading a row
    before they write it, so in place gives the same bits; the tests hold them to transformers'.
    """
    lo, hi = span
    rows, vocab = min(block_rows, hi - lo), logits.shape[1]
    with torch.no_grad():  # grad mode is per thread: a pool's thread does not inherit the Function's
        log_probs = torch.empty((rows, vocab), dtype=torch.float32)
        upstream = torch.zeros((rows, vocab), dtype=torch.float32)
        kept = targets[lo:hi] != IGNORE_INDEX
        # ignored rows scatter a zero onto column 0: their upstream stays all zeros, as nll_loss's backward
        safe_targets = torch.where(kept, targets[lo:hi], 0).unsqueeze(1)
        target_values = torch.where(kept, value, torch.zeros((), dtype=torch.float32)).unsqueeze(1)
        pieces = [tensor.split(block_rows) for tensor in (logits[lo:hi], safe_targets, target_values)]
        picked_blocks = picked[lo:hi].unsqueeze(1).split(block_rows) if picked is not None else None
        grad_blocks = grad[lo:hi].split(block_rows) if grad is not None else None
        for index, (block, block_targets, block_values) in enumerate(zip(*pieces)):
            block_log_probs, block_upstream = log_probs[:block.shape[0]], upstream[:block.shape[0]]
            block_log_probs.copy_(block)  # the seed's logits.float()
            torch._log_softmax(block_log_probs, 1, False, out=block_log_probs)
            if picked_blocks is not None:
                torch.gather(block_log_probs, 1, block_targets, out=picked_blocks[index])
            if grad_blocks is not None:
                block_upstream.scatter_(1, block_targets, block_values)
                torch._log_softmax_backward_data(block_upstream, block_log_probs, 1, torch.float32, out=block_upstream)
                grad_blocks[index].copy_(block_upstream)  # the upcast's backward: the cast back to bf16
                block_upstream.zero_()


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
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="row-block-loss",
                                             initializer=_one_openmp_thread)
    return _POOLS[workers]


@functools.cache
def _openmp_runtimes() -> tuple:
    """The OpenMP runtimes this process may run torch's intra-op threads on (ctypes handles), most likely first.

    torch has no per-thread setting of its intra-op threads (``torch.set_num_threads`` is the process's), but
    OpenMP's ``omp_set_num_threads`` is the calling thread's own. The candidates are the runtimes this process
    has loaded (/proc/self/maps, where there is one), then the one torch ships in torch/lib; none where
    torch's backend is not OpenMP.
    """
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return ()
    candidates = []
    try:
        with open("/proc/self/maps") as maps:
            candidates = [line.split()[-1] for line in maps
                          if line.rstrip().rsplit("/", 1)[-1].startswith(_OPENMP_NAMES)]
    except OSError:
        pass
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    candidates += [path for name in _OPENMP_NAMES for path in sorted(glob.glob(os.path.join(torch_lib, name + "*")))]
    runtimes = []
    for path in dict.fromkeys(candidates):
        try:
            runtime = ctypes.CDLL(path)
            runtime.omp_set_num_threads  # noqa: B018  (the symbol must be there)
            runtimes.append(runtime)
        except (OSError, AttributeError):
            continue
    return tuple(runtimes)


def _one_openmp_thread() -> None:
    """Have this (pool) thread run its kernels on itself alone.

    Otherwise every kernel called from a pool thread (the upcast copy of a block, for one) opens an OpenMP
    team of ``torch.get_num_threads()`` threads of its own: with two pool threads on two cores, four threads
    contend for two, and the loss runs at half its pace. torch sets a new thread's OpenMP threads from its
    global count at the thread's first parallel call, so that call comes first; a runtime that does not
    change what torch sees is not torch's, and the next is tried. The bits do not depend on it: each row is
    reduced on one thread however many there are.
    """
    for runtime in _openmp_runtimes():
        if torch.get_num_threads() == 1:
            return
        runtime.omp_set_num_threads(1)


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
