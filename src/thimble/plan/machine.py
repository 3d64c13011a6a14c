"""Is a probe this machine's? And if not, what a step of the model costs here.

A CPU probe's step rate belongs to the CPU that measured it: bf16 kernels differ by an order of magnitude
between an AVX2 and an AVX-512 machine of the same size (a thimble_7 step: ~28 s against ~3 s). A probe
measured on another CPU model or kernel capability is therefore rescaled by a *local step timing*: a few
steps of the experiment's own model and optimizer on random tokens, timed here by ``thimble plan`` and
cached in ``results/calibration/`` beside the probes, keyed by the probe and this CPU. The cache is read
(``load_step_time``, ``foreign_cpu``) in ``thimble.plan.calibration``, which this module builds on.

``thimble.util.cpu.this_cpu`` reads /proc/cpuinfo, not torch, so that the rules' resources (computed while Snakemake
builds the DAG) can tell a foreign probe without importing torch; ``time_model_steps`` imports torch and
runs only in ``thimble plan``.
"""

from __future__ import annotations

import time
from pathlib import Path

from thimble.plan.calibration import (  # noqa: F401
    STEP_TIME_FORMAT,
    foreign_cpu,
    load_step_time,
    probe_cpu,
    probed_settings,
    step_time_path,
)
from thimble.util.cpu import this_cpu
from thimble.util.files import write_json

#: steps timed after one warm-up step (allocations, kernel choice); their median is the step time
TIMED_STEPS = 2


def time_model_steps(settings: dict, steps: int = TIMED_STEPS) -> dict:
    """Seconds per training step of the experiment's model and optimizer on this CPU, on random tokens,
    with its ``training.math_threads``: one warm-up step, then the median of ``steps`` timed ones."""
    import statistics

    import torch

    from thimble.training.model import build_model, build_optimizer

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
    log.info("the probe of %s was measured on another CPU (%s): timing %d steps of its model here",
             record["probed_as"], foreign_cpu(record), TIMED_STEPS + 1)
    # the probe's own model and optimizer, on the experiment's math threads
    probed = probed_settings(record)
    timing = time_model_steps({**probed, "training": {**probed["training"], "math_threads": threads}})
    path = step_time_path(workdir, record, threads)
    write_json(path, timing, indent=1, sort_keys=True)
    return timing
