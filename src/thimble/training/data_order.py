"""The seed's data order: every window of the tokens, in shuffled batches, with a position a resume restores."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset


class TokenWindows(Dataset):
    """Every window of ``seq_len + 1`` tokens (the seed's TokenDataset)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return max(0, len(self.tokens) - self.seq_len)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = self.tokens[index: index + self.seq_len + 1]
        return {"input_ids": window[:-1], "labels": window[1:]}


class BatchStream:
    """Endless batches in the seed's order, with a resumable position.

    The seed re-creates the DataLoader iterator at each epoch end; creating it
    draws from the shuffle generator, so the generator state at the start of the
    epoch plus the number of batches consumed pins the position exactly.
    """

    def __init__(self, loader: DataLoader, generator: torch.Generator):
        self.loader, self.generator = loader, generator
        self._start_epoch()

    def _start_epoch(self) -> None:
        self.epoch_generator_state = self.generator.get_state()
        self.iterator = iter(self.loader)
        self.consumed = 0

    def next(self) -> dict[str, torch.Tensor]:
        try:
            batch = next(self.iterator)
        except StopIteration:
            self._start_epoch()
            batch = next(self.iterator)
        self.consumed += 1
        return batch

    def state(self) -> dict:
        return {"epoch_generator_state": self.epoch_generator_state.clone(), "consumed": self.consumed}

    def restore(self, state: dict) -> None:
        self.generator.set_state(state["epoch_generator_state"])
        self._start_epoch()
        for _ in range(state["consumed"]):
            next(self.iterator)
        self.consumed = state["consumed"]


def shuffled_batches(tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int) -> BatchStream:
    """The seed's batches of ``TokenWindows``, shuffled by a generator of their own seeded with ``seed``."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader = DataLoader(TokenWindows(tokens, seq_len), batch_size=batch_size, shuffle=True, generator=generator,
                        num_workers=0)
    return BatchStream(loader, generator)
