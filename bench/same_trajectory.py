"""Two runs of one experiment compared bit for bit over the steps both recorded: W, grad_W, both moments, the loss.

For a change to the training step that must keep every bit: train a few hundred steps with the new code (a
copy of the experiment with fewer ``training.steps``; the learning rate is constant, so its steps are the
longer run's first steps) and compare them with the run already on disk, e.g.

    python bench/same_trajectory.py /tmp/t7_400 results/thimble_7

Each side is an experiment's results directory (its recording.h5, or its stream/ where it has no recording
yet), read through ``thimble.open_run``, so every chunk's checksum is verified on the way. Exit status 1 when
anything differs.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import thimble
from thimble.training.checkpoint import key_differences
from thimble.training.determinism import differences

BLOCK_STEPS = 50
#: besides the resume key (the inputs' digests, the settings that decide the bits) with its step count left
#: out, what must agree for two runs to be one trajectory
SAME_DEVICE_ATTRS = ("device", "math_threads", "cpu_capability")


def same_experiment(first: dict, second: dict) -> list[str]:
    """What differs between two runs' attributes that would make their steps different trajectories."""
    def key(attrs):
        resume = json.loads(attrs["resume_key"])
        resume["settings"]["training"].pop("steps", None)
        return resume

    return ([f"{name}: {first.get(name)} -> {second.get(name)}" for name in SAME_DEVICE_ATTRS
             if first.get(name) != second.get(name)] + key_differences(key(first), key(second)))


def differing(a, b, steps: int) -> int:
    """Elements whose stored bits differ in steps 0..steps-1 of two step series (``determinism.differences``)."""
    count = 0
    for low in range(0, steps, BLOCK_STEPS):
        high = min(steps, low + BLOCK_STEPS)
        differ, _ = differences({"rows": a[low:high]}, {"rows": b[low:high]})
        count += differ.get("rows", (0, 0))[0]
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", help="a results directory")
    parser.add_argument("second", help="a results directory of the same experiment")
    args = parser.parse_args()
    first, second = thimble.open_run(args.first), thimble.open_run(args.second)
    problems = same_experiment(first.attrs, second.attrs)
    if problems:
        print("not one trajectory: " + "; ".join(problems), file=sys.stderr)
        return 1
    steps = min(first.W.shape[0], second.W.shape[0])
    if steps < 2:
        print(f"only {steps} step(s) in common: nothing trained to compare", file=sys.stderr)
        return 1
    total = 0
    for name in first.recorded_tensors:
        count = differing(first.tensor(name), second.tensor(name), steps)
        total += count
        print(f"{name}, steps 0..{steps - 1}: {count} of {steps * first.tensor(name)[0].numel()} elements differ")
    losses = int((first.losses[:steps].view(torch.int32) != second.losses[:steps].view(torch.int32)).sum())
    total += losses
    print(f"loss, steps 0..{steps - 1}: {losses} steps differ (as float32 bits)")
    for name, run in (("first", first), ("second", second)):
        attrs = run.attrs
        print(f"{name}: {run.source}; loss_path {attrs.get('loss_path')}, host_allocator {attrs.get('host_allocator')}, "
              f"{attrs.get('session_trained_steps')} steps in {attrs.get('session_training_seconds', float('nan')):.1f} s, "
              f"{attrs.get('cpu_capability', '')}")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
