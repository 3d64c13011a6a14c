"""Plan a target before running it: file sizes, peak RAM per stage, training time, free disk.

Nothing here is a typed-in rate. Each experiment is *probed*: its own stages
(``thimble train``, ``rechunk``, ``lattice``, ``replay``, ``freeze``,
``figures``, the commands the rules run) are run for a few steps in a scratch
directory, and what they wrote and used is measured:

- sizes: every per-step array's stored bytes per step (HDF5 storage sizes),
  every per-step table's bytes per row, and the fixed rest of each file, scaled
  to the experiment's steps; figures are data-dependent PNGs and not predicted;
- peak RAM: each stage's measured peak RSS (interpreter and libraries
  included) plus the growth of its large arrays from the probe's size to the
  full size (``array_bytes``: the same model the rules' ``mem_mb`` uses);
- training time: the probe's measured seconds per step on that device.

A probe is cached in ``results/calibration/<key>-<device>.json``, keyed by the
settings that change a step (not the number of steps), so experiments that
differ only in length share one. GPU times come from a probe run on a GPU
machine (``thimble plan --probe-device cuda``); a calibration from another
shape is scaled by the ratio of step FLOPs and says so.
"""

from __future__ import annotations

import csv
import copy
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from thimble.config import STORED_ELEMENT_BYTES
from thimble.errors import ThimbleError
from thimble.files import atomic_output
from thimble.outputs import FIGURES

log = logging.getLogger(__name__)

SNAKEFILE = Path(__file__).resolve().parents[2] / "Snakefile"
CALIBRATION_DIR = Path("results") / "calibration"
#: calibrations shipped with the workflow (probes measured by the developers; provenance inside)
SHIPPED_CALIBRATION_DIR = Path(__file__).resolve().parents[2] / "workflow" / "calibration"
CALIBRATION_FORMAT = 4
#: an experiment's stages in pipeline order
STAGES = ("train", "rechunk", "lattice", "replay", "freeze", "figures")
#: the stage that writes each file of an experiment, by its path under results/{experiment}/
EXPERIMENT_FILES = {
    "stream": "train", "recording.h5": "rechunk", "delta_w_lattice.h5": "lattice",
    "replay.csv": "replay", "replay.json": "replay", "update_ratio.csv": "replay",
    "freeze.csv": "freeze", "freeze_cycles.csv": "freeze", "token_freeze.csv": "freeze",
    "displacement_classes.csv": "freeze", "lattice_positions.csv": "freeze", "exp_avg_sq.csv": "freeze",
    "token_displacement.h5": "freeze", "summary.json": "freeze", "summary.html": "figures",
    **{f"figures/{name}.png": "figures" for name in FIGURES},
}


class PlanError(ThimbleError):
    """The plan cannot be made; the message says why and what to do."""


# ---------------------------------------------------------------- pure models


def n_parameters(model: dict) -> int:
    """GPT-2 parameters with tied embeddings: wte, wpe, per layer attention + MLP + two layer norms."""
    vocab, hidden, layers = model["vocab_size"], model["hidden_dim"], model["n_layers"]
    return vocab * hidden + model["max_seq_len"] * hidden + layers * (12 * hidden**2 + 13 * hidden) + 2 * hidden


def step_flops(settings: dict) -> float:
    """Training FLOPs of one step: 6 per token and weight (the lm head included), plus attention scores."""
    model, training = settings["model"], settings["training"]
    tokens = training["batch_size"] * model["max_seq_len"]
    attention = 12 * model["n_layers"] * model["max_seq_len"] * model["hidden_dim"]
    return 6.0 * tokens * n_parameters(model) + tokens * attention


def chunk_rows(settings: dict) -> int:
    from thimble.rechunk import steps_per_chunk

    model, rechunk = settings["model"], settings["rechunk"]
    row_bytes = model["vocab_size"] * model["hidden_dim"] * STORED_ELEMENT_BYTES
    return steps_per_chunk(settings["training"]["steps"] + 1, row_bytes, rechunk["steps_per_chunk"],
                           rechunk["max_chunk_bytes"])


def array_bytes(settings: dict, n_tokens: int = 0, stages: tuple[str, ...] = STAGES) -> dict[str, int]:
    """Bytes of the large arrays each of ``stages`` holds at its peak (interpreter and libraries excluded).

    The rules' ``mem_mb`` and the plan both use this; the plan adds each stage's measured baseline.
    Only the settings the asked stages depend on are read (training sees no rechunk settings).
    """
    from thimble.train import run_plan

    model, steps = settings["model"], settings["training"]["steps"]
    row_elements = model["vocab_size"] * model["hidden_dim"]
    per_token_step = (steps + 1) * model["vocab_size"]

    def chunk() -> int:
        return chunk_rows(settings) * row_elements * STORED_ELEMENT_BYTES

    formulas = {
        "train": lambda: sum(value for key, value in run_plan(settings, n_tokens).items() if key.startswith("ram")),
        # the source chunk's bits and the compressed pieces of the chunk being written (measured 1.85-2.0
        # chunks at thimble_7 size, docs/benchmarks.md)
        "rechunk": lambda: 2 * chunk(),
        # the compressed source chunk and ΔW′'s compressed pieces (measured ~1 chunk at thimble_7 size)
        "lattice": chunk,
        # W, grad and both moments in bf16 and float32 working copies, before and after a step, per block
        "replay": lambda: 2 * 4 * row_elements * (2 + 4),
        # nine (T+1) x V per-token summaries of 4 bytes and working copies of them, and half a chunk of W
        # (its low bytes) held while the chunk is decoded
        "freeze": lambda: 2 * 9 * per_token_step * 4 + chunk() // 2,
        # max |ΔW′| and the norm per token and step
        "figures": lambda: 2 * per_token_step * 4,
    }
    return {stage: formulas[stage]() for stage in stages}


def segment_count(steps: int, segment_steps: int) -> int:
    return math.ceil((steps + 1) / segment_steps)


def predict_size(model: dict, steps: int, segment_steps: int) -> int | None:
    """A file's size at ``steps`` from its probe measurement (see ``measure_file``)."""
    kind = model["kind"]
    if kind == "constant":
        return model["bytes"]
    if kind == "per_step":
        return round(model["fixed"] + model["per_row"] * (steps + model["row_offset"]))
    if kind == "decaying":
        return round(model["fixed"] + model["probe_stored"] * power_sum(steps, model["exponent"])
                     / power_sum(model["probe_steps"], model["exponent"]))
    if kind == "stream":
        files = segment_count(steps, segment_steps) + 1  # the segments and stream.h5
        return round(model["per_row"] * (steps + 1) + model["per_file"] * files)
    return None


def power_sum(steps: int, exponent: float) -> float:
    """sum of t**exponent over t = 1..steps (the bytes of steps 1..T under a power-law decay)."""
    return float(np.sum(np.arange(1, steps + 1, dtype=np.float64) ** exponent))


def decay_exponent(steps: np.ndarray, step_bytes: np.ndarray) -> float:
    """Power-law exponent of per-step compressed bytes over the second half of the probe (at most 0).

    ΔW′ is the one array whose content shrinks as training cools (smaller
    moves, more zeros), so the early steps a probe sees overstate it.
    """
    later = steps >= steps.max() / 2
    if later.sum() < 2:
        return 0.0
    slope = np.polyfit(np.log(steps[later]), np.log(step_bytes[later]), 1)[0]
    return float(min(0.0, slope))


# ---------------------------------------------------------- probe measurement


def per_step_storage(path: Path, rows: int | None) -> int:
    """Stored bytes of the datasets with ``rows`` rows (every per-step dataset when None)."""
    import h5py

    stored = 0
    with h5py.File(path, "r") as handle:
        def visit(name, node):
            nonlocal stored
            if isinstance(node, h5py.Dataset) and node.shape and not node.is_virtual:
                if rows is None or node.shape[0] == rows:
                    stored += node.id.get_storage_size()
        handle.visititems(visit)
    return stored


#: steps compressed together when measuring ΔW′'s trend: a chunk holds many steps, and much of what
#: zstd finds is repeated across steps, which one step alone would miss
TREND_BLOCK_STEPS = 4


def delta_w_block_bytes(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """ΔW′ bytes per step, compressed in blocks of steps with the writer's zstd level: (mid steps, bytes)."""
    import h5py
    import hdf5plugin  # noqa: F401  (the zstd filter)

    from thimble.codec import ZSTD_FILTER, zstd_compressor

    with h5py.File(path, "r") as handle:
        dataset = handle["delta_w_lattice"]
        plist = dataset.id.get_create_plist()
        filters = [plist.get_filter(i) for i in range(plist.get_nfilters())]
        level = next(int(values[0]) for code, _, values, _ in filters if code == ZSTD_FILTER)
        values = dataset[()]
    compressor = zstd_compressor(level)
    starts = np.arange(1, len(values) - TREND_BLOCK_STEPS + 1, TREND_BLOCK_STEPS)  # row 0 is all zero
    step_bytes = [len(compressor.compress(values[start:start + TREND_BLOCK_STEPS].tobytes())) / TREND_BLOCK_STEPS
                  for start in starts]
    return starts + (TREND_BLOCK_STEPS - 1) / 2, np.array(step_bytes, dtype=np.float64)


def measure_file(path: Path, probe_steps: int) -> dict:
    """How a probe output grows with steps: per-step arrays and rows, and a fixed rest."""
    if path.is_dir():  # the stream: segment files of per-step arrays, and stream.h5
        files = sorted(p for p in path.iterdir() if p.suffix == ".h5")
        total = sum(p.stat().st_size for p in files)
        stored = sum(per_step_storage(p, None) for p in files if p.name.startswith("segment_"))
        per_row = stored / (probe_steps + 1)
        return {"kind": "stream", "per_row": per_row, "per_file": (total - stored) / len(files),
                "probe_bytes": total}
    size = path.stat().st_size
    if path.name == "delta_w_lattice.h5":
        stored = per_step_storage(path, probe_steps + 1)
        return {"kind": "decaying", "fixed": size - stored, "probe_stored": stored, "probe_steps": probe_steps,
                "exponent": decay_exponent(*delta_w_block_bytes(path)), "probe_bytes": size}
    if path.suffix == ".h5":
        stored = per_step_storage(path, probe_steps + 1)
        return {"kind": "per_step", "fixed": size - stored, "per_row": stored / (probe_steps + 1),
                "row_offset": 1, "probe_bytes": size}
    if path.suffix == ".csv":
        with open(path, newline="") as handle:
            lines = handle.read().splitlines()
        rows = len(lines) - 1
        if rows in (probe_steps, probe_steps + 1):  # one row per step (t = 1..T or 0..T)
            header = len(lines[0].encode()) + 1
            return {"kind": "per_step", "fixed": header, "per_row": (size - header) / rows,
                    "row_offset": rows - probe_steps, "probe_bytes": size}
        return {"kind": "constant", "bytes": size, "probe_bytes": size}
    if path.suffix in (".json", ".html"):  # the probe keeps the run's windows: the same shape
        return {"kind": "constant", "bytes": size, "probe_bytes": size}
    return {"kind": "not_predicted", "probe_bytes": size}


def probe_settings(settings: dict, steps: int, device: str) -> dict:
    """The experiment cut to ``steps`` steps on ``device``; everything that shapes a step is kept."""
    probe = copy.deepcopy(settings)
    probe["training"]["steps"] = steps
    probe["training"]["device"] = device
    probe["analysis"]["windows"] = []
    # as many windows as the full run has, so that summary.json (a series per window) has its full shape
    windows = max(1, settings["training"]["steps"] // settings["analysis"]["trend_window_steps"])
    probe["analysis"]["trend_window_steps"] = max(1, steps // windows)
    return probe


def calibration_key(settings: dict, token_source: str) -> str:
    """Hash of what a step's cost and size depend on: not the run's length or analysis windows."""
    relevant = {key: settings[key] for key in ("dataset", "model", "record", "rechunk")}
    relevant["training"] = {k: v for k, v in settings["training"].items() if k not in ("steps", "device")}
    relevant.update(token_source=token_source, format=CALIBRATION_FORMAT)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


def run_stage(stage: str, args: list[str], log_path: Path) -> dict:
    """Run one ``thimble`` stage as the rule would; its wall time and its own peak RSS."""
    from thimble.cli import PEAK_RSS_ENV

    command = [sys.executable, "-m", "thimble", stage, *args]
    peak_file = log_path.parent / f"{stage}.peak_rss"
    env = dict(os.environ, **{PEAK_RSS_ENV: str(log_path.parent)})
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        result = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        tail = log_path.read_text()[-2000:]
        raise PlanError(f"the probe's {stage} stage failed (exit status {result.returncode}); its log ended:\n{tail}")
    return {"seconds": seconds, "peak_rss_bytes": int(peak_file.read_text())}


def probe_tokens(settings: dict, directory: Path, workdir: Path) -> tuple[Path, Path, str]:
    """The dataset's tokens and masks if its data stages have run, else seeded uniform random tokens."""
    data = workdir / "results" / "data" / settings["dataset"]
    tokens, masks = data / "tokens.npy", data / "live_dead_tokens.safetensors"
    if tokens.exists() and masks.exists():
        return tokens, masks, "dataset"
    from thimble.masks import write_masks

    model, training = settings["model"], settings["training"]
    rng = np.random.default_rng(training["seed"])
    count = training["batch_size"] * (model["max_seq_len"] + 1) * 4
    tokens = directory / "tokens.npy"
    np.save(tokens, rng.integers(0, model["vocab_size"], count, dtype=np.int64))
    masks = directory / "live_dead_tokens.safetensors"
    write_masks(str(tokens), model["vocab_size"], str(masks))
    return tokens, masks, "random"


def probe(settings: dict, steps: int, device: str, workdir: Path, threads: int) -> dict:
    """Run every stage of ``settings`` for ``steps`` steps in a scratch directory and measure it."""
    import h5py

    probe_config = probe_settings(settings, steps, device)
    scratch_root = workdir / CALIBRATION_DIR
    scratch_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".probe-{settings['name']}-", dir=scratch_root) as scratch:
        scratch = Path(scratch)
        tokens, masks, token_source = probe_tokens(settings, scratch, workdir)
        out = {name: scratch / name for name in EXPERIMENT_FILES}
        (scratch / "figures").mkdir()
        text = json.dumps(probe_config, sort_keys=True)
        threads_arg = ["--threads", str(threads)]
        stages = {
            "train": ["--settings", text, "--tokens", str(tokens), "--masks", str(masks), "--output",
                      str(out["stream"]), "--partial", str(scratch / ".partial"), *threads_arg],
            "rechunk": ["--settings", text, "--stream", str(out["stream"]), "--output", str(out["recording.h5"]),
                        *threads_arg],
            "lattice": ["--recording", str(out["recording.h5"]), "--output", str(out["delta_w_lattice.h5"]),
                        *threads_arg],
            "replay": ["--stream", str(out["stream"]), "--table", str(out["replay.csv"]), "--summary",
                       str(out["replay.json"]), "--ratio-table", str(out["update_ratio.csv"]), *threads_arg],
            "freeze": ["--settings", text, "--delta", str(out["delta_w_lattice.h5"]), "--recording",
                       str(out["recording.h5"]), "--freeze", str(out["freeze.csv"]), "--cycles",
                       str(out["freeze_cycles.csv"]), "--tokens", str(out["token_freeze.csv"]), "--classes",
                       str(out["displacement_classes.csv"]), "--lattice-positions", str(out["lattice_positions.csv"]),
                       "--variance", str(out["exp_avg_sq.csv"]),
                       "--token-steps", str(out["token_displacement.h5"]), "--summary", str(out["summary.json"]),
                       *threads_arg],
            "figures": ["--freeze", str(out["freeze.csv"]), "--summary", str(out["summary.json"]), "--token-steps",
                        str(out["token_displacement.h5"]), "--exp-avg-sq", str(out["exp_avg_sq.csv"]), "--ratio",
                        str(out["update_ratio.csv"]), "--lattice-positions", str(out["lattice_positions.csv"]),
                        "--outdir", str(scratch / "figures"), "--summary-html", str(out["summary.html"])],
        }
        measured = {}
        for stage, args in stages.items():
            log.info("probe %s: %s (%d steps on %s)", settings["name"], stage, steps, device)
            measured[stage] = run_stage(stage, args, scratch / f"{stage}.log")
        with h5py.File(out["stream"] / "stream.h5", "r") as stream:
            attrs = dict(stream.attrs)
        first = float(attrs["session_first_step_seconds"]) if steps > 1 else 0.0
        files = {name: measure_file(path, steps) for name, path in out.items() if path.exists()}
        n_tokens = int(np.load(tokens, mmap_mode="r").shape[0])
    return {
        "format": CALIBRATION_FORMAT,
        "probed_as": settings["name"],
        "probe_steps": steps,
        "token_source": token_source,
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
        "probe_settings": probe_config,
        "n_tokens": n_tokens,
        "stages": measured,
        "files": files,
    }


# ------------------------------------------------------------ calibrations


@dataclass
class Calibration:
    record: dict
    path: Path
    #: predicted step time = measured x scale (1 for the same shape)
    scale: float = 1.0
    note: str = ""


def load_calibrations(directories: list[Path]) -> list[tuple[Path, dict]]:
    found = []
    for directory in directories:
        for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise PlanError(f"{path} is not a readable calibration ({error}); delete it to probe again") from None
            if record.get("format") == CALIBRATION_FORMAT:
                found.append((path, record))
    return found


def calibration_path(workdir: Path, key: str, device_kind: str) -> Path:
    return workdir / CALIBRATION_DIR / f"{key}-{device_kind}.json"


def step_time_calibration(settings: dict, device_kind: str, workdir: Path) -> Calibration | None:
    """The calibration that times this experiment's steps on ``device_kind``: its own probe (any token
    source) if there is one, else the one of another shape nearest in FLOPs, scaled by the FLOPs ratio."""
    flops = step_flops(settings)
    candidates = [(path, record) for path, record in
                  load_calibrations([workdir / CALIBRATION_DIR, SHIPPED_CALIBRATION_DIR])
                  if record["device_kind"] == device_kind]
    if not candidates:
        return None
    same = [(path, record) for path, record in candidates if math.isclose(record["step_flops"], flops)]
    if same:
        path, record = same[0]
        return Calibration(record, path)
    path, record = min(candidates, key=lambda item: abs(math.log(item[1]["step_flops"] / flops)))
    scale = flops / record["step_flops"]
    return Calibration(record, path, scale, f"scaled by step FLOPs ({scale:.3g}x) from {record['probed_as']}")


def training_seconds(settings: dict, device_kind: str, workdir: Path,
                     own: Calibration | None = None) -> tuple[float, Calibration] | None:
    """Predicted training time on ``device_kind``: from the experiment's ``own`` probe when given."""
    calibration = own or step_time_calibration(settings, device_kind, workdir)
    if calibration is None:
        return None
    record, steps = calibration.record, settings["training"]["steps"]
    return (record["first_step_seconds"] + record["seconds_per_step"] * (steps - 1)) * calibration.scale, calibration


def any_calibration(settings: dict, workdir: Path) -> Calibration | None:
    """A calibration for settings' stage baselines: its own shape if probed, else the nearest (CPU first)."""
    for device_kind in ("cpu", "cuda"):
        calibration = step_time_calibration(settings, device_kind, workdir)
        if calibration is not None:
            return calibration
    return None


def peak_ram_bytes(settings: dict, calibration: dict, n_tokens: int = 0,
                   stages: tuple[str, ...] = STAGES) -> dict[str, int]:
    """Each probed stage's peak RSS at full size: its measured peak, less the probe's arrays, plus the
    full run's arrays (``array_bytes``)."""
    measured = calibration["stages"]
    stages = tuple(stage for stage in stages if stage in measured)
    full = array_bytes(settings, n_tokens, stages)
    probed = array_bytes(calibration["probe_settings"], calibration["n_tokens"], stages)
    return {stage: max(0, round(measured[stage]["peak_rss_bytes"] - probed[stage] + full[stage])) for stage in stages}


def ensure_probe(settings: dict, workdir: Path, device: str, steps: int, threads: int) -> tuple[dict, Path]:
    """This experiment's probe on ``device``: cached (when it probed at least ``steps`` steps), or run now
    and cached."""
    data = workdir / "results" / "data" / settings["dataset"]
    token_source = "dataset" if (data / "tokens.npy").exists() and \
        (data / "live_dead_tokens.safetensors").exists() else "random"
    steps = min(steps, settings["training"]["steps"])
    key = calibration_key(settings, token_source)
    device_kind = "cuda" if device.startswith("cuda") else "cpu"
    path = calibration_path(workdir, key, device_kind)
    if path.exists():
        cached = json.loads(path.read_text())
        if cached["probe_steps"] >= steps:
            return cached, path
    log.info("probing %s on %s for %d steps (cached as %s)", settings["name"], device, steps, path)
    record = probe(settings, steps, device, workdir, threads)
    if record["device_kind"] != device_kind:
        raise PlanError(f"asked to probe on {device} but training ran on {record['device']}")
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record, path


# ---------------------------------------------------------------- the target


def snakemake_summary(workdir: Path, targets: list[str], snakefile: Path) -> list[dict]:
    """The files the targets need and whether Snakemake would (re)make them (``snakemake --summary``)."""
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(workdir),
               "--summary", *targets]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise PlanError(f"snakemake could not plan {' '.join(targets) or 'the default target'}:\n"
                        f"{(result.stdout + result.stderr)[-3000:]}")
    lines = [line for line in result.stdout.splitlines() if "\t" in line]
    if not lines or not lines[0].startswith("output_file"):
        raise PlanError(f"unexpected output of {' '.join(command)}:\n{result.stdout[-2000:]}")
    rows = list(csv.DictReader(lines, delimiter="\t"))
    for row in rows:
        row["pending"] = row["plan"] != "no update"
    return rows


def experiment_of(path: str, experiments: dict) -> tuple[str, str] | None:
    match = re.match(r"results/([^/]+)/(.+)$", path)
    if match and match.group(1) in experiments:
        return match.group(1), match.group(2)
    return None


def existing_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def make_plan(config: dict, targets: list[str], workdir: Path, snakefile: Path, probe_steps: int,
              probe_devices: list[str], threads: int) -> dict:
    """Everything ``thimble plan`` prints, as data."""
    rows = snakemake_summary(workdir, targets, snakefile)
    experiments: dict[str, dict] = {}
    other_files = []
    for row in rows:
        found = experiment_of(row["output_file"], config["experiments"])
        if found is None:
            other_files.append({"path": row["output_file"], "rule": row["rule"], "pending": row["pending"],
                                "bytes": existing_bytes(workdir / row["output_file"]) or None,
                                "predicted": False})
            continue
        name, relative = found
        # the stage, not the rule: train_temporary_stream is the train stage too
        experiments.setdefault(name, {"files": []})["files"].append(
            {"path": row["output_file"], "relative": relative, "rule": EXPERIMENT_FILES.get(relative, row["rule"]),
             "pending": row["pending"]})

    for name, entry in experiments.items():
        entry["files"].sort(key=lambda file: STAGES.index(file["rule"]) if file["rule"] in STAGES else len(STAGES))
        settings = config["experiments"][name]
        steps, segment_steps = settings["training"]["steps"], settings["record"]["segment_steps"]
        record, path = ensure_probe(settings, workdir, "cpu", probe_steps, threads)
        own = {"cpu": Calibration(record, path)}
        for device in probe_devices:
            device_record, device_path = ensure_probe(settings, workdir, device, probe_steps, threads)
            own[device_record["device_kind"]] = Calibration(device_record, device_path)
        entry.update(settings_summary=f"dataset {settings['dataset']}, {steps} steps, "
                     f"{settings['model']['vocab_size']} x {settings['model']['hidden_dim']}, "
                     f"stored as {settings['record']['dtype']}",
                     probe=str(path), probe_steps=record["probe_steps"], token_source=record["token_source"])
        for file in entry["files"]:
            model = record["files"].get(file["relative"])
            predicted = predict_size(model, steps, segment_steps) if model else None
            file.update(bytes=predicted, predicted=predicted is not None)
            if predicted is None and not file["pending"]:
                file["bytes"] = existing_bytes(workdir / file["path"])
        n_tokens = 0
        tokens_file = workdir / "results" / "data" / settings["dataset"] / "tokens.npy"
        if tokens_file.exists():
            n_tokens = int(np.load(tokens_file, mmap_mode="r").shape[0])
        stages_needed = {file["rule"] for file in entry["files"]}
        entry["peak_ram_bytes"] = {stage: value for stage, value in peak_ram_bytes(settings, record, n_tokens).items()
                                   if stage in stages_needed}
        entry["training_seconds"] = {}
        for device_kind in ("cpu", "cuda"):
            timed = training_seconds(settings, device_kind, workdir, own.get(device_kind))
            if timed is None:
                entry["training_seconds"][device_kind] = None
                continue
            seconds, calibration = timed
            entry["training_seconds"][device_kind] = {
                "seconds": seconds, "seconds_per_step": calibration.record["seconds_per_step"] * calibration.scale,
                "calibration": str(calibration.path),
                "device_name": f"{calibration.record['device_name']}, {calibration.record['torch_threads']} threads"
                if device_kind == "cpu" else calibration.record["device_name"],
                "host": calibration.record["host"],
                "note": calibration.note}

    pending = [file for entry in experiments.values() for file in entry["files"] if file["pending"]]
    pending += [file for file in other_files if file["pending"]]
    need = sum(file["bytes"] or 0 for file in pending if file["predicted"])
    disk_dir = workdir / "results" if (workdir / "results").exists() else workdir
    free = shutil.disk_usage(disk_dir).free
    return {"targets": targets, "experiments": experiments, "other_files": other_files,
            "bytes_to_write": need, "unpredicted_to_write": [f["path"] for f in pending if not f["predicted"]],
            "free_bytes": free, "disk": str(disk_dir), "fits": need <= free}


# ---------------------------------------------------------------- printing


def human_bytes(count: float | None) -> str:
    if count is None:
        return "not predicted"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1000
    raise AssertionError


def human_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(plan: dict) -> str:
    lines = []
    for name, entry in plan["experiments"].items():
        lines.append(f"{name}: {entry['settings_summary']}")
        lines.append(f"  probe: {entry['probe_steps']} steps on {entry['token_source']} tokens ({entry['probe']})")
        for file in entry["files"]:
            state = "to write" if file["pending"] else "exists"
            size = human_bytes(file["bytes"]) if file["predicted"] or not file["pending"] else \
                "not predicted (figure)"
            lines.append(f"  {file['rule']:<8} {file['path']:<52} {size:>22}  {state}")
        ram = ", ".join(f"{stage} {human_bytes(value)}" for stage, value in entry["peak_ram_bytes"].items())
        lines.append(f"  peak RAM: {ram}")
        for device_kind, label in (("cpu", "CPU"), ("cuda", "GPU")):
            timed = entry["training_seconds"][device_kind]
            if timed is None:
                hint = "run `thimble plan --probe-device cuda ...` on a GPU machine" if device_kind == "cuda" \
                    else "no CPU calibration"
                lines.append(f"  training on {label}: not measured ({hint})")
                continue
            how = f"; {timed['note']}" if timed["note"] else ""
            lines.append(f"  training on {label}: {human_seconds(timed['seconds'])} "
                         f"({timed['seconds_per_step']:.3g} s/step on {timed['device_name']}, "
                         f"host {timed['host']}{how})")
    others = [file for file in plan["other_files"] if file["pending"]]
    if others:
        lines.append(f"data stages: {len(others)} files to write (sizes depend on the corpus; not predicted)")
    lines.append(f"to write: {human_bytes(plan['bytes_to_write'])} predicted; free in {plan['disk']}: "
                 f"{human_bytes(plan['free_bytes'])}")
    if not plan["fits"]:
        lines.append(f"WARNING: the plan needs {human_bytes(plan['bytes_to_write'])} but only "
                     f"{human_bytes(plan['free_bytes'])} are free in {plan['disk']}: free space, plan fewer "
                     "experiments at a time, or set rechunk.keep_stream: false (each stream is deleted once "
                     "rechunked and replayed)")
    return "\n".join(lines)
