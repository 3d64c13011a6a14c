"""The row-block loss against transformers' ForCausalLMLoss: the same loss bits and every gradient element.

The CPU kernels these tests hold equal are torch 2.13.0's ``log_softmax`` and ``nll_loss`` (and their
backwards) on whichever kernel set this CPU dispatches to (AVX2 or AVX-512): both sides run the same
kernels, so the comparison holds on each. bench/step_bench.py makes the same comparison for whole training
steps at thimble_7's shape.
"""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from thimble.training.causal_lm_loss import IGNORE_INDEX, row_block_causal_lm_loss
from thimble.training.model import build_model, loss_path, use_loss_path


def loss_and_grad(fn, logits, labels, grad_scale=None, **kwargs):
    leaf = logits.clone().requires_grad_(True)
    loss = fn(leaf, labels, vocab_size=logits.shape[-1], **kwargs)
    (loss if grad_scale is None else loss * grad_scale).backward()
    return loss.detach(), leaf.grad


def assert_same_bits(reference, candidate):
    (loss_a, grad_a), (loss_b, grad_b) = reference, candidate
    assert loss_a.view(torch.int32).item() == loss_b.view(torch.int32).item(), (loss_a.item(), loss_b.item())
    assert grad_a.dtype == grad_b.dtype == torch.bfloat16
    differing = int((grad_a.view(torch.int16) != grad_b.view(torch.int16)).sum())
    assert differing == 0, f"{differing} of {grad_a.numel()} gradient elements differ"


def bf16_logits(shape, seed, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale).to(torch.bfloat16)


@pytest.mark.parametrize("block_rows", [1, 5, 16, 1000])
@pytest.mark.parametrize("shape", [(8, 32, 384), (3, 7, 50)])  # thimble_mini's batch; rows no block divides
def test_row_blocks_equal_transformers_bit_for_bit(shape, block_rows):
    logits = bf16_logits(shape, seed=block_rows)
    labels = torch.randint(0, shape[-1], shape[:2], generator=torch.Generator().manual_seed(1))
    assert_same_bits(loss_and_grad(ForCausalLMLoss, logits, labels),
                     loss_and_grad(row_block_causal_lm_loss, logits, labels, block_rows=block_rows))


def test_ignored_labels_and_an_incoming_gradient_other_than_one():
    logits = bf16_logits((4, 9, 40), seed=3)
    labels = torch.randint(0, 40, (4, 9), generator=torch.Generator().manual_seed(2))
    labels[1, 2:6] = IGNORE_INDEX
    labels[3] = IGNORE_INDEX
    for scale in (None, 0.37, -2.0):  # 1.0 takes the eager backward, the others compute it again
        assert_same_bits(loss_and_grad(ForCausalLMLoss, logits, labels, scale),
                         loss_and_grad(row_block_causal_lm_loss, logits, labels, scale, block_rows=7))


def test_extreme_logits():
    """Rows dominated by one logit, equal logits, and bf16's largest finite values."""
    logits = bf16_logits((2, 6, 64), seed=4, scale=1.0)
    logits[0, 0] = 0.0
    logits[0, 1, 5] = 3.0e38
    logits[1, 2] = -3.0e38
    logits[1, 3, ::2] = 80.0
    labels = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    assert_same_bits(loss_and_grad(ForCausalLMLoss, logits, labels),
                     loss_and_grad(row_block_causal_lm_loss, logits, labels, block_rows=4))


def test_at_thimble_7s_shape():
    """128 x 128 positions over V10000: the 16384 x 10000 logits of a thimble_7 step (163,840,000 gradients)."""
    logits = bf16_logits((128, 128, 10000), seed=6)
    labels = torch.randint(0, 10000, (128, 128), generator=torch.Generator().manual_seed(7))
    assert_same_bits(loss_and_grad(ForCausalLMLoss, logits, labels),
                     loss_and_grad(row_block_causal_lm_loss, logits, labels))


def test_the_model_uses_row_blocks_on_the_cpu_and_says_so():
    settings = {"vocab_size": 50, "max_seq_len": 8, "hidden_dim": 8, "n_layers": 1, "n_heads": 2, "init_scale": 0.02}
    torch.manual_seed(0)
    model = build_model(settings, torch.device("cpu"))
    assert loss_path(torch.device("cpu")) == "row_blocks" and model.loss_function is row_block_causal_lm_loss
    assert loss_path(torch.device("cuda")) == loss_path(torch.device("mps")) == "transformers"
    use_loss_path(model, "transformers")
    assert model.loss_function is ForCausalLMLoss
    with pytest.raises(ValueError, match="unknown loss path"):
        use_loss_path(model, "fused")


@pytest.mark.parametrize("threads", [2, 3])
def test_rows_shared_out_among_threads_change_no_bit(threads):
    logits = bf16_logits((4, 33, 300), seed=9)
    labels = torch.randint(0, 300, (4, 33), generator=torch.Generator().manual_seed(10))
    labels[2, 5:] = IGNORE_INDEX
    reference = loss_and_grad(ForCausalLMLoss, logits, labels)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for scale in (None, 0.5):
            assert_same_bits(loss_and_grad(ForCausalLMLoss, logits, labels, scale),
                             loss_and_grad(row_block_causal_lm_loss, logits, labels, scale, block_rows=6))
        assert_same_bits(reference, loss_and_grad(row_block_causal_lm_loss, logits, labels, block_rows=6))
    finally:
        torch.set_num_threads(previous)


def test_row_spans_cover_every_row_once():
    from thimble.training.causal_lm_loss import _row_spans

    for rows, block, parts in [(16384, 16, 2), (10, 3, 4), (5, 16, 2), (1, 1, 8), (100, 7, 3)]:
        spans = _row_spans(rows, block, parts)
        assert spans[0][0] == 0 and spans[-1][1] == rows and len(spans) <= parts
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all(lo % block == 0 for lo, _ in spans)


def test_refuses_what_the_seed_never_computes():
    logits, labels = bf16_logits((1, 4, 10), seed=8), torch.zeros((1, 4), dtype=torch.long)
    with pytest.raises(ValueError, match="CPU only"):
        row_block_causal_lm_loss(logits, labels, vocab_size=10, num_items_in_batch=torch.tensor(3))


def test_the_pools_threads_run_their_kernels_on_themselves_alone():
    """Each pool thread's kernels on one OpenMP thread (not a team of its own per kernel, which would put
    twice the cores' threads on the cores), while a thread of the process's own still gets torch's count and
    the process's count stays as it was."""
    import sys
    import threading

    from thimble.training.causal_lm_loss import _pool

    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's intra-op threads are not OpenMP's here")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        plain = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        plain.start()
        plain.join()
        assert seen == [2]  # what a pool thread would run on without the setting
        pool_threads = _pool(2).submit(torch.get_num_threads).result()
        assert torch.get_num_threads() == 2
        if sys.platform == "linux":  # torch's Linux builds: GNU OpenMP, found among the loaded libraries
            assert pool_threads == 1
    finally:
        torch.set_num_threads(previous)
