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

``--recorder`` measures instead what recording costs a step: thimble's step bare against the same step
handing its tensors to thimble's StreamRecorder as ``thimble train`` does (the experiment's record settings,
compression on the math threads' count, segments fsynced into a scratch directory), the two sides
alternating over ``--rounds``. A recorded side's time per step is its steps after the first plus the
recorder's closing flush, over those steps: compression that overlaps the next step's math is charged to it.

    python bench/step_bench.py --recorder --experiment thimble_7 --steps 8 --rounds 2 --threads 2
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
#: the sides of ``--recorder``
RECORDER_SIDES = ("thimble", "thimble_recorded")


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
    recorder = scratch = None
    if side == "thimble_recorded":
        import tempfile

        from thimble.record.writer import StreamRecorder
        from thimble.update_rules import recorded_tensors

        record = settings["record"]
        tensors = recorded_tensors(training["update_rule"], record["dtype"])
        scratch = Path(tempfile.mkdtemp(prefix="step-bench-"))
        recorder = StreamRecorder(scratch / "stream", tuple(wte.shape), steps, storage=record["dtype"], tensors=tensors,
                                  segment_steps=record["segment_steps"], queue_steps=record["queue_steps"],
                                  level=record["compression_level"], threads=threads)
        recorder.record(0, {"W": wte.detach().clone(), "grad_W": torch.zeros_like(wte),
                            "momentum_W": torch.zeros_like(wte), "variance_W": torch.zeros_like(wte)}, float("nan"))
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
        if recorder is not None and step <= steps:
            # what train hands over on the CPU: clones (thimble.training.host_copy), the loss as a float
            recorder.record(step, {"W": wte.detach().clone(), "grad_W": grad, "momentum_W": moments["exp_avg"].clone(),
                                   "variance_W": moments["exp_avg_sq"].clone()}, loss.item())
        seconds.append(time.perf_counter() - started)
        digests.append({"loss_bits": loss_bits, "W": digest(wte), "grad_W": digest(grad),
                        "exp_avg": digest(moments["exp_avg"]), "exp_avg_sq": digest(moments["exp_avg_sq"])})

    model.train()
    cpu_started = None
    for step in range(1, steps + 1):
        if step == 2:  # after the warm-up step, as the timings
            cpu_started = os.times()
        one_step(step)
    close_seconds = None
    if recorder is not None:
        import shutil

        started = time.perf_counter()
        recorder.close()
        close_seconds = time.perf_counter() - started
        shutil.rmtree(scratch)
    cpu_ended = os.times()
    # CPU seconds of every thread of the process (math, the recorder's writer and compression) over steps 2..
    cpu_seconds = (cpu_ended.user + cpu_ended.system - cpu_started.user - cpu_started.system) if cpu_started else None
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
    return {"side": side, "anon_huge_pages_mb": anon_huge_pages_mb(), "loss_path": "transformers" if side == "seed" else loss_path(device),
            "host_allocator": host_allocator(), "threads": threads,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "digests": digests[:steps],
            "step_seconds": seconds[:steps], "recorder_close_seconds": close_seconds, "cpu_seconds_after_first_step": cpu_seconds,
            "profiled_step_seconds": seconds[steps] if profile_ops else None,
            "profile": profile}


def anon_huge_pages_mb() -> float | None:
    """How much of this process's memory the kernel backs with huge pages (a step is up to ~1.4x slower with
    less); None without /proc."""
    try:
        with open("/proc/self/smaps") as smaps:
            return sum(int(line.split()[1]) for line in smaps if line.startswith("AnonHugePages")) / 1024
    except OSError:
        return None


def side_in_subprocess(side: str, args, threads: int) -> dict:
    env = dict(os.environ)
    env.pop("THP_MEM_ALLOC_ENABLE", None)  # thimble's side sets its allocator as `thimble train` does
    command = [sys.executable, __file__, "--side", side, "--experiment", args.experiment, "--steps", str(args.steps),
               "--threads", str(threads), "--profile-ops", str(args.profile_ops)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def recorder_share(args) -> int:
    """``--recorder``: the recorded step against the bare one, rounds alternating; the bits must agree."""
    rows, ok = [], True
    for threads in args.threads:
        runs = {side: [] for side in RECORDER_SIDES}
        for round_index in range(args.rounds):
            order = RECORDER_SIDES if round_index % 2 == 0 else RECORDER_SIDES[::-1]
            for side in order:
                runs[side].append(side_in_subprocess(side, argparse.Namespace(**{**vars(args), "profile_ops": 0}),
                                                     threads))
        agree = all(run["digests"] == runs["thimble"][0]["digests"] for side in RECORDER_SIDES for run in runs[side])
        ok &= agree

        def per_step(run: dict) -> float:
            timed = run["step_seconds"][1:]
            return (sum(timed) + (run["recorder_close_seconds"] or 0)) / len(timed)

        bare = [per_step(run) for run in runs["thimble"]]
        recorded = [per_step(run) for run in runs["thimble_recorded"]]
        share = 1 - statistics.median(bare) / statistics.median(recorded)
        # CPU time is far less disturbed by other load than wall time: the recorder's CPU per step
        cpu = {side: [run["cpu_seconds_after_first_step"] / (args.steps - 1) for run in runs[side]] for side in runs}
        cpu_share = 1 - statistics.median(cpu["thimble"]) / statistics.median(cpu["thimble_recorded"])
        rows.append({"experiment": args.experiment, "threads": threads, "steps": args.steps, "cpu": this_cpu(),
                     "bits_agree": agree, "bare_seconds_per_step": bare, "recorded_seconds_per_step": recorded,
                     "recorder_share": share, "bare_cpu_seconds_per_step": cpu["thimble"],
                     "recorded_cpu_seconds_per_step": cpu["thimble_recorded"], "recorder_cpu_share": cpu_share,
                     "runs": runs})
        print(f"{args.experiment} on {this_cpu()['device_name']} ({this_cpu()['cpu_capability']}), {threads} math "
              f"thread(s), {args.rounds} rounds: bare {', '.join(f'{v:.3f}' for v in bare)} s/step, recorded "
              f"{', '.join(f'{v:.3f}' for v in recorded)} s/step; the recorder's share of a recorded step "
              f"{100 * share:.1f}% (medians); CPU seconds per step bare {statistics.median(cpu['thimble']):.3f}, recorded "
              f"{statistics.median(cpu['thimble_recorded']):.3f}: the recorder's share of the CPU {100 * cpu_share:.1f}%; "
              f"bits {'equal' if agree else 'DIFFER'} with and without it")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="thimble_7")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--profile-ops", type=int, default=8)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--recorder", action="store_true", help="thimble's step bare against recorded (see above)")
    parser.add_argument("--rounds", type=int, default=2, help="with --recorder: alternating rounds of both sides")
    parser.add_argument("--side", choices=SIDES + RECORDER_SIDES[1:], help=argparse.SUPPRESS)  # one side, in the child process
    args = parser.parse_args()
    if args.side:
        threads = args.threads[0]
        if args.side != "seed":  # what `thimble train` sets before torch is imported (thimble.cli)
            from thimble.training.host_memory import keep_freed_memory

            keep_freed_memory()
        print(json.dumps(run_side(args.side, args.experiment, args.steps, threads, args.profile_ops)))
        return 0
    if args.recorder:
        return recorder_share(args)
    rows, ok = [], True
    for threads in args.threads:
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
