"""A run's disk footprint beside the seed notebook's storage of the same tensors and steps.

The seed (Thimble 6) stored W, grad_W, momentum_W and variance_W as float16 (lossy for bf16), one step
per chunk, gzip level 1. This bench writes that layout from a recording.h5 for every tensor the recording
holds: the embedding's four of a recording of W alone, every recorded parameter's value, gradient and
optimizer state of one that records more (``record.tensors``, its ``params/`` group), float32 state (under
fp32_master) cast to float16 too. The values are cast to float16 as the seed's loop did; chunks are deflated
by zlib level 1, HDF5's deflate filter, in a thread pool and stored with direct chunk writes, so the bytes are
what h5py would write, only sooner. It prints, side by side, the seed file, recording.h5 (by state key and by
parameter) and every file the run left in its results folder, and whether recording.h5 is within
``GOAL`` of the seed's file.

    python bench/footprint.py results/thimble_7_all --seed-file /tmp/seed_layout.h5 [--threads 2]
        [--default-window]   # also recompress recording.h5 with zstd's own window (the previous codec)

Which CPU ran it does not change a size; the seconds it prints are this machine's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401
import numpy as np

from thimble.numerics.bf16 import BFLOAT16
from thimble.record.codec import FrameEncoder, window_log_for, zstd_level
from thimble.record.format import RecordLayout
from thimble.record.reader import RecordedTensor
from thimble.util.workers import WorkerPool

#: recording.h5 against the seed's file of the same tensors: the most it may take
GOAL = 0.75
#: steps read and compressed at once
BLOCK_STEPS = 32


def bf16_bits_to_float16(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns as float16, rounded to nearest as torch's ``.to(torch.float16)`` rounds."""
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float16)


def stored_values(bits: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A recorded tensor's stored bits (``RecordedTensor.bits``) as the values they are, float32 for bf16."""
    if dtype == BFLOAT16:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(dtype)


def recorded_datasets(handle: h5py.File) -> dict[str, tuple[str, str]]:
    """Every recorded dataset of a recording (each once, hard links not again), by path: (parameter, state key).
    A recording written before ``params/`` holds the embedding alone under the seed's names."""
    return {path: (param.name, key) for param in RecordLayout.of_file(handle).params.values()
            for key, path in param.paths.items()}


def write_seed_layout(recording: Path, out_path: Path, threads: int) -> dict:
    """The seed's file of every recorded tensor of the recording's steps, at the recording's paths (and the
    embedding's seed names linked, as the recording links them); returns seconds and the count of values
    float16 altered."""
    started, altered = time.perf_counter(), 0
    with h5py.File(recording, "r") as source, h5py.File(out_path, "w") as out, \
            ThreadPoolExecutor(threads) as pool:
        layout = RecordLayout.of_file(source)
        for path in recorded_datasets(source):
            tensor = RecordedTensor(source[path])
            n_steps, *shape = tensor.shape
            target = out.create_dataset(path, shape=tensor.shape, dtype="float16", chunks=(1, *shape),
                                        compression="gzip", compression_opts=1)
            origin = (0,) * len(shape)
            for first, block in tensor.blocks(BLOCK_STEPS):
                exact = stored_values(block, tensor.dtype)
                values = exact.astype(np.float16)
                altered += int(np.count_nonzero(values.astype(exact.dtype) != exact))
                frames = pool.map(lambda step: zlib.compress(values[step].tobytes(), 1), range(len(values)))
                for offset, frame in enumerate(frames):
                    target.id.write_direct_chunk((first + offset, *origin), frame, 0)
            # what h5py reads back is what was stored: one step, through HDF5's own filter
            check_step = n_steps // 2
            expected = stored_values(tensor.bits(check_step, check_step + 1), tensor.dtype).astype(np.float16)
            assert np.array_equal(target[check_step], expected[0]), path
        layout.link_aliases(out)
        n_steps = source["losses"].shape[0]
        out.create_dataset("losses", data=source["losses"][...].astype(np.float32), chunks=(min(1000, n_steps),),
                           compression="gzip", compression_opts=1)
        for name in ("live_mask", "dead_mask", "live_ids", "dead_ids"):
            if name in source:
                out.create_dataset(name, data=source[name][...])
    return {"seconds": time.perf_counter() - started, "float16_altered_values": altered}


def default_window_bytes(recording: Path, threads: int) -> dict[str, int]:
    """recording.h5's tensors recompressed chunk by chunk with zstd's own window for the level."""
    sizes = {}
    with h5py.File(recording, "r") as source, WorkerPool(threads) as pool:
        for path in recorded_datasets(source):
            tensor = RecordedTensor(source[path])
            rows, level = tensor.chunk_rows, zstd_level(source[path])
            total = 0
            for first in range(0, tensor.shape[0], rows):
                chunk = np.zeros((rows, *tensor.shape[1:]), dtype=tensor.bits_dtype)
                chunk[: min(rows, tensor.shape[0] - first)] = tensor.chunk(first)
                encoder = FrameEncoder(chunk.nbytes, level, pool.threads)  # no window_log: the level's own
                encoder.add_shuffled(chunk)
                total += sum(map(len, encoder.finish()))
            sizes[path] = total
    return sizes


def dataset_sizes(recording: Path, seed_file: Path) -> dict[str, dict]:
    """Each recorded dataset: its parameter, state key, shape, stored dtype, raw bytes (T+1 steps uncompressed)
    and stored bytes in recording.h5 and in the seed's file."""
    sizes = {}
    with h5py.File(recording, "r") as source, h5py.File(seed_file, "r") as seed:
        for path, (param, key) in recorded_datasets(source).items():
            tensor = RecordedTensor(source[path])
            sizes[path] = {"parameter": param, "key": key, "shape": list(tensor.shape), "dtype": str(tensor.dtype),
                           "raw_bytes": math.prod(tensor.shape) * tensor.bits_dtype.itemsize,
                           "recording_bytes": source[path].id.get_storage_size(),
                           "seed_bytes": seed[path].id.get_storage_size()}
    return sizes


def totals_by(sizes: dict[str, dict], field: str) -> dict[str, dict]:
    """The datasets' raw, recording and seed bytes summed by ``field`` (``parameter`` or ``key``)."""
    totals: dict[str, dict] = {}
    for entry in sizes.values():
        total = totals.setdefault(entry[field], {"raw_bytes": 0, "recording_bytes": 0, "seed_bytes": 0})
        for name in total:
            total[name] += entry[name]
    return totals


def run_files(results: Path) -> dict[str, int]:
    files = {}
    for path in sorted(results.rglob("*")):
        if path.is_file():
            files[str(path.relative_to(results))] = path.stat().st_size
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="an experiment's results folder, e.g. results/thimble_7_all")
    parser.add_argument("--seed-file", type=Path, required=True, help="where to write the seed's layout")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--default-window", action="store_true",
                        help="also recompress recording.h5 at its level with the level's own zstd window")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    args = parser.parse_args(argv)
    recording = args.results / "recording.h5"
    with h5py.File(recording, "r") as handle:
        layout = RecordLayout.of_file(handle)
        largest = max(layout.params.values(), key=lambda param: math.prod(param.shape))
        dataset = handle[next(iter(largest.paths.values()))]
        n_steps, steps_per_chunk, level = dataset.shape[0], dataset.chunks[0], zstd_level(dataset)
    seed = write_seed_layout(recording, args.seed_file, args.threads)
    seed_bytes = args.seed_file.stat().st_size
    sizes = dataset_sizes(recording, args.seed_file)
    raw = sum(entry["raw_bytes"] for entry in sizes.values())
    files = run_files(args.results)
    left = sum(files.values())
    recording_bytes = recording.stat().st_size
    values = sum(math.prod(param.shape) for param in layout.params.values())
    report = {"results": str(args.results), "steps": n_steps, "parameters": len(layout.params),
              "values_per_step": values, "largest": {"name": largest.name, "shape": list(largest.shape)},
              "steps_per_chunk": steps_per_chunk, "zstd_level": level,
              "window_log": window_log_for(math.prod(largest.shape), level),
              "raw_bytes": raw, "seed_layout_bytes": seed_bytes, "seed": seed,
              "recording_bytes": recording_bytes, "recording_over_seed": recording_bytes / seed_bytes,
              "goal": GOAL, "within_goal": recording_bytes <= GOAL * seed_bytes,
              "datasets": sizes, "by_key": totals_by(sizes, "key"), "by_parameter": totals_by(sizes, "parameter"),
              "files": files, "all_files_bytes": left}
    if args.default_window:
        report["default_window_tensor_bytes"] = default_window_bytes(recording, args.threads)

    print(f"{args.results}: {n_steps} steps of {len(layout.params)} parameter{'s' * (len(layout.params) != 1)} "
          f"({values:,} values a step, the "
          f"largest {largest.name} {' x '.join(map(str, largest.shape))}), recording chunks of {steps_per_chunk} "
          f"steps, zstd window 2^{report['window_log']}")
    print(f"  {f'raw ({len(sizes)} tensors as stored)':32s}{raw / 1e9:8.3f} GB")
    print(f"  {'seed layout (float16, gzip 1)':32s}{seed_bytes / 1e9:8.3f} GB  {seed_bytes / raw:.3f} of raw "
          f"({seed['float16_altered_values']} values altered by float16; written in {seed['seconds']:.0f} s)")
    print(f"  {'recording.h5':32s}{recording_bytes / 1e9:8.3f} GB  {recording_bytes / raw:.3f} of raw, "
          f"{report['recording_over_seed']:.3f} x seed (goal at most {GOAL}: "
          f"{'within' if report['within_goal'] else 'over'})")
    window = report.get("default_window_tensor_bytes", {})
    for key, total in report["by_key"].items():
        line = (f"    {key:11s} {total['recording_bytes'] / total['raw_bytes']:.3f} of raw, "
                f"{total['recording_bytes'] / total['seed_bytes']:.3f} x seed")
        if window:
            own = sum(window[path] for path, entry in sizes.items() if entry["key"] == key)
            line += f" (zstd's own window: {own / total['raw_bytes']:.3f} of raw)"
        print(line)
    if len(layout.params) > 1:
        print("  by parameter (recording.h5 against the seed's layout of its tensors):")
        for name, total in report["by_parameter"].items():
            print(f"    {name:40s} {total['recording_bytes'] / 1e6:10.3f} MB  "
                  f"{total['recording_bytes'] / total['seed_bytes']:.3f} x seed")
    print(f"  {'all files the run left':32s}{left / 1e9:8.3f} GB  {left / seed_bytes:.3f} x seed")
    for name, size in files.items():
        if size > 1e6:
            print(f"    {name:40s} {size / 1e9:.3f} GB")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
