"""A run's disk footprint beside the seed notebook's storage of the same steps.

The seed (Thimble 6) stored W, grad_W, momentum_W and variance_W as float16 (lossy for bf16), one step
per chunk, gzip level 1. This bench writes that layout from a recording.h5 (the values cast bf16 ->
float16 as the seed's loop did; chunks deflated by zlib level 1, HDF5's deflate filter, in a thread pool
and stored with direct chunk writes, so the bytes are what h5py would write, only sooner) and prints, side
by side, the seed file, recording.h5, and every file the run left in its results folder.

    python bench/footprint.py results/thimble_wide --seed-file /tmp/seed_layout.h5 [--threads 2]
        [--default-window]   # also recompress recording.h5 with zstd's own window (the previous codec)

Which CPU ran it does not change a size; the seconds it prints are this machine's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401
import numpy as np

from thimble.record.codec import FrameEncoder, window_log_for, zstd_level
from thimble.record.reader import RecordedTensor
from thimble.util.workers import WorkerPool

TENSORS = ("W", "grad_W", "momentum_W", "variance_W")


def bf16_bits_to_float16(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns as float16, rounded to nearest as torch's ``.to(torch.float16)`` rounds."""
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float16)


def write_seed_layout(recording: Path, out_path: Path, threads: int) -> dict:
    """The seed's file for the recording's steps; returns seconds and the float16-altered value count."""
    started, altered = time.perf_counter(), 0
    with h5py.File(recording, "r") as source, h5py.File(out_path, "w") as out, \
            ThreadPoolExecutor(threads) as pool:
        n_steps, vocab, hidden = source["W"].shape
        for name in TENSORS:
            target = out.create_dataset(name, shape=(n_steps, vocab, hidden), dtype="float16",
                                        chunks=(1, vocab, hidden), compression="gzip", compression_opts=1)
            for first, block in RecordedTensor.of_recording(source, name).blocks(32):
                exact = (block.astype(np.uint32) << 16).view(np.float32)
                values = exact.astype(np.float16)
                altered += int(np.count_nonzero(values.astype(np.float32) != exact))
                frames = pool.map(lambda step: zlib.compress(values[step].tobytes(), 1), range(len(values)))
                for offset, frame in enumerate(frames):
                    target.id.write_direct_chunk((first + offset, 0, 0), frame, 0)
        out.create_dataset("losses", data=source["losses"][...].astype(np.float32), chunks=(min(1000, n_steps),),
                           compression="gzip", compression_opts=1)
        for name in ("live_mask", "dead_mask", "live_ids", "dead_ids"):
            if name in source:
                out.create_dataset(name, data=source[name][...])
        # what h5py reads back is what was stored: one step, through HDF5's own filter
        check_step = n_steps // 2
        assert np.array_equal(out["W"][check_step],
                              bf16_bits_to_float16(RecordedTensor(source["W"]).bits(check_step, check_step + 1)[0]))
    return {"seconds": time.perf_counter() - started, "float16_altered_values": altered}


def default_window_bytes(recording: Path, threads: int) -> dict[str, int]:
    """recording.h5's tensors recompressed chunk by chunk with zstd's own window for the level."""
    sizes = {}
    with h5py.File(recording, "r") as source, WorkerPool(threads) as pool:
        for name in TENSORS:
            dataset = source[name]
            rows, level = dataset.chunks[0], zstd_level(dataset)
            total = 0
            for first in range(0, dataset.shape[0], rows):
                chunk = np.zeros((rows, *dataset.shape[1:]), dtype=np.uint16)
                chunk[: min(rows, dataset.shape[0] - first)] = RecordedTensor(dataset).chunk(first)
                encoder = FrameEncoder(chunk.nbytes, level, pool.threads)  # no window_log: the level's own
                encoder.add_shuffled(chunk)
                total += sum(map(len, encoder.finish()))
            sizes[name] = total
    return sizes


def stored_bytes(recording: Path) -> dict[str, int]:
    with h5py.File(recording, "r") as handle:
        return {name: handle[name].id.get_storage_size() for name in TENSORS}


def run_files(results: Path) -> dict[str, int]:
    files = {}
    for path in sorted(results.rglob("*")):
        if path.is_file():
            files[str(path.relative_to(results))] = path.stat().st_size
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="an experiment's results folder, e.g. results/thimble_wide")
    parser.add_argument("--seed-file", type=Path, required=True, help="where to write the seed's layout")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--default-window", action="store_true",
                        help="also recompress recording.h5 at its level with the level's own zstd window")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    args = parser.parse_args(argv)
    recording = args.results / "recording.h5"
    with h5py.File(recording, "r") as handle:
        n_steps, vocab, hidden = handle["W"].shape
        steps_per_chunk, level = handle["W"].chunks[0], zstd_level(handle["W"])
    raw = n_steps * vocab * hidden * 2 * len(TENSORS)
    seed = write_seed_layout(recording, args.seed_file, args.threads)
    seed_bytes = args.seed_file.stat().st_size
    files = run_files(args.results)
    left = sum(files.values())
    report = {"results": str(args.results), "steps": n_steps, "vocab": vocab, "hidden": hidden,
              "steps_per_chunk": steps_per_chunk, "zstd_level": level, "window_log": window_log_for(vocab * hidden, level),
              "raw_bf16_bytes": raw, "seed_layout_bytes": seed_bytes, "seed": seed,
              "recording_bytes": recording.stat().st_size, "recording_tensor_bytes": stored_bytes(recording),
              "files": files, "all_files_bytes": left}
    if args.default_window:
        report["default_window_tensor_bytes"] = default_window_bytes(recording, args.threads)

    print(f"{args.results}: {n_steps} steps of {vocab} x {hidden}, recording chunks of {steps_per_chunk} steps, "
          f"zstd window 2^{report['window_log']}")
    print(f"  raw bf16 (4 tensors)            {raw / 1e9:8.3f} GB")
    print(f"  seed layout (float16, gzip 1)   {seed_bytes / 1e9:8.3f} GB  {seed_bytes / raw:.3f} of raw "
          f"({seed['float16_altered_values']} values altered by float16; written in {seed['seconds']:.0f} s)")
    print(f"  recording.h5                    {report['recording_bytes'] / 1e9:8.3f} GB  "
          f"{report['recording_bytes'] / raw:.3f} of raw, {report['recording_bytes'] / seed_bytes:.3f} x seed")
    for name, size in report["recording_tensor_bytes"].items():
        line = f"    {name:11s} {size / (raw / 4):.3f} of raw"
        if args.default_window:
            line += f" (zstd's own window: {report['default_window_tensor_bytes'][name] / (raw / 4):.3f})"
        print(line)
    print(f"  all files the run left          {left / 1e9:8.3f} GB  {left / seed_bytes:.3f} x seed")
    for name, size in files.items():
        if size > 1e6:
            print(f"    {name:40s} {size / 1e9:.3f} GB")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
