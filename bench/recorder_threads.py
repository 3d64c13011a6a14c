"""The recorder alone at full width, per compression thread: how many cores a GPU training job needs.

Real recorded steps (W, grad_W and both moments of a full-width recording.h5, e.g. thimble_wide's,
cycled) go through thimble's StreamRecorder exactly as training hands them over (CPU tensors, one
``record`` per step, segments fsynced and renamed), with 1, 2, ... compression threads, alternating over
``--rounds``. It prints steps/s per thread count, and the threads that keep pace with a device stepping
at ``--device-steps-per-second`` (a GPU's unrecorded thimble_7 rate, e.g. an H100's 114 measured in
docs/benchmarks.md): the ``threads`` a GPU job should ask for, plus the one the training loop runs on.

    python bench/recorder_threads.py results/thimble_wide/recording.h5 --threads 1 2 --steps 200 \\
        --workdir /tmp/rt --device-steps-per-second 114
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401
import numpy as np
import torch

from thimble.numerics.bf16 import bits_to_torch
from thimble.record.format import TENSORS
from thimble.record.reader import RecordedTensor
from thimble.record.writer import StreamRecorder
from thimble.util.cpu import this_cpu


def recorded_steps(recording: Path, first: int, count: int) -> list[dict]:
    with h5py.File(recording, "r") as handle:
        blocks = {name: RecordedTensor(handle[name]).bits(first, first + count) for name in TENSORS}
        losses = handle["losses"][first: first + count]
    return [{"tensors": {name: bits_to_torch(np.ascontiguousarray(blocks[name][index])) for name in TENSORS},
             "loss": float(losses[index])} for index in range(count)]


def time_recorder(steps: list[dict], n_steps: int, threads: int, directory: Path, segment_steps: int) -> float:
    shutil.rmtree(directory, ignore_errors=True)
    vocab, hidden = steps[0]["tensors"]["W"].shape
    recorder = StreamRecorder(directory, (vocab, hidden), n_steps - 1, segment_steps=segment_steps, threads=threads)
    started = time.perf_counter()
    for step in range(n_steps):
        item = steps[step % len(steps)]
        # training hands over fresh copies each step: so does the bench
        recorder.record(step, {name: tensor.clone() for name, tensor in item["tensors"].items()}, item["loss"])
    recorder.close()
    return n_steps / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recording", type=Path)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=200, help="steps recorded per round")
    parser.add_argument("--distinct-steps", type=int, default=50, help="real steps cycled (late ones: frozen)")
    parser.add_argument("--first-step", type=int, default=None, help="default: the last --distinct-steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--segment-steps", type=int, default=100)
    parser.add_argument("--device-steps-per-second", type=float, default=None)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with h5py.File(args.recording, "r") as handle:
        n_rows = handle["W"].shape[0]
    first = n_rows - args.distinct_steps if args.first_step is None else args.first_step
    steps = recorded_steps(args.recording, first, args.distinct_steps)
    step_bytes = sum(t.numel() * t.element_size() for t in steps[0]["tensors"].values())
    rates: dict[int, list[float]] = {threads: [] for threads in args.threads}
    for _ in range(args.rounds):
        for threads in args.threads:
            rates[threads].append(time_recorder(steps, args.steps, threads, args.workdir / "stream",
                                                args.segment_steps))
    shutil.rmtree(args.workdir / "stream", ignore_errors=True)
    print(f"{args.recording}: steps {first}..{first + args.distinct_steps - 1} cycled to {args.steps}, "
          f"{step_bytes / 1e6:.2f} MB per step, torch {torch.__version__}, "
          f"cpu {this_cpu()['device_name']}, cpu_capability {this_cpu()['cpu_capability']}")
    print("| compression threads | steps/s (median) | rounds | MB/s |")
    print("| --- | --- | --- | --- |")
    medians = {}
    for threads, values in rates.items():
        medians[threads] = statistics.median(values)
        print(f"| {threads} | {medians[threads]:.1f} | {', '.join(f'{v:.1f}' for v in values)} | "
              f"{medians[threads] * step_bytes / 1e6:.0f} |")
    report = {"recording": str(args.recording), "first_step": first, "step_bytes": step_bytes,
              "rates": rates, "medians": medians}
    if args.device_steps_per_second:
        per_thread = max(medians[t] / t for t in medians)
        needed = math.ceil(args.device_steps_per_second / per_thread)
        report["threads_for_device"] = needed
        print(f"at {per_thread:.1f} steps/s per compression thread, {args.device_steps_per_second:g} steps/s "
              f"need {needed} compression threads (+1 for the training loop)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
