"""Decoded chunks of recorded tensors, kept within a memory budget, so that reading a run step by step
decodes each stored chunk about once.

In ``recording.h5`` a chunk holds ``rechunk.steps_per_chunk`` steps of a tensor
and is one zstd frame: reading any step of it means decoding all of it. The
cache keeps decoded chunks (their stored bits, uint16 or uint32), evicting the
least recently used past ``budget_bytes``; a chunk larger than the whole budget
is decoded and dropped after the read (each such read costs a chunk decode, and
``ChunkCache.oversized`` counts them so that the caller can say so). A stream
(``stream/``, one step per chunk) goes through the same cache, a step at a time.

Every chunk is decoded by ``thimble.record.reader.RecordedTensor.chunk``, which verifies each zstd frame's
checksum: a damaged chunk is a ``DataError`` naming the file, the dataset and the steps, and nothing damaged is
ever cached.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

from thimble.record.reader import RecordedTensor

#: the default budget's share of the machine's memory, and its ceiling
DEFAULT_SHARE_OF_RAM = 0.25
DEFAULT_CEILING_BYTES = 4 << 30


def default_budget_bytes() -> int:
    """A quarter of the machine's memory, at most 4 GiB: room for a thimble_7 chunk (~1.9 GB) of one tensor."""
    import psutil

    return int(min(DEFAULT_CEILING_BYTES, psutil.virtual_memory().total * DEFAULT_SHARE_OF_RAM))


def as_slice(positions: np.ndarray) -> slice | np.ndarray:
    """Evenly spaced increasing positions as the slice that selects them (numpy slices without copying,
    20 times faster than indexing by an array), else the positions themselves."""
    if len(positions) == 1:
        return slice(int(positions[0]), int(positions[0]) + 1)
    stride = np.diff(positions)
    if len(positions) and stride[0] > 0 and (stride == stride[0]).all():
        return slice(int(positions[0]), int(positions[-1]) + 1, int(stride[0]))
    return positions


@dataclass
class CacheStats:
    """What the cache did: chunks decoded, reads served from a kept chunk, chunks too large to keep."""

    decoded: int = 0
    hits: int = 0
    oversized: int = 0
    decoded_bytes: int = 0


class ChunkCache:
    """Decoded chunks keyed by (file:dataset, first step), least recently used evicted past ``budget_bytes``."""

    def __init__(self, budget_bytes: int | None = None):
        self.budget_bytes = default_budget_bytes() if budget_bytes is None else int(budget_bytes)
        if self.budget_bytes < 0:
            raise ValueError(f"the cache budget is a number of bytes >= 0, not {budget_bytes}")
        #: (file:dataset, first step) -> (the decoded steps, the bytes they hold)
        self._chunks: collections.OrderedDict[tuple, tuple[np.ndarray, int]] = collections.OrderedDict()
        self.held_bytes = 0
        self.stats = CacheStats()

    def chunk(self, tensor: RecordedTensor, first: int) -> np.ndarray:
        """The decoded chunk of ``tensor`` whose first step is ``first`` (its valid steps only)."""
        key = (tensor.where, first)
        if key in self._chunks:
            self._chunks.move_to_end(key)
            self.stats.hits += 1
            return self._chunks[key][0]
        bits = tensor.chunk(first)
        held = bits.nbytes if bits.base is None else bits.base.nbytes  # an edge chunk holds its padding too
        self.stats.decoded += 1
        self.stats.decoded_bytes += held
        if held > self.budget_bytes:
            self.stats.oversized += 1
            return bits
        while self._chunks and self.held_bytes + held > self.budget_bytes:
            _, (evicted, evicted_bytes) = self._chunks.popitem(last=False)
            self.held_bytes -= evicted_bytes
        bits.flags.writeable = False  # a caller must not edit what later reads will be served
        self._chunks[key] = (bits, held)
        self.held_bytes += held
        return bits

    def rows(self, tensor: RecordedTensor, steps: np.ndarray, tokens: slice | np.ndarray) -> np.ndarray:
        """The stored bits of ``steps`` (an int array, any order, repeats allowed) and ``tokens`` (a slice or an
        int array over axis 1) of ``tensor``, shaped (len(steps), tokens, ...): each chunk they touch is
        decoded at most once, and only the chunks they touch."""
        per_chunk = tensor.chunk_rows
        n_tokens = len(range(*tokens.indices(tensor.shape[1]))) if isinstance(tokens, slice) else len(tokens)
        out = np.empty((len(steps), n_tokens, *tensor.shape[2:]), dtype=tensor.bits_dtype)
        firsts = steps - steps % per_chunk
        for first in (np.unique(firsts) if len(firsts) > 1 else firsts):
            where = np.flatnonzero(firsts == first) if len(firsts) > 1 else slice(None)
            chunk = self.chunk(tensor, int(first))
            rows = as_slice(steps[where] - first)
            # a slice of steps is a view; fancy indexing copies, so only the token rows asked for are copied
            out[where] = chunk[rows, tokens] if isinstance(tokens, slice) or isinstance(rows, slice) \
                else chunk[rows[:, None], tokens[None, :]]
        return out

    def clear(self) -> None:
        self._chunks.clear()
        self.held_bytes = 0

    def __repr__(self) -> str:
        return (f"<ChunkCache {len(self._chunks)} chunks, {self.held_bytes / 2**20:.1f} of "
                f"{self.budget_bytes / 2**20:.1f} MiB; {self.stats}>")
