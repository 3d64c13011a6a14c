"""The plan of a target: the files Snakemake would make for it, each experiment's probe, and what the
cost model predicts for them, against this machine's free disk and memory."""

from __future__ import annotations

import csv
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

from thimble.config import recording_path, recording_source, training_twin
from thimble.errors import PlanError
from thimble.outputs import EXPERIMENT_FILES, RECORDING_FILE, RESULTS_DIR
from thimble.plan import costs, machine
from thimble.plan.calibration import Calibration, nearest_calibration, probed_settings, training_seconds
from thimble.plan.probe import dataset_tokens, ensure_probe

log = logging.getLogger("thimble.plan")


def snakemake_summary(workdir: Path, targets: list[str], snakefile: Path,
                      configfile: Path | None = None) -> list[dict]:
    """The files the targets need and whether Snakemake would (re)make them (``snakemake --summary``), with
    ``configfile`` over the workflow's config.yaml when given (the config the plan was asked for)."""
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(workdir),
               *(["--configfile", str(Path(configfile).resolve())] if configfile else []), "--summary", *targets]
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
    match = re.match(rf"{RESULTS_DIR}/([^/]+)/(.+)$", path)
    if match and match.group(1) in experiments:
        return match.group(1), match.group(2)
    return None


def existing_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def machine_memory() -> dict:
    """This machine's memory in bytes: all of it, and what is available now."""
    import psutil

    memory = psutil.virtual_memory()
    return {"total": memory.total, "available": memory.available}


def predict_files(files: list[dict], record: dict, steps: int, segment_steps: int, workdir: Path) -> None:
    """Each file's predicted size from the probe ``record`` (an existing one's size where none is), in place."""
    for file in files:
        model = record["files"].get(file["relative"])
        predicted = costs.predict_size(model, steps, segment_steps) if model else None
        file.update(bytes=predicted, predicted=predicted is not None)
        if predicted is None and not file["pending"]:
            file["bytes"] = existing_bytes(workdir / file["path"])


def training_times(settings: dict, own: dict[str, Calibration], workdir: Path) -> dict[str, dict | None]:
    """Training's predicted time on the CPU and a GPU, with the calibration each comes from (None where none is)."""
    cpu_timed = training_seconds(settings, "cpu", workdir, own.get("cpu"))
    if cpu_timed is not None and cpu_timed[1].foreign:
        # a probe of another CPU is never used as this machine's: time its model here (cached) to rescale it
        machine.ensure_step_time(workdir, cpu_timed[1].record, settings, log)
    training = {}
    for device_kind in ("cpu", "cuda"):
        timed = training_seconds(settings, device_kind, workdir, own.get(device_kind))
        if timed is None:
            training[device_kind] = None
            continue
        seconds, calibration = timed
        training[device_kind] = {
            "seconds": seconds, "seconds_per_step": calibration.record["seconds_per_step"] * calibration.scale,
            "runtime_min": costs.job_runtime_min(seconds),
            "calibration": str(calibration.path),
            "device_name": f"{calibration.record['device_name']}, {calibration.record['torch_threads']} math threads"
            if device_kind == "cpu" else calibration.record["device_name"],
            "host": calibration.record["host"], "note": calibration.note}
    return training


def plan_experiment(config: dict, name: str, files: list[dict], workdir: Path, snakefile: Path,
                    probe_steps: int | None, probe_devices: list[str], threads: int, reprobe: bool) -> dict:
    settings = config["experiments"][name]
    steps, segment_steps = settings["training"]["steps"], settings["record"]["segment_steps"]
    files.sort(key=lambda file: costs.STAGES.index(file["stage"]) if file["stage"] in costs.STAGES
               else len(costs.STAGES))
    cpu, source = ensure_probe(config, settings, workdir, "cpu", probe_steps, threads, reprobe, snakefile)
    own: dict[str, Calibration] = {"cpu": cpu}
    for device in probe_devices:
        calibration, _ = ensure_probe(config, settings, workdir, device, probe_steps, threads, reprobe, snakefile)
        own[calibration.record["device_kind"]] = calibration
    record = cpu.record
    predict_files(files, record, steps, segment_steps, workdir)
    stages = {file["stage"] for file in files}
    peak = {stage: value for stage, value in costs.peak_ram_bytes(settings, record, dataset_tokens(settings, workdir))
            .items() if stage in stages}
    # a float16 view never trains: its twin's training made its bits (thimble.config.training_twin)
    twin = training_twin(config["experiments"], name)
    training = dict.fromkeys(("cpu", "cuda")) if twin else training_times(settings, own, workdir)
    stage_seconds = {stage: value for stage, value in costs.stage_seconds(record, steps, settings).items()
                     if stage in stages}
    # what each job asks a scheduler for (the train row: on the CPU, as the plan's table shows it)
    runtime_min = {stage: costs.job_runtime_min(value["seconds"]) for stage, value in stage_seconds.items()}
    if training["cpu"] is not None and "train" in stages:
        runtime_min["train"] = training["cpu"]["runtime_min"]
    return {
        "settings_summary": f"dataset {settings['dataset']}, {steps} steps, {settings['model']['vocab_size']} x "
                            f"{settings['model']['hidden_dim']}, stored as {settings['record']['dtype']}, "
                            f"training.math_threads {settings['training']['math_threads']}",
        "recorded": costs.recorded_summary(settings),
        "probe": str(cpu.path), "probe_source": source, "probe_steps": record["probe_steps"],
        "token_source": record["token_source"], "files": files,
        "peak_ram_bytes": peak, "mem_mb": {stage: costs.job_mem_mb(value) for stage, value in peak.items()},
        "stage_seconds": stage_seconds, "runtime_min": runtime_min,
        "training_seconds": training, "trained_by": twin,
    }


def recorded_run_summary(run: costs.RecordedRun, attrs: dict) -> dict:
    """What an outside recording holds, for the plan: each recorded parameter's shape, the values and
    uncompressed bytes a step, the tensors kept of each, the largest, the optimizer that stepped them."""
    keys = list(dict.fromkeys(key for _, dtypes in run.params.values() for key in dtypes))
    return {"count": len(run.params), "shapes": {name: list(shape) for name, (shape, _) in run.params.items()},
            "values_per_step": run.elements(), "step_bytes": run.step_bytes(), "datasets": keys,
            "largest": run.largest(), "optimizer_class": str(attrs.get("optimizer_class", "")),
            "interrupted": bool(attrs.get("interrupted", False))}


def predict_recording_files(files: list[dict], record: dict, run: costs.RecordedRun, stream_bytes: int,
                            workdir: Path) -> None:
    """Each file of an outside recording's experiment, predicted in place: recording.h5 as the stream's segments
    take on disk (rechunk stores the same bits; its chunks of many steps compress them no worse); the rest by the
    probe ``record``'s models with their per-step part scaled to the recording: the HDF5 files by the values
    recorded a step, the tables (rows of every recorded tensor) by the recorded tensors."""
    probe = costs.RecordedRun.of_settings(probed_settings(record))
    scale = {".h5": run.elements() / probe.elements(), ".csv": len(run.params) / len(probe.params)}
    for file in files:
        model = record["files"].get(file["relative"])
        if file["relative"] == RECORDING_FILE:
            predicted = stream_bytes
        elif model is None:
            predicted = None
        else:
            factor = scale.get(Path(file["relative"]).suffix, 1.0)
            scaled = dict(model)
            for part in ("per_row", "probe_stored"):
                if part in scaled:
                    scaled[part] = scaled[part] * factor
            predicted = costs.predict_size(scaled, run.steps, 1)
        file.update(bytes=predicted, predicted=predicted is not None)
        if predicted is None and not file["pending"]:
            file["bytes"] = existing_bytes(workdir / file["path"])


def plan_recording_experiment(config: dict, name: str, files: list[dict], workdir: Path) -> dict:
    """The plan of an experiment whose source is a recording: its sizes from the recording's stream.h5 (its
    attributes and datasets' shapes), its stages sized by the probe nearest in values recorded a step (it has no
    model of thimble's to probe), no training."""
    from thimble.plan.recording import folder_problem, read_folder, recorded_run_of_stream

    settings = config["experiments"][name]
    problem = folder_problem(settings, workdir)
    if problem:
        raise PlanError(problem)
    run, attrs = recorded_run_of_stream(settings, workdir)
    calibration = nearest_calibration(run.elements(), workdir)
    if calibration is None:
        raise PlanError(f"no probe to size the stages of {name} by: restore workflow/calibration/ from the "
                        "repository, or run `thimble plan` on an experiment that trains")
    record = calibration.record
    folder = read_folder(recording_path(settings, workdir))
    files.sort(key=lambda file: costs.STAGES.index(file["stage"]) if file["stage"] in costs.STAGES
               else len(costs.STAGES))
    predict_recording_files(files, record, run, sum(path.stat().st_size for _, _, path in folder.segments), workdir)
    stages = tuple(stage for stage in costs.AFTER_TRAINING if stage in {file["stage"] for file in files})
    peak = costs.peak_ram_bytes(run, record, stages=stages)
    stage_seconds = {stage: value for stage, value in costs.stage_seconds(record, run.steps, run).items()
                     if stage in stages}
    return {
        "settings_summary": f"the recording {recording_source(settings)['recording']}: steps 0..{run.steps} of "
                            f"{run_summary_optimizer(attrs)}",
        "recording": str(folder.path), "recorded": recorded_run_summary(run, attrs),
        "probe": str(calibration.path), "probe_source": "shipped" if calibration.shipped else "cached",
        "probe_steps": record["probe_steps"], "probe_note": calibration.note, "token_source": record["token_source"],
        "files": files, "peak_ram_bytes": peak, "mem_mb": {stage: costs.job_mem_mb(value) for stage, value in peak.items()},
        "stage_seconds": stage_seconds,
        "runtime_min": {stage: costs.job_runtime_min(value["seconds"]) for stage, value in stage_seconds.items()},
        "training_seconds": dict.fromkeys(("cpu", "cuda")), "trained_by": None,
    }


def run_summary_optimizer(attrs: dict) -> str:
    optimizer = str(attrs.get("optimizer_class", "an unknown optimizer"))
    implementation = attrs.get("optimizer_impl")
    return f"{optimizer} ({implementation})" if implementation else optimizer


def make_plan(config: dict, targets: list[str], workdir: Path, snakefile: Path, probe_steps: int | None,
              probe_devices: list[str], threads: int, reprobe: bool = False,
              configfile: Path | None = None) -> dict:
    """Everything ``thimble plan`` prints, as data; ``config`` is ``configfile``'s, the DAG's too when given."""
    rows = snakemake_summary(workdir, targets, snakefile, configfile)
    files_of: dict[str, list[dict]] = {}
    other_files = []
    for row in rows:
        found = experiment_of(row["output_file"], config["experiments"])
        if found is None:
            other_files.append({"path": row["output_file"], "rule": row["rule"], "pending": row["pending"],
                                "bytes": existing_bytes(workdir / row["output_file"]) or None,
                                "predicted": False})
            continue
        name, relative = found
        files_of.setdefault(name, []).append({"path": row["output_file"], "relative": relative,
                                              "stage": EXPERIMENT_FILES.get(relative, row["rule"]), "pending": row["pending"]})
    experiments = {name: plan_recording_experiment(config, name, files, workdir)
                   if recording_source(config["experiments"][name]) is not None
                   else plan_experiment(config, name, files, workdir, snakefile, probe_steps, probe_devices, threads,
                                        reprobe) for name, files in files_of.items()}

    pending = [file for entry in experiments.values() for file in entry["files"] if file["pending"]]
    pending += [file for file in other_files if file["pending"]]
    need = sum(file["bytes"] or 0 for file in pending if file["predicted"])
    disk_dir = workdir / RESULTS_DIR if (workdir / RESULTS_DIR).exists() else workdir
    free = shutil.disk_usage(disk_dir).free
    memory = machine_memory()
    peaks = [(value, stage, name) for name, entry in experiments.items()
             for stage, value in entry["peak_ram_bytes"].items()]
    largest = max(peaks, default=None)
    fits_disk, fits_memory = need <= free, largest is None or largest[0] <= memory["total"]
    return {"targets": targets, "experiments": experiments, "other_files": other_files,
            "bytes_to_write": need, "unpredicted_to_write": [f["path"] for f in pending if not f["predicted"]],
            "free_bytes": free, "disk": str(disk_dir), "fits_disk": fits_disk,
            "memory": memory, "largest_peak": {"bytes": largest[0], "stage": largest[1], "experiment": largest[2]}
            if largest else None,
            "fits_memory": fits_memory, "fits": fits_disk and fits_memory}
