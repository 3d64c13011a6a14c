"""Notebook reads: single-step reads through ``thimble.open_run``, with and without its chunk cache.

For each recording it times, per step read (``run.W[t]``, W of one step as a bf16 tensor):
- ``no cache``: ``cache_bytes=0``, each read decodes the whole time chunk holding the step (what
  open_run did before its cache: HDF5's chunk cache never saw thimble's direct chunk reads);
- ``in order, cached``: stepping through the steps in order with the default budget, so each chunk
  is decoded once and the other reads of it are served from memory;
- ``cached chunk``: reads of a chunk already decoded;
- ``stream``: the same steps from ``stream/`` (one step per chunk), when the stream is there.

Recordings: a finished experiment's results folder (``--run results/thimble_small``), and a synthetic
recording at full width (V=10000, D=64, bf16 values of N(0, 0.02) as W holds, written with
thimble's codec as ``thimble rechunk`` writes them), ``--synthetic-steps`` steps in chunks of
``--synthetic-chunk`` steps.

    python bench/notebook_bench.py --run results/thimble_small --synthetic-chunk 250
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from thimble.notebook.run import open_run
from thimble.numerics.bf16 import BFLOAT16
from thimble.record.codec import encode_chunk, write_chunk
from thimble.record.format import create_checked_array, create_tensor_dataset
from thimble.util.cpu import this_cpu


def cpu_name() -> str:
    """The CPU's model name and torch's CPU capability (``thimble.util.cpu``): which machine produced the numbers."""
    this = this_cpu()
    return f"{this['device_name']} ({os.cpu_count()} CPUs), torch CPU capability {this['cpu_capability']}"


def write_synthetic(directory: Path, steps: int, chunk: int, vocab: int = 10000, dim: int = 64) -> Path:
    """results/synthetic/recording.h5 with W only (the reads time one tensor)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with h5py.File(directory / "recording.h5", "w") as out:
        dataset = create_tensor_dataset(out, "W", (steps, vocab, dim), chunk, "bfloat16", 1)
        for first in range(0, steps, chunk):
            block = np.zeros((chunk, vocab, dim), np.uint16)
            rows = min(chunk, steps - first)
            block[:rows] = (rng.standard_normal((rows, vocab, dim), dtype=np.float32) * 0.02).astype(BFLOAT16) \
                .view(np.uint16)
            write_chunk(dataset, first, encode_chunk(block, 1))
        create_checked_array(out, "losses", np.zeros(steps, np.float32))
        create_checked_array(out, "dead_mask", np.zeros(vocab, bool))
        out.attrs.update({"storage_dtype": "bfloat16", "dataset": "synthetic", "vocab_size": vocab,
                          "recorded_tensors": json.dumps({"W": "bfloat16"})})
    return directory


def per_read(run, steps) -> float:
    """Mean seconds per ``run.W[t]`` over ``steps``."""
    start = time.perf_counter()
    for step in steps:
        run.W[int(step)]
    return (time.perf_counter() - start) / len(steps)


def measure(directory: Path, reads: int) -> dict:
    with open_run(directory, source="recording", cache_bytes=0) as run:
        steps, chunk = len(run.W), run.W._tensor.chunk_rows
        shape = run.W.shape
        spread = np.linspace(0, steps - 1, min(reads, steps)).astype(int)
        uncached = per_read(run, spread[: max(3, reads // 10)])
    with open_run(directory, source="recording") as run:
        in_order = per_read(run, range(steps))
        decoded = run.cache.stats.decoded
        hits = per_read(run, range(min(steps, chunk)))  # chunk 0 may have been evicted: first read decodes
        hits = per_read(run, range(min(steps, chunk)))
    result = {"recording": str(directory / "recording.h5"), "shape": shape, "steps_per_chunk": chunk,
              "chunk_mib": chunk * int(np.prod(shape[1:])) * 2 / 2**20,
              "no_cache_ms": uncached * 1e3, "in_order_cached_ms": in_order * 1e3,
              "chunks_decoded_in_order": decoded, "cached_chunk_ms": hits * 1e3}
    if (directory / "stream" / "stream.h5").exists():
        with open_run(directory, source="stream") as run:
            result["stream_ms"] = per_read(run, range(min(steps, reads))) * 1e3
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[], help="an experiment's results folder")
    parser.add_argument("--synthetic-steps", type=int, default=500)
    parser.add_argument("--synthetic-chunk", type=int, default=250)
    parser.add_argument("--reads", type=int, default=200)
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}; torch {torch.__version__}")
    results = [measure(Path(path), args.reads) for path in args.run]
    with tempfile.TemporaryDirectory() as scratch:
        synthetic = write_synthetic(Path(scratch) / "results/synthetic", args.synthetic_steps, args.synthetic_chunk)
        results.append(measure(synthetic, args.reads))
    print("| recording | shape | steps per chunk (MiB) | no cache, ms/step | in order, cached, ms/step "
          "(chunks decoded) | cached chunk, ms/step | stream, ms/step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['recording']} | {r['shape']} | {r['steps_per_chunk']} ({r['chunk_mib']:.0f}) | "
              f"{r['no_cache_ms']:.1f} | {r['in_order_cached_ms']:.2f} ({r['chunks_decoded_in_order']}) | "
              f"{r['cached_chunk_ms']:.3f} | {r.get('stream_ms', float('nan')):.2f} |")


if __name__ == "__main__":
    main()
