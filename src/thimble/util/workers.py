"""The threads the stages split their work across (zstd, numpy and the compiled passes release the GIL):
a pool that says its size, and the spans of a range each thread takes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor


class WorkerPool(ThreadPoolExecutor):
    """A thread pool that says how many threads it has (ThreadPoolExecutor keeps that private)."""

    def __init__(self, threads: int, name: str = "thimble"):
        super().__init__(max_workers=threads, thread_name_prefix=name)
        self.threads = threads


def thread_spans(n: int, threads: int) -> list[tuple[int, int]]:
    """[start, stop) spans cutting range(n) into ``threads`` near-equal parts, the larger first (as
    numpy's array_split), empty ones left out: the work each thread takes."""
    base, larger = divmod(n, threads)
    spans, start = [], 0
    for index in range(threads):
        stop = start + base + (index < larger)
        if stop > start:
            spans.append((start, stop))
        start = stop
    return spans
