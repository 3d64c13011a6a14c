"""What ``thimble.Recorder`` costs a user's own loop: the seed notebook's loop at an experiment's shape, bare and
recorded through the public API, side by side.

The loop is a user's, not thimble's: transformers' ``GPT2LMHeadModel`` of the experiment's model settings in
bf16 (``thimble.training.model.build_model``, the seed's init), ``torch.optim.AdamW`` with the experiment's
hyperparameters, random token windows from one seed, ``loss.backward(); optimizer.step(); optimizer.zero_grad()``.
Two sides, each in a fresh process, their order rotating over ``--rounds``:

- ``bare``: the loop alone;
- ``recorder``: the same loop inside ``with thimble.Recorder(scratch, model, optimizer, tensors="*") as rec``,
  with ``rec.log(loss=loss)`` after each step (every parameter's value, gradient and both moments at every step).

Steps 1 and 2 (the warm-up) run before the clock starts; a side's time per step is then its steps 3.. plus, for
the recorder, its closing flush (``close``: the last segments compressed, fsynced and ``stream.h5`` written), over
those steps, so that compression overlapping the next step's math is charged to it. The recorder's share of a
step is 1 - bare / recorded (medians). The final parameters and the losses must be equal on both sides (the
recorder must not change the trajectory) and the recording must hold every step.

    python bench/recorder_api_bench.py --experiment thimble_7 --steps 10 --rounds 3 --json recorder_api.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from thimble.util.cpu import this_cpu  # noqa: E402  (torch-free)

SIDES = ("bare", "recorder")
#: the recorder's share of a step the issue holds it to
GOAL = 0.05


def run_side(side: str, experiment: str, steps: int, threads: int, job_threads: int) -> dict:
    """The loop in this process: seconds per timed step, the losses' bits and the final parameters' digest."""
    import torch

    import thimble
    from thimble.config import load_config
    from thimble.training.model import build_model

    torch.set_num_threads(threads)
    settings = load_config(str(REPO / "config.yaml"))["experiments"][experiment]
    model_settings, training = settings["model"], settings["training"]
    torch.manual_seed(training["seed"])
    model = build_model(model_settings, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=training["learning_rate"],
                                  betas=(training["adam_beta1"], training["adam_beta2"]),
                                  eps=training["adam_epsilon"], weight_decay=training["weight_decay"])
    generator = torch.Generator().manual_seed(training["seed"])
    shape = (training["batch_size"], model_settings["max_seq_len"] + 1)
    losses = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("THIMBLE_BENCH_SCRATCH")) as scratch:
        recorder = (thimble.Recorder(Path(scratch) / "run", model, optimizer, tensors="*", threads=job_threads)
                    if side == "recorder" else None)
        started = None
        for step in range(1, steps + 1):
            if step == 3:
                started = time.perf_counter()
                cpu_started = time.process_time()
            window = torch.randint(model_settings["vocab_size"], shape, generator=generator)
            loss = model(input_ids=window[:, :-1], labels=window[:, 1:]).loss
            loss.backward()
            optimizer.step()
            if recorder is not None:
                recorder.log(loss=loss)
            optimizer.zero_grad()
            losses.append(loss.detach().view(torch.int32).item())
        recorded_steps = None
        if recorder is not None:
            directory = recorder.close()
            import h5py

            with h5py.File(directory / "stream.h5") as handle:
                recorded_steps = int(handle["losses"].shape[0]) - 1
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(param.detach().contiguous().view(torch.int16).numpy().tobytes())
    return {"side": side, "threads": threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "seconds_per_step": seconds / (steps - 2), "cpu_seconds_per_step": cpu_seconds / (steps - 2),
            "losses": losses, "parameters_sha256": digest.hexdigest(), "recorded_steps": recorded_steps,
            "recorded_values": sum(p.numel() for p in model.parameters()) if side == "recorder" else 0}


def side_in_subprocess(side: str, args, threads: int) -> dict:
    command = [sys.executable, __file__, "--side", side, "--experiment", args.experiment, "--steps", str(args.steps),
               "--threads", str(threads), "--job-threads", str(args.job_threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the {side} side failed (exit status {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="thimble_7")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="math threads (default: the experiment's "
                                                                   "training.math_threads)")
    parser.add_argument("--job-threads", type=int, default=2, help="the recorder's compression threads")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.experiment, args.steps, args.threads, args.job_threads)))
        return 0
    if args.steps < 4:
        raise SystemExit("the clock runs from step 3: give --steps 4 or more")
    from thimble.config import load_config

    threads = args.threads or load_config(str(REPO / "config.yaml"))["experiments"][args.experiment]["training"][
        "math_threads"]
    runs = {side: [] for side in SIDES}
    for round_index in range(args.rounds):
        order = SIDES[round_index % 2:] + SIDES[:round_index % 2]
        for side in order:
            runs[side].append(side_in_subprocess(side, args, threads))
    reference = runs["bare"][0]
    agree = all(run["losses"] == reference["losses"] and run["parameters_sha256"] == reference["parameters_sha256"]
                for side_runs in runs.values() for run in side_runs)
    complete = all(run["recorded_steps"] == args.steps for run in runs["recorder"])
    wall = {side: statistics.median(run["seconds_per_step"] for run in side_runs) for side, side_runs in runs.items()}
    cpu = {side: statistics.median(run["cpu_seconds_per_step"] for run in side_runs)
           for side, side_runs in runs.items()}
    share = 1 - wall["bare"] / wall["recorder"]
    row = {"experiment": args.experiment, "math_threads": threads, "job_threads": args.job_threads,
           "steps": args.steps, "rounds": args.rounds, "cpu": this_cpu(), "bits_agree": agree,
           "recording_complete": complete, "median_seconds_per_step": wall, "median_cpu_seconds_per_step": cpu,
           "recorded_over_bare": wall["recorder"] / wall["bare"], "recorder_share": share,
           "recorder_cpu_share": 1 - cpu["bare"] / cpu["recorder"], "runs": runs}
    print(f"{args.experiment}'s shape on {this_cpu()['device_name']} ({this_cpu()['cpu_capability']}), {threads} math "
          f"thread(s), recorder compression on {args.job_threads} threads, steps 3..{args.steps} of {args.rounds} "
          f"rounds (medians; losses and parameters {'equal' if agree else 'DIFFER'} on both sides; recording "
          f"{'holds every step' if complete else 'INCOMPLETE'}):")
    for side in SIDES:
        values = ", ".join(f"{run['seconds_per_step']:.3f}" for run in runs[side])
        print(f"  {side:9s} {wall[side]:.3f} s/step ({values}), CPU {cpu[side]:.3f} s/step")
    print(f"  recorded / bare: {row['recorded_over_bare']:.3f}x a step; the recorder's share of a step: "
          f"{100 * share:.1f}% (of the CPU: {100 * row['recorder_cpu_share']:.1f}%); goal {100 * GOAL:.0f}%: "
          f"{'within' if math.isfinite(share) and share <= GOAL else 'over'}")
    if args.json:
        args.json.write_text(json.dumps(row, indent=1) + "\n")
    return 0 if agree and complete else 1


if __name__ == "__main__":
    sys.exit(main())
