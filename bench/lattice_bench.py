"""Benchmark of the post-training stages at thimble size: rechunk vs h5repack, replay, ΔW′ and freeze.

1. A synthetic stream of ``--rechunk-steps`` + 1 thimble-size steps (W a random walk on the bf16
   lattice that slowly freezes, gradients and moments of the recorded magnitudes) is written with
   the StreamRecorder, then rechunked into ``--rechunk-steps``-step chunks twice: by
   ``thimble rechunk`` and by ``h5repack -l`` (Debian's hdf5-tools). Both times and peak RSS print.
   ``thimble replay`` then replays a synthetic stream of ``--replay-steps`` steps (default: the
   experiment's, 6000 for thimble_7: ~25 GB on disk for a few minutes), its speed only: the walk is
   no AdamW trajectory. The whole run is timed, start-up included, not extrapolated from a few steps.
2. A rechunked W of ``--lattice-steps`` + 1 steps (thimble_7: 6000) in 1500-step chunks is written
   directly, and ``thimble lattice`` computes ΔW′ from it; time and peak RSS print.

Each stage runs as its own process, measured by GNU time (wall time, peak RSS of that process).

    python bench/lattice_bench.py --workdir /tmp/thimble-bench   # needs ~40 GB free there
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import torch

from thimble.config import load_config
from thimble.numerics.bf16 import BFLOAT16, bfloat16_h5type, bits_to_torch
from thimble.numerics.lattice import from_ordinal, ordinal
from thimble.record.codec import compress_shuffled, zstd_dcpl
from thimble.record.format import TENSORS
from thimble.record.h5_datasets import create_dataset
from thimble.record.writer import StreamRecorder, write_stream_file


def run_measured(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one command, as GNU time reports them.

    Not wait4 on our own child: a child forked from this (large) process starts with
    its memory counted, which would inflate the child's maximum RSS.
    """
    process = subprocess.run(["/usr/bin/time", "-f", "thimble-bench %e %M", *command], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed:\n{process.stderr[-3000:]}")
    seconds, kilobytes = process.stderr.strip().splitlines()[-1].split()[1:]
    return float(seconds), int(kilobytes) * 1024 / 1e9


class FreezingWalk:
    """W as a walk on the bf16 lattice: a share of elements moves each step, a share that decays."""

    def __init__(self, shape: tuple[int, int], total_steps: int, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.total = total_steps
        start = (self.rng.standard_normal(shape) * 0.02).astype(np.float32).astype(BFLOAT16)
        self.ordinals = ordinal(start)

    def step(self, t: int) -> np.ndarray:
        share = 0.6 * np.exp(-5 * t / self.total) + 0.01  # hot early, nearly frozen late
        moving = self.rng.random(self.ordinals.shape, dtype=np.float32) < share
        size = self.rng.geometric(0.5, size=int(moving.sum())).astype(np.int32)
        sign = np.where(self.rng.random(size.size) < 0.5, -1, 1).astype(np.int32)
        self.ordinals[moving] += size * sign
        return from_ordinal(self.ordinals).view(np.uint16)


def synthetic_stream(directory: Path, steps: int, shape: tuple[int, int]) -> None:
    walk = FreezingWalk(shape, steps)
    rng = np.random.default_rng(1)
    recorder = StreamRecorder(directory, shape, steps, segment_steps=100, threads=os.cpu_count())
    variance = np.full(shape, 1e-8, dtype=np.float32)
    for t in range(steps + 1):
        grad = (rng.standard_normal(shape, dtype=np.float32) * 1e-4)
        variance = 0.999 * variance + 0.001 * grad**2
        tensors = {
            "W": bits_to_torch(walk.step(t)),
            "grad_W": torch.from_numpy(grad).to(torch.bfloat16),
            "momentum_W": torch.from_numpy(grad * 0.5).to(torch.bfloat16),
            "variance_W": torch.from_numpy(variance).to(torch.bfloat16),
        }
        recorder.record(t, tensors, 1.0)
    recorder.close()
    masks = {"live_mask": np.ones(shape[0], bool), "dead_mask": np.zeros(shape[0], bool),
             "live_ids": np.arange(shape[0]), "dead_ids": np.arange(0)}
    # the seed's optimizer settings, so that the replay can run on it (the walk is no AdamW trajectory:
    # it measures the replay's speed, its mismatch counts mean nothing)
    write_stream_file(directory, shape, steps, "bfloat16", masks, {
        "num_steps": steps, "learning_rate": 1e-3, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8,
        "weight_decay": 0.0, "device": "cpu"})


def synthetic_recording(path: Path, steps: int, shape: tuple[int, int], rows: int, threads: int) -> None:
    """A rechunked-format file with what the lattice and freeze stages read: W, variance_W (the same
    walk: only its size matters here), losses and masks (a third of the tokens dead)."""
    walk = FreezingWalk(shape, steps)
    with h5py.File(path, "w") as out:
        dcpl = zstd_dcpl((rows, *shape), 1)
        for name in ("W", "variance_W"):
            create_dataset(out, name, bfloat16_h5type(), (steps + 1, *shape), dcpl)
        for start in range(0, steps + 1, rows):
            chunk = np.zeros((rows, *shape), dtype=np.uint16)
            for row in range(min(rows, steps + 1 - start)):
                chunk[row] = walk.step(start + row)
            compressed = b"".join(compress_shuffled(chunk, 1, threads))
            for name in ("W", "variance_W"):
                out[name].id.write_direct_chunk((start, 0, 0), compressed, 0)
            print(f"  rows {start}..{min(start + rows, steps + 1) - 1} written", flush=True)
        out.create_dataset("losses", data=np.linspace(9, 3, steps + 1, dtype=np.float32))
        out.create_dataset("dead_mask", data=np.arange(shape[0]) % 3 == 0)
        out.attrs.update({"storage_dtype": "bfloat16", "adam_beta1": 0.9, "adam_beta2": 0.999})


def rechunk_vs_h5repack(args, settings: dict, shape: tuple[int, int], stream: Path, workdir: Path,
                        results: dict) -> None:
    start = time.perf_counter()
    synthetic_stream(stream, args.rechunk_steps, shape)
    print(f"synthetic stream of {args.rechunk_steps + 1} steps written in {time.perf_counter() - start:.0f} s")
    rechunk_settings = json.loads(json.dumps(settings))
    rechunk_settings["rechunk"]["steps_per_chunk"] = args.rechunk_steps
    os.sync()
    ours = run_measured([sys.executable, "-m", "thimble", "rechunk", "--settings", json.dumps(rechunk_settings),
                         "--stream", str(stream), "--output", str(workdir / "recording.h5"),
                         "--threads", str(args.threads)])
    chunk_gb = args.rechunk_steps * shape[0] * shape[1] * 2 / 1e9
    raw_gb = len(TENSORS) * (args.rechunk_steps + 1) * shape[0] * shape[1] * 2 / 1e9
    print(f"\nrechunk {raw_gb:.2f} GB of bf16 into {args.rechunk_steps}-step chunks ({chunk_gb:.2f} GB each):")
    print(f"{'tool':<28} {'seconds':>9} {'peak RSS GB':>12} {'RSS / chunk':>12}")
    print(f"{'thimble rechunk':<28} {ours[0]:9.1f} {ours[1]:12.2f} {ours[1] / chunk_gb:12.2f}")
    results["rechunk"] = {"steps": args.rechunk_steps, "chunk_gb": chunk_gb, "thimble": ours}
    if not args.skip_h5repack:
        if shutil.which("h5repack") is None:
            raise SystemExit("h5repack not found: apt-get install hdf5-tools (or pass --skip-h5repack)")
        layout = ",".join(TENSORS) + f":CHUNK={args.rechunk_steps}x{shape[0]}x{shape[1]}"
        env = dict(os.environ, HDF5_PLUGIN_PATH=hdf5plugin.PLUGIN_PATH)
        os.sync()
        # the same filters as thimble's output: shuffle, then zstd (filter 32015) at level 1
        theirs = run_measured(["h5repack", "-l", layout, "-f", f"{','.join(TENSORS)}:SHUF",
                               "-f", f"{','.join(TENSORS)}:UD=32015,0,1,1",
                               str(stream / "stream.h5"), str(workdir / "repack.h5")], env)
        print(f"{'h5repack -l':<28} {theirs[0]:9.1f} {theirs[1]:12.2f} {theirs[1] / chunk_gb:12.2f}")
        print(f"thimble rechunk is {theirs[0] / ours[0]:.1f}x faster with {ours[1] / theirs[1]:.2f}x the memory")
        results["rechunk"]["h5repack"] = theirs
        (workdir / "repack.h5").unlink()
    (workdir / "recording.h5").unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--experiment", default="thimble_7")
    parser.add_argument("--workdir", default="/tmp/thimble-bench-lattice")
    parser.add_argument("--rechunk-steps", type=int, default=1500)
    parser.add_argument("--lattice-steps", type=int, default=None, help="default: the experiment's steps")
    parser.add_argument("--replay-steps", type=int, default=None, help="default: the experiment's steps")
    parser.add_argument("--skip-rechunk", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-h5repack", action="store_true")
    parser.add_argument("--skip-lattice", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()

    settings = load_config(args.config)["experiments"][args.experiment]
    shape = (settings["model"]["vocab_size"], settings["model"]["hidden_dim"])
    lattice_steps = args.lattice_steps or settings["training"]["steps"]
    rows = min(settings["rechunk"]["steps_per_chunk"], lattice_steps + 1)
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    results = {"machine": {"cores": os.cpu_count()}, "shape": shape}
    print(f"{os.cpu_count()} cores; {args.experiment}: V x D = {shape[0]} x {shape[1]}")

    # 1. rechunk vs h5repack
    stream = workdir / "stream"
    replay_steps = args.replay_steps or settings["training"]["steps"]
    if not args.skip_rechunk:
        rechunk_vs_h5repack(args, settings, shape, stream, workdir, results)
    # the replay: every step through the optimizer's step() and the freeze criterion
    if args.skip_rechunk or replay_steps != args.rechunk_steps:
        shutil.rmtree(stream, ignore_errors=True)
        start = time.perf_counter()
        synthetic_stream(stream, replay_steps, shape)
        print(f"synthetic stream of {replay_steps + 1} steps for the replay written in "
              f"{time.perf_counter() - start:.0f} s")
    os.sync()
    replay = run_measured([sys.executable, "-m", "thimble", "replay", "--recording", str(stream), "--table",
                           str(workdir / "replay.csv"), "--summary", str(workdir / "replay.json"), "--ratio-table",
                           str(workdir / "ratio.csv"), "--threads", str(args.threads)])
    print(f"replay of {replay_steps} steps: {replay[0]:.1f} s ({replay[0] / 60:.2f} min, start-up included; "
          f"{replay[0] / replay_steps * 1000:.1f} ms/step), peak RSS {replay[1]:.2f} GB (target: < 2 min for the "
          f"experiment's steps)")
    results["replay"] = {"steps": replay_steps, "seconds": replay[0], "peak_rss_gb": replay[1]}
    shutil.rmtree(stream)

    if args.skip_lattice:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        shutil.rmtree(workdir)
        return
    # 2. ΔW′ at full size
    recording = workdir / "recording.h5"
    start = time.perf_counter()
    synthetic_recording(recording, lattice_steps, shape, rows, args.threads)
    print(f"synthetic W of {lattice_steps + 1} steps in {rows}-step chunks written in "
          f"{time.perf_counter() - start:.0f} s")
    os.sync()
    lattice = run_measured([sys.executable, "-m", "thimble", "lattice", "--recording", str(recording),
                            "--output", str(workdir / "delta.h5"), "--threads", str(args.threads)])
    elements = lattice_steps * shape[0] * shape[1]
    print(f"\nΔW′ of {lattice_steps} x {shape[0]} x {shape[1]} = {elements / 1e9:.2f} G elements: "
          f"{lattice[0]:.1f} s ({elements / lattice[0] / 1e6:.0f} M elements/s), peak RSS {lattice[1]:.2f} GB "
          f"(targets: < 120 s, < 6 GB)")
    with h5py.File(workdir / "delta.h5", "r") as delta:
        attrs = dict(delta["delta_w_lattice"].attrs)
        print(f"ΔW′ stored as {attrs['dtype']}, {(workdir / 'delta.h5').stat().st_size / 1e9:.2f} GB on disk; "
              f"{attrs['moves']} moves, {attrs['crossed_binade_fraction']:.4f} crossed a binade")
    results["lattice"] = {"steps": lattice_steps, "seconds": lattice[0], "peak_rss_gb": lattice[1]}

    # 3. the freeze tables from that ΔW′ (and the recording's exp_avg_sq)
    freeze_settings = json.loads(json.dumps(settings))
    freeze_settings["training"]["steps"] = lattice_steps
    os.sync()
    tables = {name: str(workdir / f"{name}.out") for name in
              ("freeze", "cycles", "tokens", "classes", "lattice-positions", "variance", "token-steps", "summary")}
    freeze = run_measured([sys.executable, "-m", "thimble", "freeze", "--threads", str(args.threads),
                           "--settings", json.dumps(freeze_settings),
                           "--delta", str(workdir / "delta.h5"), "--recording", str(recording),
                           *[arg for name, path in tables.items() for arg in (f"--{name}", path)]])
    print(f"freeze tables of the same ΔW′: {freeze[0]:.1f} s, peak RSS {freeze[1]:.2f} GB (targets: < 120 s, < 6 GB)")
    results["freeze"] = {"seconds": freeze[0], "peak_rss_gb": freeze[1]}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
