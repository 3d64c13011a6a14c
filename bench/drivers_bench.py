"""Benchmark of the freeze_drivers stage against the freeze stage, at thimble_7's width, on one machine.

A synthetic rechunked recording of V x D (thimble_7: 10000 x 64) with all four tensors (W a random walk on
the bf16 lattice that slowly freezes, AdamW-like bf16 moments of random bf16 gradients, a third of the
tokens dead) is written for each of two lengths (``--steps``, default 100 and 300). On each, ``thimble
freeze-drivers`` and ``thimble freeze`` run as their own processes, measured by GNU time (wall time, peak
RSS). A line through the two lengths separates each stage's start-up from its time per step, and both are
extrapolated to the experiment's steps (6000 for thimble_7). The CPU (``thimble.util.cpu``: its model, torch's
CPU capability) prints with the numbers.

    python bench/drivers_bench.py --workdir /tmp/thimble-bench-drivers   # ~2 GB free there
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from thimble.config import load_config, stage_settings
from thimble.numerics.bf16 import BFLOAT16
from thimble.numerics.lattice import from_ordinal, ordinal
from thimble.record.codec import compress_shuffled
from thimble.record.format import create_checked_array, create_tensor_dataset, tensors_attr
from thimble.update_rules import recorded_tensors
from thimble.util.cpu import this_cpu


def run_measured(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one command, as GNU time reports them."""
    process = subprocess.run(["/usr/bin/time", "-f", "thimble-bench %e %M", *command], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{process.stderr[-3000:]}")
    seconds, kilobytes = process.stderr.strip().splitlines()[-1].split()[1:]
    return float(seconds), int(kilobytes) * 1024 / 1e9


def bits(values: np.ndarray) -> np.ndarray:
    return values.astype(BFLOAT16).view(np.uint16)


def synthetic_recording(path: Path, steps: int, shape: tuple[int, int], rows: int, threads: int) -> None:
    """A rechunked-format recording of all four bf16 tensors, written chunk by chunk."""
    rng = np.random.default_rng(0)
    w = ordinal(bits((rng.standard_normal(shape) * 0.02).astype(np.float32)))
    m = np.zeros(shape, np.float32)
    v = np.zeros(shape, np.float32)
    names = ("W", "grad_W", "momentum_W", "variance_W")
    with h5py.File(path, "w") as out:
        datasets = {name: create_tensor_dataset(out, name, (steps + 1, *shape), rows, "bfloat16", 1) for name in names}
        for start in range(0, steps + 1, rows):
            chunk = {name: np.zeros((rows, *shape), np.uint16) for name in names}
            for row in range(min(rows, steps + 1 - start)):
                t = start + row
                if t:
                    share = 0.6 * np.exp(-5 * t / steps) + 0.01  # hot early, nearly frozen late
                    moving = rng.random(shape, dtype=np.float32) < share
                    w[moving] += np.where(rng.random(int(moving.sum())) < 0.5, -1, 1).astype(np.int32)
                    g = bits(rng.standard_normal(shape, dtype=np.float32) * 1e-4).view(BFLOAT16).astype(np.float32)
                    m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
                    chunk["grad_W"][row], chunk["momentum_W"][row], chunk["variance_W"][row] = bits(g), bits(m), bits(v)
                chunk["W"][row] = from_ordinal(w).view(np.uint16)
            for name in names:
                frame = b"".join(compress_shuffled(chunk[name], 1, threads))
                datasets[name].id.write_direct_chunk((start, 0, 0), frame, 0)
            print(f"  steps {start}..{min(start + rows, steps + 1) - 1} written", flush=True)
        create_checked_array(out, "losses", np.linspace(9, 3, steps + 1, dtype=np.float32))
        create_checked_array(out, "dead_mask", np.arange(shape[0]) % 3 == 0)
        out.attrs.update({"storage_dtype": "bfloat16", "update_rule": "bf16", "learning_rate": 1e-3,
                          "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "weight_decay": 0.0,
                          "recorded_tensors": tensors_attr(recorded_tensors("bf16"))})


def cpu() -> dict:
    """Which machine produced the numbers (``thimble.util.cpu``: what recordings and probes name), and how busy."""
    this = this_cpu()
    return {"model": this["device_name"], "cores": os.cpu_count(), "torch_cpu_capability": this["cpu_capability"],
            "load_average": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--experiment", default="thimble_7")
    parser.add_argument("--workdir", default="/tmp/thimble-bench-drivers")
    parser.add_argument("--steps", type=int, nargs=2, default=[100, 300], help="the two lengths timed")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json")
    args = parser.parse_args()

    settings = load_config(args.config)["experiments"][args.experiment]
    shape = (settings["model"]["vocab_size"], settings["model"]["hidden_dim"])
    full_steps = settings["training"]["steps"]
    freeze_settings = json.dumps({**stage_settings(settings, "freeze"), "name": args.experiment})
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    results = {"cpu": cpu(), "shape": shape, "threads": args.threads, "runs": {}}
    print(f"{results['cpu']}; {args.experiment}: V x D = {shape[0]} x {shape[1]}, {full_steps} steps")
    for steps in args.steps:
        recording = workdir / f"recording_{steps}.h5"
        synthetic_recording(recording, steps, shape, steps + 1, args.threads)
        out = workdir / str(steps)
        out.mkdir()
        thimble = [sys.executable, "-m", "thimble"]
        drivers = run_measured([*thimble, "freeze-drivers", "--threads", str(args.threads), "--recording",
                                str(recording), "--table", str(out / "freeze_drivers.csv"), "--summary",
                                str(out / "freeze_drivers.json")])
        freeze = run_measured([*thimble, "freeze", "--threads", str(args.threads), "--settings", freeze_settings,
                               "--recording", str(recording),
                               *(item for name in ("freeze", "cycles", "tokens", "classes", "lattice-positions",
                                                   "variance", "token-steps", "summary")
                                 for item in (f"--{name}", str(out / f"{name}.out")))])
        results["runs"][steps] = {"freeze_drivers": drivers, "freeze": freeze}
        print(f"{steps} steps: freeze_drivers {drivers[0]:.1f} s, {drivers[1]:.2f} GB; freeze {freeze[0]:.1f} s, "
              f"{freeze[1]:.2f} GB", flush=True)
        recording.unlink()
    short, long = args.steps
    results["extrapolated"] = {}
    for stage in ("freeze_drivers", "freeze"):
        a, b = results["runs"][short][stage][0], results["runs"][long][stage][0]
        per_step = (b - a) / (long - short)
        fixed = b - per_step * long
        results["extrapolated"][stage] = {"fixed_seconds": fixed, "ms_per_step": per_step * 1e3,
                                          "seconds_at_full_steps": fixed + per_step * full_steps}
        print(f"{stage}: {fixed:.1f} s start-up + {per_step * 1e3:.2f} ms/step -> "
              f"{fixed + per_step * full_steps:.0f} s at {full_steps} steps")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
