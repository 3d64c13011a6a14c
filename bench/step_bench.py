"""A training step of an experiment's shape, the seed notebook's loop against thimble's, side by side.

Each side runs in a fresh process (so that its allocator settings are its own) on the same random tokens
from the same seed, for ``--steps`` steps on ``--threads`` math threads:

- ``seed``: the Thimble 6 notebook's loop as written there: transformers' ``ForCausalLMLoss`` over the
  float32 logits, ``torch.optim.AdamW``, torch's default allocator;
- ``thimble``: what ``thimble train`` runs on this device (``thimble.training.model``: the row-block loss on the
  CPU, the configured update rule; ``thimble.training.host_memory``'s allocator, as the CLI sets it).

Both record, at every step, the sha256 of W, grad_W, exp_avg, exp_avg_sq and the loss's bits; the bench
fails unless every one agrees. It prints per-side seconds per step (median of the steps after the first,
the warm-up) and their ratio, and the top operators of one step's profile.

    python bench/step_bench.py --experiment thimble_7 --steps 5 --threads 1 2 --json step_bench.json

``--recorder`` measures instead what recording costs a step, through the training code itself
(``thimble.training.train``: ``set_up``, ``open_recorder``, ``train_step``; the experiment's model, update
rule, math threads and record settings; random tokens), three sides in fresh processes, their order rotating
over ``--rounds``:

- ``bare``: the step recording nothing (``train_step`` with no recorded parameter: no host copies);
- ``embedding``: the step recording the embedding alone (``record.tensors`` its default, the seed's W);
- ``every_tensor``: the step recording every parameter (``record.tensors: ["*"]``).

The recorded sides hand every step to the StreamRecorder as ``thimble train`` does (segments fsynced into a
scratch directory, a checkpoint at each segment's end) with ``--job-threads`` compression threads (2: what a
CPU training job gets). Steps 0 and 1 (the warm-up) are recorded and written before the clock starts; a side's
time per step is then its steps 2.. plus the recorder's closing flush, over those steps, so that compression
that overlaps the next step's math is charged to it. The recorder's whole cost is its share of a recorded
step, 1 - bare / recorded (medians); every step's parameters and loss must be equal on all three sides.

    python bench/step_bench.py --recorder --experiment thimble_7 --steps 8 --rounds 3 --json recorder.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from thimble.util.cpu import this_cpu  # noqa: E402  (torch-free)

SIDES = ("seed", "thimble")
#: the sides of ``--recorder`` and what each records (``record.tensors``; None: nothing)
RECORDER_SIDES = {"bare": None, "embedding": ["transformer.wte.weight"], "every_tensor": ["*"]}
#: the recorder's share of a step that ``--recorder`` holds every tensor's recording to
RECORDER_GOAL = 0.05


def run_side(side: str, experiment: str, steps: int, threads: int, profile_ops: int) -> dict:
    """Train ``steps`` steps in this process; the per-step digests, step seconds and a profile."""
    import time

    import torch

    from thimble.config import load_config
    from thimble.training.host_memory import host_allocator
    from thimble.training.model import build_model, build_optimizer, loss_path, use_loss_path

    torch.set_num_threads(threads)
    settings = load_config(str(REPO / "config.yaml"))["experiments"][experiment]
    model_settings, training = settings["model"], settings["training"]
    device = torch.device("cpu")
    torch.manual_seed(training["seed"])
    model = build_model(model_settings, device)
    if side == "seed":
        use_loss_path(model, "transformers")
        optimizer = torch.optim.AdamW(model.parameters(), lr=training["learning_rate"],
                                      betas=(training["adam_beta1"], training["adam_beta2"]),
                                      eps=training["adam_epsilon"], weight_decay=training["weight_decay"])
        state = lambda wte: optimizer.state[wte]  # noqa: E731
        step_optimizer = lambda step: optimizer.step()  # noqa: E731
    else:
        optimizer = build_optimizer(model, training, device)
        state = lambda wte: {"exp_avg": optimizer.device_state(wte)["momentum_W"],  # noqa: E731
                             "exp_avg_sq": optimizer.device_state(wte)["variance_W"]}
        step_optimizer = optimizer.step
    wte = model.transformer.wte.weight
    generator = torch.Generator().manual_seed(training["seed"])
    shape = (training["batch_size"], model_settings["max_seq_len"] + 1)
    digests, seconds = [], []

    def digest(tensor: torch.Tensor) -> str:
        return hashlib.sha256(tensor.detach().contiguous().view(torch.int16).numpy().tobytes()).hexdigest()

    def one_step(step: int) -> None:
        window = torch.randint(model_settings["vocab_size"], shape, generator=generator)
        started = time.perf_counter()
        loss = model(input_ids=window[:, :-1], labels=window[:, 1:]).loss
        loss.backward()
        grad = wte.grad.detach().clone()
        step_optimizer(step)
        optimizer.zero_grad()
        loss_bits = loss.detach().view(torch.int32).item()
        moments = state(wte)
        seconds.append(time.perf_counter() - started)
        digests.append({"loss_bits": loss_bits, "W": digest(wte), "grad_W": digest(grad),
                        "exp_avg": digest(moments["exp_avg"]), "exp_avg_sq": digest(moments["exp_avg_sq"])})

    model.train()
    for step in range(1, steps + 1):
        one_step(step)
    profile = []
    if profile_ops:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            one_step(steps + 1)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        profile = [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
                    "share": e.self_cpu_time_total / total} for e in events[:profile_ops]]
    return {"side": side, "anon_huge_pages_mb": anon_huge_pages_mb(),
            "loss_path": "transformers" if side == "seed" else loss_path(device),
            "host_allocator": host_allocator(), "threads": threads,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "digests": digests[:steps],
            "step_seconds": seconds[:steps], "profiled_step_seconds": seconds[steps] if profile_ops else None,
            "profile": profile}


def anon_huge_pages_mb() -> float | None:
    """How much of this process's memory the kernel backs with huge pages (a step is up to ~1.4x slower with
    less); None without /proc."""
    try:
        with open("/proc/self/smaps") as smaps:
            return sum(int(line.split()[1]) for line in smaps if line.startswith("AnonHugePages")) / 1024
    except OSError:
        return None


def run_recorder_side(side: str, experiment: str, steps: int, math_threads: int, job_threads: int) -> dict:
    """``steps`` training steps of ``experiment`` in this process through thimble.training.train, recording what
    ``RECORDER_SIDES[side]`` names into a scratch directory; per-step digests and the timings."""
    import copy
    import shutil
    import tempfile
    import threading
    import time

    import numpy as np
    import torch

    from thimble.config import load_config
    from thimble.data.masks import write_masks
    from thimble.training.checkpoint import save_checkpoint
    from thimble.training.host_copy import HostCopies
    from thimble.training.train import initial_tensors, open_recorder, segment_end_state, set_up, train_step

    settings = copy.deepcopy(load_config(str(REPO / "config.yaml"))["experiments"][experiment])
    settings["training"].update(steps=steps, device="cpu", math_threads=math_threads)
    # the bare side sets up the embedding's layout and hands nothing over
    settings["record"]["tensors"] = RECORDER_SIDES[side] or RECORDER_SIDES["embedding"]
    model_settings, training = settings["model"], settings["training"]
    scratch = Path(tempfile.mkdtemp(prefix="step-bench-"))
    try:
        tokens, masks, partial = scratch / "tokens.npy", scratch / "masks.safetensors", scratch / "partial"
        rng = np.random.default_rng(training["seed"])
        count = training["batch_size"] * (model_settings["max_seq_len"] + 1) * 4
        np.save(tokens, rng.integers(0, model_settings["vocab_size"], count, dtype=np.int64))
        write_masks(str(tokens), model_settings["vocab_size"], str(masks))
        session = set_up(settings, str(tokens), str(masks), partial)
        recorded = session.recorded if RECORDER_SIDES[side] else {}
        recorder = None
        if recorded:
            recorder, _ = open_recorder(session, partial, job_threads)
            recorder.record(0, initial_tensors(session.layout, recorded), float("nan"))
        copies = HostCopies(session.device)
        session.model.train()
        digests, seconds, cpu_started = [], [], None

        def digest(loss: float) -> str:
            bits = hashlib.sha256(np.float64(loss).tobytes())
            for param in session.model.parameters():
                bits.update(param.detach().contiguous().view(torch.uint8).numpy().tobytes())
            return bits.hexdigest()

        for step in range(1, steps + 1):
            if step == 2:
                if recorder is not None:  # steps 0 and 1 written before the clock starts: the warm-up's own
                    drained = threading.Event()
                    recorder.checkpoint(1, lambda _step: drained.set())
                    drained.wait()
                cpu_started = os.times()
            started = time.perf_counter()
            bits = train_step(step, session.model, session.optimizer, session.batches, session.device, copies,
                              session.layout, recorded)
            if recorder is not None:  # as thimble train hands a step over (HeldSteps.record)
                state = segment_end_state(session, recorder, step)
                recorder.record(step, bits.tensors, bits.loss)
                if state is not None:
                    recorder.checkpoint(step, lambda _step, state=state: save_checkpoint(partial, state))
            seconds.append(time.perf_counter() - started)
            digests.append(digest(float(bits.loss)))
        close_seconds = 0.0
        if recorder is not None:
            started = time.perf_counter()
            recorder.close()
            close_seconds = time.perf_counter() - started
        cpu_ended = os.times()
    finally:
        shutil.rmtree(scratch)
    timed = seconds[1:]
    return {"side": side, "record_tensors": RECORDER_SIDES[side], "recorded_parameters": len(recorded),
            "recorded_values": sum(param.numel() for param in recorded.values()), "math_threads": math_threads,
            "job_threads": job_threads, "digests": digests, "step_seconds": seconds,
            "recorder_close_seconds": close_seconds,
            "seconds_per_step": (sum(timed) + close_seconds) / len(timed),
            # every thread of the process (math, the recorder's writer and compression) over steps 2.. and the close
            "cpu_seconds_per_step": (cpu_ended.user + cpu_ended.system - cpu_started.user - cpu_started.system)
            / len(timed), "anon_huge_pages_mb": anon_huge_pages_mb()}


def side_in_subprocess(side: str, args, threads: int) -> dict:
    env = dict(os.environ)
    env.pop("THP_MEM_ALLOC_ENABLE", None)  # thimble's side sets its allocator as `thimble train` does
    command = [sys.executable, __file__, "--side", side, "--experiment", args.experiment, "--steps", str(args.steps),
               "--threads", str(threads), "--profile-ops", str(args.profile_ops),
               "--job-threads", str(args.job_threads)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the {side} side failed (exit status {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def recorder_cost(args) -> int:
    """``--recorder``: the step bare, recording the embedding and recording every tensor, in rotating order
    over the rounds; medians, the ratio and the recorder's share of a step. Fails unless the bits agree."""
    import math

    from thimble.config import load_config

    if args.steps < 2:
        raise SystemExit("--recorder times steps 2..: give --steps 2 or more")
    settings = load_config(str(REPO / "config.yaml"))["experiments"][args.experiment]
    rows, ok = [], True
    for threads in args.threads or [settings["training"]["math_threads"]]:
        runs = {side: [] for side in RECORDER_SIDES}
        sides = list(RECORDER_SIDES)
        for round_index in range(args.rounds):
            shift = round_index % len(sides)
            for side in sides[shift:] + sides[:shift]:
                runs[side].append(side_in_subprocess(side, args, threads))
        reference = runs["bare"][0]["digests"]
        agree = all(run["digests"] == reference for side_runs in runs.values() for run in side_runs)
        ok &= agree
        per_run = {side: [run["seconds_per_step"] for run in side_runs] for side, side_runs in runs.items()}
        wall = {side: statistics.median(values) for side, values in per_run.items()}
        cpu = {side: statistics.median(run["cpu_seconds_per_step"] for run in side_runs)
               for side, side_runs in runs.items()}
        row = {"experiment": args.experiment, "math_threads": threads, "job_threads": args.job_threads,
               "steps": args.steps, "rounds": args.rounds, "cpu": this_cpu(), "bits_agree": agree,
               "recorded_values": {side: side_runs[0]["recorded_values"] for side, side_runs in runs.items()},
               "seconds_per_step": per_run,
               "median_seconds_per_step": wall, "median_cpu_seconds_per_step": cpu,
               "every_tensor_over_embedding": wall["every_tensor"] / wall["embedding"],
               "recorder_share": {side: 1 - wall["bare"] / wall[side] for side in ("embedding", "every_tensor")},
               "recorder_cpu_share": {side: 1 - cpu["bare"] / cpu[side] for side in ("embedding", "every_tensor")},
               "runs": runs}
        rows.append(row)
        share = row["recorder_share"]["every_tensor"]
        print(f"{args.experiment} on {this_cpu()['device_name']} ({this_cpu()['cpu_capability']}), {threads} math "
              f"thread(s), {args.job_threads} job threads, steps 2..{args.steps} of {args.rounds} rounds "
              f"(medians; bits {'equal' if agree else 'DIFFER'} on all sides):")
        for side in RECORDER_SIDES:
            values = ", ".join(f"{value:.3f}" for value in row["seconds_per_step"][side])
            print(f"  {side:13s} {row['recorded_values'][side]:>10,} values  {wall[side]:.3f} s/step ({values}), "
                  f"CPU {cpu[side]:.3f} s/step")
        print(f"  every tensor / embedding alone: {row['every_tensor_over_embedding']:.3f}x a step; the recorder's "
              f"share of a step: {100 * row['recorder_share']['embedding']:.1f}% recording the embedding, "
              f"{100 * share:.1f}% recording every tensor (of the CPU: "
              f"{100 * row['recorder_cpu_share']['embedding']:.1f}%, "
              f"{100 * row['recorder_cpu_share']['every_tensor']:.1f}%); goal {100 * RECORDER_GOAL:.0f}%: "
              f"{'within' if math.isfinite(share) and share <= RECORDER_GOAL else 'over'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if not ok:
        print("the sides' bits differ: recording changed the trajectory", file=sys.stderr)
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="thimble_7")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+",
                        help="math threads (default 1; with --recorder the experiment's training.math_threads)")
    parser.add_argument("--job-threads", type=int, default=2,
                        help="with --recorder: the training job's threads, the recorder's compression (2 on a CPU)")
    parser.add_argument("--profile-ops", type=int, default=8)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--recorder", action="store_true",
                        help="the step bare, recording the embedding, recording every tensor (see above)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="with --recorder: rounds of the three sides, in rotating order")
    # one side, in the child process
    parser.add_argument("--side", choices=SIDES + tuple(RECORDER_SIDES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        threads = args.threads[0]
        if args.side != "seed":  # what `thimble train` sets before torch is imported (thimble.cli)
            from thimble.training.host_memory import keep_freed_memory

            keep_freed_memory()
        if args.side in RECORDER_SIDES:
            result = run_recorder_side(args.side, args.experiment, args.steps, threads, args.job_threads)
        else:
            result = run_side(args.side, args.experiment, args.steps, threads, args.profile_ops)
        print(json.dumps(result))
        return 0
    if args.recorder:
        return recorder_cost(args)
    rows, ok = [], True
    for threads in args.threads or [1]:
        sides = {side: side_in_subprocess(side, args, threads) for side in SIDES}
        same = [step + 1 for step, (a, b) in enumerate(zip(sides["seed"]["digests"], sides["thimble"]["digests"]))
                if a == b]
        agree = len(same) == args.steps
        ok &= agree
        per_step = {side: statistics.median(result["step_seconds"][1:] or result["step_seconds"])
                    for side, result in sides.items()}
        row = {"experiment": args.experiment, "threads": threads, "steps": args.steps, "cpu": this_cpu(),
               "bits_agree_every_step": agree, "steps_agreeing": len(same),
               "seed_seconds_per_step": per_step["seed"], "thimble_seconds_per_step": per_step["thimble"],
               "ratio": per_step["thimble"] / per_step["seed"], "sides": sides}
        rows.append(row)
        print(f"{args.experiment} on {this_cpu()['device_name']} ({this_cpu()['cpu_capability']}), {threads} math "
              f"thread(s): seed loop {per_step['seed']:.3f} s/step, thimble {per_step['thimble']:.3f} s/step, "
              f"ratio {row['ratio']:.2f}; W, grad_W, both moments and the loss equal at {len(same)} of "
              f"{args.steps} steps")
        for side, result in sides.items():
            ops = ", ".join(f"{op['op']} {op['self_ms']:.0f} ms ({100 * op['share']:.0f}%)" for op in result["profile"])
            steps = ", ".join(f"{seconds:.2f}" for seconds in result["step_seconds"])
            print(f"  {side} ({result['loss_path']}; steps {steps} s; {result['anon_huge_pages_mb']} MB on huge "
                  f"pages): {ops}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if not ok:
        print("the two loops' bits differ", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
