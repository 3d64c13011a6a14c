"""Is a probe this machine's? And if not, what a step of the model costs here.

A CPU probe's step rate belongs to the CPU that measured it: bf16 kernels differ by an order of magnitude
between an AVX2 and an AVX-512 machine of the same size (a thimble_7 step: ~28 s against ~3 s). A probe
measured on another CPU model or kernel capability is therefore rescaled by a *local step timing*: a few
steps of the experiment's own model and optimizer on random tokens, timed here by ``thimble plan`` and
cached in ``results/calibration/`` beside the probes, keyed by the probe and this CPU.

``thimble.cpu.this_cpu`` reads /proc/cpuinfo, not torch, so that the rules' resources (computed while Snakemake
builds the DAG) can tell a foreign probe without importing torch; ``time_model_steps`` imports torch and
runs only in ``thimble plan``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from thimble.cpu import this_cpu
from thimble.files import atomic_output

#: steps timed after one warm-up step (allocations, kernel choice); their median is the step time
TIMED_STEPS = 2
STEP_TIME_FORMAT = 1


def probe_cpu(record: dict) -> dict[str, str]:
    return {"device_name": str(record.get("device_name", "")), "cpu_capability": str(record.get("cpu_capability", ""))}


def foreign_cpu(record: dict) -> str | None:
    """Why a CPU probe was not measured on this machine's CPU (what differs), or None when it was."""
    if record.get("device_kind") != "cpu":
        return None
    theirs, ours = probe_cpu(record), this_cpu()
    differ = [f"{key} {theirs[key]!r} there, {ours[key]!r} here" for key in ("device_name", "cpu_capability")
              if theirs[key] != ours[key]]
    return "; ".join(differ) or None


def step_time_path(workdir: Path, record: dict, math_threads: int) -> Path:
    """Where the local timing of a probe's model on this CPU, on ``math_threads`` threads, is cached."""
    from thimble.plan.calibration import CALIBRATION_DIR, record_key

    cpu = hashlib.sha256(json.dumps(this_cpu(), sort_keys=True).encode()).hexdigest()[:8]
    return workdir / CALIBRATION_DIR / "step_times" / f"{record_key(record)}-cpu-{cpu}-threads{math_threads}.json"


def load_step_time(workdir: Path, record: dict, math_threads: int) -> dict | None:
    path = step_time_path(workdir, record, math_threads)
    try:
        timing = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    fits = (timing.get("format") == STEP_TIME_FORMAT and timing.get("cpu") == this_cpu()
            and timing.get("math_threads") == math_threads)
    return timing if fits else None


def time_model_steps(settings: dict, steps: int = TIMED_STEPS) -> dict:
    """Seconds per training step of the experiment's model and optimizer on this CPU, on random tokens,
    with its ``training.math_threads``: one warm-up step, then the median of ``steps`` timed ones."""
    import statistics

    import torch

    from thimble.model import build_model, build_optimizer

    model_settings, training = settings["model"], settings["training"]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(training["math_threads"])
    try:
        generator = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        device = torch.device("cpu")
        model = build_model(model_settings, device)
        optimizer = build_optimizer(model, training, device)
        shape = (training["batch_size"], model_settings["max_seq_len"])
        seconds = []
        for step in range(1, steps + 2):
            ids = torch.randint(model_settings["vocab_size"], shape, generator=generator)
            started = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step(step)
            optimizer.zero_grad()
            loss.item()
            seconds.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous_threads)
    return {"format": STEP_TIME_FORMAT, "cpu": this_cpu(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "math_threads": training["math_threads"], "first_step_seconds": seconds[0],
            "seconds_per_step": statistics.median(seconds[1:]), "steps_timed": steps,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def ensure_step_time(workdir: Path, record: dict, settings: dict, log) -> dict:
    """The local timing of a foreign probe's model (cached, else timed now and cached)."""
    threads = settings["training"]["math_threads"]
    cached = load_step_time(workdir, record, threads)
    if cached is not None:
        return cached
    from thimble.plan.calibration import probed_settings

    log.info("the probe of %s was measured on another CPU (%s): timing %d steps of its model here",
             record["probed_as"], foreign_cpu(record), TIMED_STEPS + 1)
    # the probe's own model and optimizer, on the experiment's math threads
    probed = probed_settings(record)
    timing = time_model_steps({**probed, "training": {**probed["training"], "math_threads": threads}})
    path = step_time_path(workdir, record, threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(timing, indent=1, sort_keys=True) + "\n")
    return timing
