"""The probe runner: the workflow itself, run on a short copy of an experiment in a scratch directory.

The probe writes a config holding only the experiment, cut to a few steps (``probe_settings``), into a
scratch working directory under ``results/calibration/``, puts the dataset's tokens and masks there (or
random ones when the data stages have not run), and runs the repository's Snakefile on it with
Snakemake, restricted to the experiment's stages (``costs.STAGES``): the rules' own command lines run,
none is rebuilt here. Every stage writes its peak RSS and wall time (``thimble.util.usage``); the probe then
measures the files they wrote (``thimble.plan.measure``). It runs twice, ``SHORT_PROBE_STEPS`` steps and
the asked steps, so that each stage's fixed start-up is told from its time per step.
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import queue
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from thimble.errors import PlanError
from thimble.outputs import (
    FIGURES,
    MASKS_FILE,
    REPLAY_OUTPUTS,
    RESULTS_DIR,
    STREAM_DIR,
    STREAM_FILE,
    TOKENIZER_FILE,
    TOKENS_FILE,
    dataset_dir,
    figure_file,
)
from thimble.plan import costs
from thimble.plan.calibration import (
    CALIBRATION_DIR,
    CALIBRATION_FORMAT,
    Calibration,
    own_calibration,
    save_calibration,
    step_time_calibration,
    why_not_shipped,
)
from thimble.plan.measure import experiment_outputs, measure_file
from thimble.plan.report import human_seconds
from thimble.sizes import step_flops
from thimble.util.usage import PEAK_RSS_ENV, read_usage
from thimble.util.workflow_dir import find_workflow_dir

log = logging.getLogger("thimble.plan")

#: steps the default probe trains
DEFAULT_PROBE_STEPS = 24
#: the short probe beside it: its stage times against the long probe's separate start-up from per-step work
SHORT_PROBE_STEPS = 4
#: seconds between progress lines while a stage runs
HEARTBEAT_SECONDS = 30


def default_snakefile() -> Path:
    """The workflow's Snakefile (``thimble.util.workflow_dir``: $THIMBLE_WORKFLOW, the source checkout, the
    current directory or a parent); an error naming the fix outside a clone."""
    return find_workflow_dir() / "Snakefile"


def probe_settings(settings: dict, steps: int, device: str) -> dict:
    """The experiment cut to ``steps`` steps on ``device``; everything that shapes a step is kept."""
    probe = copy.deepcopy(settings)
    probe["training"]["steps"] = steps
    probe["training"]["device"] = device
    probe["rechunk"]["keep_stream"] = True  # the probe measures the stream
    probe["analysis"]["windows"] = []
    # as many windows as the full run has, so that summary.json (a series per window) has its full shape
    windows = max(1, settings["training"]["steps"] // settings["analysis"]["trend_window_steps"])
    probe["analysis"]["trend_window_steps"] = max(1, steps // windows)
    return probe


def probe_config(config: dict, probe: dict) -> dict:
    """A config file's content holding one experiment with the resolved settings ``probe``, its dataset
    and the cluster settings of ``config``."""
    experiment = {key: copy.deepcopy(value) for key, value in probe.items() if key != "name"}
    del experiment["model"]["vocab_size"]  # the dataset's
    return {"datasets": {probe["dataset"]: copy.deepcopy(config["datasets"][probe["dataset"]])},
            "experiments": {probe["name"]: experiment}, "cluster": copy.deepcopy(config["cluster"])}


def dataset_files(settings: dict, workdir: Path) -> tuple[Path, Path] | None:
    """The dataset's tokens.npy and masks in ``workdir`` when its data stages have run, else None."""
    data = dataset_dir(workdir / RESULTS_DIR, settings["dataset"])
    tokens, masks = data / TOKENS_FILE, data / MASKS_FILE
    return (tokens, masks) if tokens.exists() and masks.exists() else None


def dataset_tokens(settings: dict, workdir: Path) -> int:
    """The tokens of the experiment's dataset in ``workdir`` once encoded, else 0."""
    tokens = dataset_dir(workdir / RESULTS_DIR, settings["dataset"]) / TOKENS_FILE
    return int(np.load(tokens, mmap_mode="r", allow_pickle=False).shape[0]) if tokens.exists() else 0


def token_source(settings: dict, workdir: Path) -> str:
    return "dataset" if dataset_files(settings, workdir) else "random"


def place_tokens(settings: dict, workdir: Path, run_dir: Path) -> None:
    """The probe's tokens and masks where the rules look for them: the dataset's own (linked), or seeded
    uniform random tokens of four batches and their masks."""
    data = dataset_dir(run_dir / RESULTS_DIR, settings["dataset"])
    data.mkdir(parents=True)
    found = dataset_files(settings, workdir)
    tokenizer = dataset_dir(workdir / RESULTS_DIR, settings["dataset"]) / TOKENIZER_FILE
    if found and tokenizer.exists():
        for source in (*found, tokenizer):
            (data / source.name).symlink_to(source.resolve())
    else:
        write_random_tokens(settings, data)


def write_random_tokens(settings: dict, data: Path) -> None:
    """Seeded uniform random tokens of four batches into the dataset folder ``data``, their masks and a
    stand-in tokenizer of the same vocabulary."""
    from tokenizers import Tokenizer, models

    from thimble.data.masks import write_masks

    model, training = settings["model"], settings["training"]
    rng = np.random.default_rng(training["seed"])
    count = training["batch_size"] * (model["max_seq_len"] + 1) * 4
    np.save(data / TOKENS_FILE, rng.integers(0, model["vocab_size"], count, dtype=np.int64))
    write_masks(str(data / TOKENS_FILE), model["vocab_size"], str(data / MASKS_FILE))
    # the freeze stage reads the tokenizer for token_freeze.csv's texts: a stand-in of the same vocabulary
    Tokenizer(models.WordLevel({f"t{token}": token for token in range(model["vocab_size"])}, unk_token="t0")) \
        .save(str(data / TOKENIZER_FILE))


def last_progress(log_path: Path) -> str:
    """The last line (or tqdm update) of a stage's log, for a progress line."""
    try:
        with open(log_path, "rb") as handle:
            handle.seek(max(0, log_path.stat().st_size - 4000))
            tail = handle.read().decode(errors="replace")
    except OSError:
        return ""
    pieces = [piece.strip() for piece in re.split(r"[\r\n]", tail) if piece.strip()]
    return pieces[-1][-160:] if pieces else ""


def run_workflow(run_dir: Path, snakefile: Path, name: str, threads: int, label: str) -> Path:
    """Run the experiment's stages in ``run_dir`` with Snakemake; log its progress; the usage folder."""
    usage = run_dir / "usage"
    usage.mkdir()
    # the figures need every other stage but the replay
    targets = [f"{RESULTS_DIR}/{name}/{figure_file(FIGURES[0])}", f"{RESULTS_DIR}/{name}/{REPLAY_OUTPUTS['summary']}"]
    command = [sys.executable, "-m", "snakemake", *targets, "--snakefile", str(snakefile), "--directory",
               str(run_dir), "--cores", str(threads),
               # one job at a time, each on every core: stage times without contention
               "--set-threads", *(f"{stage}={threads}" for stage in costs.STAGES),
               # the data stages' outputs are in place: only the experiment's stages may run
               "--allowed-rules", *costs.STAGES]
    # the rules call `thimble`: the one of this interpreter
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               **{PEAK_RSS_ENV: str(usage)})
    output_path = run_dir / "snakemake.log"
    lines: queue.Queue = queue.Queue()
    with open(output_path, "w") as output:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        reader = threading.Thread(target=_forward_lines, args=(process.stdout, lines), daemon=True)
        reader.start()
        stage, started, last_beat = None, time.monotonic(), time.monotonic()
        try:
            while process.poll() is None or not lines.empty() or reader.is_alive():
                try:
                    line = lines.get(timeout=1)
                except queue.Empty:
                    if stage and time.monotonic() - last_beat >= HEARTBEAT_SECONDS:
                        last_beat = time.monotonic()
                        progress = last_progress(run_dir / "logs" / name / f"{stage}.log")
                        log.info("%s: %s running for %.0f s%s", label, stage, last_beat - started,
                                 f" ({progress})" if progress else "")
                    continue
                output.write(line)
                match = re.match(r"^(?:local)?rule (\w+):", line)
                if match:
                    stage, started, last_beat = match.group(1), time.monotonic(), time.monotonic()
                    log.info("%s: %s", label, stage)
        finally:
            if process.poll() is None:  # interrupted: stop the workflow before the scratch goes
                process.terminate()
                process.wait()
    if process.returncode != 0:
        text = output_path.read_text()
        failed = re.findall(r"Error in rule (\w+):", text)
        logs = "".join(f"\n--- {stage}.log:\n{(run_dir / 'logs' / name / f'{stage}.log').read_text()[-1500:]}"
                       for stage in failed if (run_dir / "logs" / name / f"{stage}.log").exists())
        raise PlanError(f"the probe's workflow failed (exit status {process.returncode}) in "
                        f"{', '.join(failed) or 'snakemake'}; snakemake's output ended:\n{text[-2500:]}{logs}")
    return usage


def _forward_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


def run_probe(config: dict, settings: dict, steps: int, device: str, workdir: Path, threads: int,
              snakefile: Path) -> dict:
    """Run the experiment's stages for ``steps`` steps (and ``SHORT_PROBE_STEPS``) and measure them."""
    import h5py
    import yaml

    name = settings["name"]
    scratch_root = (workdir / CALIBRATION_DIR).resolve()  # Snakemake runs the stages in the run folder
    scratch_root.mkdir(parents=True, exist_ok=True)
    lengths = [SHORT_PROBE_STEPS, steps] if steps > SHORT_PROBE_STEPS else [steps]
    usage, probe_config_of = {}, {}
    with tempfile.TemporaryDirectory(prefix=f".probe-{name}-", dir=scratch_root) as scratch:
        for index, length in enumerate(lengths, 1):
            run_dir = Path(scratch) / f"steps_{length}"
            run_dir.mkdir()
            probe_config_of[length] = probe_settings(settings, length, device)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(probe_config(config, probe_config_of[length])))
            place_tokens(settings, workdir, run_dir)
            label = f"probe {name} ({index}/{len(lengths)}: {length} steps on {device})"
            usage[length] = run_workflow(run_dir, snakefile, name, threads, label)
        results = run_dir / RESULTS_DIR / name
        measured = {stage: read_usage(usage[steps], stage) for stage in costs.STAGES}
        stage_times = {stage: costs.fit_stage_time((SHORT_PROBE_STEPS, read_usage(usage[SHORT_PROBE_STEPS], stage)
                                                    ["seconds"]), (steps, measured[stage]["seconds"]))
                       for stage in costs.AFTER_TRAINING} if len(lengths) == 2 else {}
        with h5py.File(results / STREAM_DIR / STREAM_FILE, "r") as stream:
            attrs = dict(stream.attrs)
        first = float(attrs["session_first_step_seconds"]) if steps > 1 else 0.0
        files = {relative: measure_file(path, steps) for relative, path in experiment_outputs(results).items()}
        n_tokens = dataset_tokens(settings, run_dir)
    return {
        "format": CALIBRATION_FORMAT,
        "probed_as": name,
        "probe_steps": steps,
        "token_source": token_source(settings, workdir),
        "device_kind": "cuda" if str(attrs["device"]).startswith("cuda") else "cpu",
        "device": str(attrs["device"]),
        "device_name": str(attrs["device_name"]),
        "cpu_capability": str(attrs["cpu_capability"]),
        "torch_threads": int(attrs["torch_threads"]),
        "torch_version": str(attrs["torch_version"]),
        "host": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # the steady rate after the first step, whose warm-up (allocations, kernel choice) is kept apart
        "first_step_seconds": first,
        "seconds_per_step": (float(attrs["session_training_seconds"]) - first) / max(1, steps - 1),
        "step_flops": step_flops(settings),
        "probe_settings": probe_config_of[steps],
        "n_tokens": n_tokens,
        "stages": measured,
        "short_probe_steps": SHORT_PROBE_STEPS if stage_times else None,
        "stage_times": stage_times,
        "files": files,
    }


def ensure_probe(config: dict, settings: dict, workdir: Path, device: str, steps: int | None, threads: int,
                 reprobe: bool, snakefile: Path) -> tuple[Calibration, str]:
    """This experiment's probe on ``device`` and where it came from ("cached", "shipped", "probed now").

    A cached or shipped probe of the same cost settings is used unless ``reprobe``, or ``steps`` asks for
    more steps than it ran; ``steps`` None: any, or ``DEFAULT_PROBE_STEPS`` when a probe must run.
    """
    source = token_source(settings, workdir)
    device_kind = "cuda" if device.startswith("cuda") else "cpu"
    total = settings["training"]["steps"]
    wanted = min(steps or DEFAULT_PROBE_STEPS, total)
    found = None if reprobe else own_calibration(settings, source, device_kind, workdir)
    if found is not None and (steps is None or found.record["probe_steps"] >= wanted):
        return found, "shipped" if found.shipped else "cached"
    if reprobe:
        why = "--reprobe"
    elif found is not None:
        why = f"{found.path} ran {found.record['probe_steps']} steps, fewer than --probe-steps {wanted}"
    else:
        why = why_not_shipped(settings, source, device_kind) or "no probe of these settings is cached"
    lengths = wanted + (SHORT_PROBE_STEPS if wanted > SHORT_PROBE_STEPS else 0)
    timed = step_time_calibration(settings, device_kind, workdir)
    expect = (f"; its training should take about "
              f"{human_seconds(costs.training_seconds(timed.record, lengths, timed.scale))} by {timed.path.name}"
              if timed else "")
    log.info("probing %s on %s for %d steps (%s%s)", settings["name"], device, wanted, why, expect)
    record = run_probe(config, settings, wanted, device, workdir, threads, snakefile)
    if record["device_kind"] != device_kind:
        raise PlanError(f"asked to probe on {device} but training ran on {record['device']}")
    path = save_calibration(record, workdir)
    log.info("probe of %s cached as %s", settings["name"], path)
    return Calibration(record, path), "probed now"
