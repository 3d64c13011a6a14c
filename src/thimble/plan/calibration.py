"""The calibration store: probes cached in ``results/calibration/`` and shipped in ``workflow/calibration/``.

A calibration is one probe's measurements as JSON (``thimble.plan.probe.run_probe`` writes them). It is
keyed by the settings that change what a step costs and writes (``cost_settings``), not by the run's
length or its analysis windows, so experiments that differ only in steps share one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from thimble.config import without_untracked
from thimble.errors import PlanError
from thimble.outputs import RESULTS_DIR
from thimble.plan import costs
from thimble.sizes import EMBEDDING, recorded_elements, step_flops
from thimble.util.cpu import this_cpu
from thimble.util.files import write_json
from thimble.util.workflow_dir import WorkflowNotFoundError, find_workflow_dir

CALIBRATION_DIR = Path(RESULTS_DIR) / "calibration"
CALIBRATION_FORMAT = 4


@dataclass
class Calibration:
    record: dict
    path: Path
    #: predicted step time = measured x scale (1 for the same shape)
    scale: float = 1.0
    note: str = ""
    #: a CPU probe of another CPU that no local step timing has rescaled yet
    foreign: bool = False
    #: the local step timing that rescaled it (``thimble.plan.machine``), if one did
    local_step_time: dict | None = None

    @property
    def shipped(self) -> bool:
        shipped = shipped_calibration_dir()
        return shipped is not None and self.path.parent.resolve() == shipped.resolve()


def shipped_calibration_dir() -> Path | None:
    """The calibrations shipped with the workflow (probes measured by the developers; provenance inside):
    ``workflow/calibration/`` of the workflow directory, or None when there is none (an installed package
    used outside a clone: then only the cached probes count, and training's safety check still runs)."""
    try:
        return find_workflow_dir() / "workflow" / "calibration"
    except WorkflowNotFoundError:
        return None


def cost_settings(settings: dict, token_source: str) -> dict:
    """The settings a step's cost and output depend on: everything but the run's length (``training.steps``,
    scaled by the cost model), the device (a calibration per device kind), whether the stream is kept
    (``rechunk.keep_stream`` deletes a file, it does not change one) and the analysis windows. The math
    threads stay: they set the step rate as well as the trajectory."""
    relevant = {key: copy.deepcopy(settings[key]) for key in ("dataset", "model", "record", "rechunk")}
    relevant["rechunk"].pop("keep_stream", None)
    # less UNTRACKED_SETTINGS too: the determinism check adds a few steps per session, not a per-step cost
    relevant["training"] = {k: v for k, v in without_untracked(settings, "train")["training"].items()
                            if k not in ("steps", "device")}
    relevant.update(token_source=token_source, format=CALIBRATION_FORMAT)
    return relevant


def calibration_key(settings: dict, token_source: str) -> str:
    """Hash of ``cost_settings``: the name of a probe's cache file."""
    return hashlib.sha256(json.dumps(cost_settings(settings, token_source), sort_keys=True).encode()).hexdigest()[:12]


def probed_settings(record: dict) -> dict:
    """The settings a calibration was measured with, complete for ``cost_settings``.

    A probe made before ``training.math_threads`` existed lacks it in its settings; its torch ran on the
    threads it recorded as ``torch_threads``, so that is its value. One made before
    ``training.optimizer_impl`` existed built torch's default AdamW, which is what ``auto`` names; one
    made before ``training.update_rule`` existed trained with plain bf16 AdamW, the rule ``bf16``; one made
    before ``record.tensors`` existed recorded the embedding alone, the setting's default.
    """
    settings = copy.deepcopy(record["probe_settings"])
    settings["training"].setdefault("math_threads", int(record["torch_threads"]))
    settings["training"].setdefault("optimizer_impl", "auto")
    settings["training"].setdefault("update_rule", "bf16")
    settings["record"].setdefault("tensors", [EMBEDDING])
    return settings


def record_key(record: dict) -> str:
    return calibration_key(probed_settings(record), record["token_source"])


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


def calibration_directories(workdir: Path) -> list[Path]:
    """Where calibrations are looked for, the experiment's own cache first."""
    shipped = shipped_calibration_dir()
    return [workdir / CALIBRATION_DIR, *([shipped] if shipped else [])]


def calibration_path(workdir: Path, key: str, device_kind: str) -> Path:
    return workdir / CALIBRATION_DIR / f"{key}-{device_kind}.json"


def save_calibration(record: dict, workdir: Path) -> Path:
    path = calibration_path(workdir, record_key(record), record["device_kind"])
    write_json(path, record, indent=1, sort_keys=True)
    return path


def own_calibration(settings: dict, token_source: str, device_kind: str, workdir: Path) -> Calibration | None:
    """A probe of exactly these cost settings on ``device_kind``, cached or shipped (the most steps first)."""
    key = calibration_key(settings, token_source)
    matching = [(path, record) for path, record in load_calibrations(calibration_directories(workdir))
                if record["device_kind"] == device_kind and record_key(record) == key]
    if not matching:
        return None
    path, record = max(matching, key=lambda item: item[1]["probe_steps"])
    return Calibration(record, path)


def flatten(settings: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def why_not_shipped(settings: dict, token_source: str, device_kind: str) -> str | None:
    """Why a shipped probe of this experiment does not fit it: the cost settings that differ, or None
    when none of the shipped probes was made for an experiment of this name."""
    ours = flatten(cost_settings(settings, token_source))
    shipped = shipped_calibration_dir()
    for path, record in load_calibrations([shipped] if shipped else []):
        if record["probed_as"] != settings["name"] or record["device_kind"] != device_kind:
            continue
        theirs = flatten(cost_settings(probed_settings(record), record["token_source"]))
        differ = [f"{key} {theirs.get(key, 'unset')} there, {ours.get(key, 'unset')} here"
                  for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)]
        if differ:
            return f"the shipped probe {path.name} differs in {'; '.join(differ)}"
    return None


#: the local step timings, cached beside the probes: read here, where a calibration is chosen (the rules
#: do so while Snakemake builds the DAG), and written by ``thimble.plan.machine``, which times them
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


def on_this_cpu(calibration: Calibration, workdir: Path, math_threads: int) -> Calibration:
    """A CPU calibration as this machine's CPU would run it: one measured on another CPU model or kernel
    capability is rescaled by the local timing of its model (``thimble.plan.machine``), or, until
    ``thimble plan`` has timed one, kept and marked as foreign."""
    why = foreign_cpu(calibration.record)
    if why is None:
        return calibration
    timing = load_step_time(workdir, calibration.record, math_threads)
    note = f"{calibration.note}; " if calibration.note else ""
    if timing is None:
        return Calibration(calibration.record, calibration.path, calibration.scale,
                           f"{note}measured on another CPU ({why}) and not yet timed here: run `thimble plan` "
                           "on this machine to rescale it", foreign=True)
    ratio = timing["seconds_per_step"] / calibration.record["seconds_per_step"]
    return Calibration(calibration.record, calibration.path, calibration.scale * ratio,
                       f"{note}rescaled {ratio:.3g}x to this CPU ({why}) by {timing['steps_timed']} steps of its "
                       f"model timed here ({timing['seconds_per_step']:.3g} s/step against "
                       f"{calibration.record['seconds_per_step']:.3g})", local_step_time=timing)


def step_time_calibration(settings: dict, device_kind: str, workdir: Path) -> Calibration | None:
    """The calibration that times this experiment's steps on ``device_kind``: one of the same step FLOPs if
    there is one (its own probe, cached or shipped, first; then one that recorded as many values a step, whose
    recorder did the same work), else the one nearest in FLOPs, scaled by the ratio."""
    flops = step_flops(settings)
    candidates = [(path, record) for path, record in load_calibrations(calibration_directories(workdir))
                  if record["device_kind"] == device_kind]
    if not candidates:
        return None
    same = [(path, record) for path, record in candidates if math.isclose(record["step_flops"], flops)]
    if same:
        values = recorded_elements(settings)

        def preference(item: tuple[Path, dict]) -> tuple[bool, bool]:
            # training's own settings carry no rechunk section: there, only the values recorded tell probes apart
            own = "rechunk" in settings and record_key(item[1]) == calibration_key(settings, item[1]["token_source"])
            return not own, recorded_elements(probed_settings(item[1])) != values

        # the first of the most preferred: the cached probes come before the shipped ones
        path, record = min(same, key=preference)
        return on_this_cpu(Calibration(record, path), workdir, settings["training"]["math_threads"])
    path, record = min(candidates, key=lambda item: abs(math.log(item[1]["step_flops"] / flops)))
    scale = flops / record["step_flops"]
    return on_this_cpu(Calibration(record, path, scale, f"scaled by step FLOPs ({scale:.3g}x) from "
                                                        f"{record['probed_as']}"), workdir,
                       settings["training"]["math_threads"])


def training_seconds(settings: dict, device_kind: str, workdir: Path,
                     own: Calibration | None = None) -> tuple[float, Calibration] | None:
    """Predicted training time on ``device_kind``: from the experiment's ``own`` probe when given."""
    calibration = (on_this_cpu(own, workdir, settings["training"]["math_threads"]) if own
                   else step_time_calibration(settings, device_kind, workdir))
    if calibration is None:
        return None
    return costs.training_seconds(calibration.record, settings["training"]["steps"], calibration.scale), calibration


def any_calibration(settings: dict, workdir: Path) -> Calibration | None:
    """A calibration for settings' stage baselines: its own shape if probed, else the nearest (CPU first)."""
    for device_kind in ("cpu", "cuda"):
        calibration = step_time_calibration(settings, device_kind, workdir)
        if calibration is not None:
            return calibration
    return None


def nearest_calibration(elements: int, workdir: Path) -> Calibration | None:
    """A calibration for the stages after training of an outside recording, which has no model to time and is
    sized by what it recorded: of the probes made on a CPU (else a GPU), the one that recorded the nearest
    number of values a step to ``elements`` (its stage times then scale by the ratio, ``costs.stage_seconds``);
    the cached probes before the shipped ones among equals."""
    for device_kind in ("cpu", "cuda"):
        candidates = [(path, record) for path, record in load_calibrations(calibration_directories(workdir))
                      if record["device_kind"] == device_kind]
        if candidates:
            path, record = min(candidates, key=lambda item: abs(math.log(
                recorded_elements(probed_settings(item[1])) / max(1, elements))))
            return Calibration(record, path, note=f"the probe of {record['probed_as']}, nearest in values recorded "
                                                  "a step")
    return None


def training_peak_ram(settings: dict, n_tokens: int, workdir: Path) -> tuple[int | None, str]:
    """Training's peak RAM as the plan predicts it (and the rules' mem_mb ask for) and how, or None and why
    not: a probe's measured peak, interpreter and libraries included, its arrays replaced by those of a run
    of ``n_tokens`` tokens. A ``PlanError`` when a cached probe cannot be read."""
    calibration = any_calibration(settings, workdir)
    if calibration is None:
        return None, f"no probe in {CALIBRATION_DIR}/ or workflow/calibration/ (thimble plan makes one)"
    peak = costs.peak_ram_bytes(settings, calibration.record, n_tokens, stages=("train",)).get("train")
    if peak is None:
        return None, f"the probe {calibration.path.name} measured no training"
    return peak, (f"thimble plan's model: the measured peak of the probe {calibration.path.name}, its arrays "
                  "replaced by this run's")
