"""Live/dead token masks: a token is live when it occurs in the model corpus."""

from __future__ import annotations

import logging

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from thimble.errors import DataError
from thimble.util.files import atomic_output

log = logging.getLogger(__name__)


def live_dead_masks(token_ids: np.ndarray, vocab_size: int, source: str = "the token ids") -> dict[str, torch.Tensor]:
    """The seed's mask tensors: ``live_mask``, ``dead_mask`` (bool), ``live_indices``, ``dead_indices`` (int64).

    ``source`` names where the ids came from (their file) in the ``DataError`` raised for ids outside the
    vocabulary: such ids were encoded with another tokenizer or vocab_size, which the user fixes.
    """
    if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= vocab_size):
        raise DataError(f"{source}: token ids span [{token_ids.min()}, {token_ids.max()}], outside a vocabulary of "
                        f"{vocab_size}; encode the corpus with the dataset's tokenizer (`thimble encode`; snakemake "
                        f"reruns it when you delete tokens.npy) or set the dataset's vocab_size to the tokenizer's")
    live = np.zeros(vocab_size, dtype=bool)
    live[token_ids] = True
    return {
        "live_mask": torch.from_numpy(live),
        "dead_mask": torch.from_numpy(~live),
        "live_indices": torch.from_numpy(np.flatnonzero(live).astype(np.int64)),
        "dead_indices": torch.from_numpy(np.flatnonzero(~live).astype(np.int64)),
    }


def load_masks(path: str) -> dict[str, torch.Tensor]:
    return load_file(path)


def write_masks(tokens_path: str, vocab_size: int, output: str) -> None:
    from thimble.data.tokenizer import load_token_ids

    token_ids = load_token_ids(tokens_path, vocab_size)
    masks = live_dead_masks(token_ids, vocab_size, tokens_path)
    with atomic_output(output) as tmp:
        save_file(masks, str(tmp))
    n_live = int(masks["live_mask"].sum())
    log.info("vocabulary %d: %d live, %d dead (%.1f%%) over %d corpus tokens -> %s", vocab_size, n_live,
             vocab_size - n_live, 100 * (vocab_size - n_live) / vocab_size, token_ids.size, output)
