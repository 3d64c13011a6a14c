# What each job asks a scheduler for: threads, GPUs, memory and runtime, from `thimble plan`'s cost model.
# CFG, the validated config, is the Snakefile's global.

import functools
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError


def train_gpus(experiment):
    """GPUs a training job asks the scheduler for: 1 for training.device cuda, 0 for cpu and mps, and for
    auto as the config's cluster.auto_device_requests_gpu says."""
    device = CFG["experiments"][experiment]["training"]["device"]
    if device == "auto":
        return int(CFG["cluster"]["auto_device_requests_gpu"])
    return int(device == "cuda")


def train_threads(wildcards):
    """Cores of a training job: the recorder's compression threads and the loop. A GPU job needs enough to keep
    pace with the device (cluster.gpu_train_threads); on the CPU the model's math runs on its own
    training.math_threads, so 2 suffice. Results do not depend on either."""
    return CFG["cluster"]["gpu_train_threads"] if train_gpus(wildcards.experiment) else 2


def sized(experiment):
    """What the cost model sizes an experiment's stages after training by: its settings, or for one whose source is
    a recording, the recording's sizes (``outside_run``)."""
    from thimble.config import recording_source

    settings = CFG["experiments"][experiment]
    return settings if recording_source(settings) is None else outside_run(experiment)


@functools.cache
def outside_run(experiment):
    """The sizes of the recording an experiment analyses, from its recorder.json and its segments' names (no HDF5
    file opened), once per Snakemake process; a recording the config does not describe stops the run first,
    naming the file and the fix (the check of rules/checks.smk)."""
    from thimble.plan.recording import folder_problem, recorded_run

    stop_on(folder_problem(CFG["experiments"][experiment]))
    return recorded_run(CFG["experiments"][experiment])


@functools.cache
def calibration_of(experiment):
    """The probe that `thimble plan` cached for the experiment, or the nearest shipped or cached one (read
    once per Snakemake process: every job's resources ask for it). An outside recording has no model to probe:
    the probe nearest in values recorded a step sizes its stages."""
    from thimble.config import recording_source
    from thimble.plan import any_calibration, nearest_calibration

    if recording_source(CFG["experiments"][experiment]) is not None:
        calibration = nearest_calibration(outside_run(experiment).elements(), Path("."))
        if calibration is None:
            raise WorkflowError(f"no calibration to size the jobs of {experiment}: restore workflow/calibration/ from "
                                "the repository, or run `thimble plan` on an experiment that trains")
        return calibration
    calibration = any_calibration(CFG["experiments"][experiment], Path("."))
    if calibration is None:
        raise WorkflowError(f"no calibration to size the jobs of {experiment}: run `thimble plan "
                            f"results/{experiment}/freeze.csv`, or restore workflow/calibration/ from the repository")
    return calibration


def stage_mem_mb(experiment, stage, attempt=1):
    """Memory to ask for: the predicted peak of `thimble plan` (measured baseline + the run's arrays),
    with half again as margin, times the attempt."""
    from thimble.plan import job_mem_mb, peak_ram_bytes

    peak = peak_ram_bytes(sized(experiment), calibration_of(experiment).record, stages=(stage,))
    return job_mem_mb(peak[stage], attempt)


def train_runtime_min(experiment):
    """Minutes (Snakemake's unit for runtime) to ask a scheduler for training: the measured GPU step rate if
    probed and the job asks for a GPU, else the CPU one, doubled."""
    from thimble.plan import job_runtime_min, training_seconds

    for device_kind in ("cuda", "cpu") if train_gpus(experiment) else ("cpu",):
        timed = training_seconds(CFG["experiments"][experiment], device_kind, Path("."))
        if timed is not None:
            if timed[1].foreign:
                warn_foreign_probe(experiment, timed[1].note)
            return job_runtime_min(timed[0])
    calibration_of(experiment)  # raises, saying what to do


@functools.cache
def warn_foreign_probe(experiment, note):
    """Once per experiment and Snakemake process: its training runtime comes from another CPU's probe."""
    print(f"warning: {experiment}: the training runtime a job asks for comes from a probe {note}", file=sys.stderr)


def stage_runtime_min(experiment, stage):
    """Minutes to ask a scheduler for a stage after training: the time `thimble plan` predicts for it (fitted
    to the probe's two lengths, scaled to the experiment's steps and recorded values), doubled."""
    from thimble.plan import RecordedRun, job_runtime_min, stage_seconds

    settings = sized(experiment)
    steps = settings.steps if isinstance(settings, RecordedRun) else settings["training"]["steps"]
    timed = stage_seconds(calibration_of(experiment).record, steps, settings)
    return job_runtime_min(timed[stage]["seconds"])
