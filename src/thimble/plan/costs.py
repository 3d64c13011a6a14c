"""The cost model: what a run needs, from its settings and a probe's measurements. No I/O.

A probe (``thimble.plan.probe``) measures a short run of the experiment; these functions scale what
it measured to the full run:

- a file's size: a constant, a fixed part plus bytes per step, ΔW′'s power-law decay, or the stream's
  segment files (``predict_size``);
- a stage's peak RAM: the probe's measured peak RSS, less the large arrays at the probe's size, plus
  those arrays at the full size (``array_bytes``, ``peak_ram_bytes``);
- a stage's time: training from the probe's steady seconds per step, the stages after training from
  a fixed part and seconds per step fitted to two probe lengths (``stage_seconds``);

Both scale with what ``record.tensors`` records (``recorded_summary`` says what that is). Training holds
every recorded parameter (its queue of steps); the stages after it work one recorded parameter after
another (rechunk copies one dataset after another; an analysis reads a parameter's rows as it reads the
embedding's, a parameter at a time), so a stage's peak follows the largest recorded parameter and its time
the values of all of them. A probe made before ``record.tensors`` existed recorded the embedding alone
(``thimble.sizes.recorded_shapes``).
- what the rules ask a scheduler for (``job_mem_mb``, ``job_runtime_min``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from thimble.sizes import (
    DRIVERS_BLOCK_STEPS,
    EMBEDDING,
    REPLAY_BLOCK_STEPS,
    parameter_shapes,
    recorded_elements,
    recorded_shapes,
    rows_of,
    steps_per_chunk,
    training_footprint,
)
from thimble.update_rules import ELEMENT_BYTES, recorded_keys, rule_of, step_bytes

#: an experiment's stages in pipeline order: each is a rule of that name and a `thimble` subcommand
STAGES = ("train", "rechunk", "lattice", "replay", "freeze_drivers", "freeze", "figures")
#: the stages that read the recorded run (timed by ``stage_seconds``; training has its own step rate)
AFTER_TRAINING = STAGES[1:]
#: a stage added after a calibration was probed is sized by the stage it was measured against: it reads the
#: same recording with the same libraries (its baseline memory), and its time at thimble_7 size is within
#: the stand-in's (docs/benchmarks.md)
STAND_INS = {"freeze_drivers": "freeze"}
#: margin on the predicted peak RAM that a job asks for (times the attempt on a retry)
MEM_MARGIN = 1.5
#: margin on the predicted time that a job asks for
RUNTIME_MARGIN = 2
#: the share of the longer probe's time a stage's per-step part must make to count as measured
RESOLVED_SHARE = 0.2
#: the least runtime a job asks for, in minutes: a scheduler's queue and the job's start-up
MIN_RUNTIME_MIN = 10


@dataclass(frozen=True)
class RecordedRun:
    """What the stages after training read of a run, in sizes: its last step, each recorded parameter's shape and
    the dtype of each tensor kept of it (by state key: ``value``, ``grad``, ``exp_avg``, ...), and the rechunk
    settings that chunk its recording. ``of_settings`` derives it from an experiment that trains;
    ``thimble.plan.recording`` reads it from an outside recording."""

    steps: int
    params: dict[str, tuple[tuple[int, ...], dict[str, str]]]
    rechunk: dict | None = None

    @classmethod
    def of_settings(cls, settings: dict) -> RecordedRun:
        keys = recorded_keys(rule_of(settings["training"]), settings["record"]["dtype"])
        return cls(settings["training"]["steps"], {name: (tuple(shape), dict(keys))
                                                   for name, shape in recorded_shapes(settings).items()},
                   settings.get("rechunk"))

    def elements(self) -> int:
        """Values of the recorded parameters at each step."""
        return sum(math.prod(shape) for shape, _ in self.params.values())

    def largest(self) -> str:
        """The recorded parameter with the most values (the first of equals)."""
        return max(self.params, key=lambda name: math.prod(self.params[name][0]))

    def largest_elements(self) -> int:
        return math.prod(self.params[self.largest()][0])

    def largest_rows(self) -> int:
        return max(rows_of(shape) for shape, _ in self.params.values())

    def row_bytes(self) -> int:
        """Stored bytes of the widest step of any recorded dataset: what sizes recording.h5's chunks (rechunk
        gives every dataset the same steps per chunk)."""
        return max(math.prod(shape) * ELEMENT_BYTES[dtype] for shape, dtypes in self.params.values()
                   for dtype in dtypes.values())

    def chunk_rows(self) -> int:
        return steps_per_chunk(self.steps + 1, self.row_bytes(), self.rechunk["steps_per_chunk"],
                               self.rechunk["max_chunk_bytes"])

    def step_bytes(self) -> int:
        """Bytes of one recorded step, uncompressed, over every dataset."""
        return sum(math.prod(shape) * ELEMENT_BYTES[dtype] for shape, dtypes in self.params.values()
                   for dtype in dtypes.values())


def recorded_run(settings: dict | RecordedRun) -> RecordedRun:
    return settings if isinstance(settings, RecordedRun) else RecordedRun.of_settings(settings)


def array_bytes(settings: dict | RecordedRun, n_tokens: int = 0, stages: tuple[str, ...] = STAGES) -> dict[str, int]:
    """Bytes of the large arrays each of ``stages`` holds at its peak (interpreter and libraries excluded).

    The rules' ``mem_mb`` and the plan both use this; the plan adds each stage's measured baseline.
    Only the settings the asked stages depend on are read (training sees no rechunk settings).
    Training holds every recorded parameter; a stage after it holds one at a time, so its arrays are
    the largest recorded parameter's: its values per step (``row_elements``), and for per-row summaries
    its rows per step (``per_row_step``, the embedding's tokens when it is recorded). ``settings``: an
    experiment's, or for the stages after training an outside recording's sizes (``RecordedRun``).
    """
    run = recorded_run(settings)
    steps = run.steps

    def row_elements() -> int:
        return run.largest_elements()

    def per_row_step() -> int:
        return (steps + 1) * run.largest_rows()

    def chunk() -> int:
        return run.chunk_rows() * run.row_bytes()

    def replay_rows() -> int:
        return min(steps, REPLAY_BLOCK_STEPS)

    def held_planes() -> int:
        """Byte planes a reader of recording.h5 holds per element of a chunk, over the largest parameter's
        recorded tensors."""
        return sum(ELEMENT_BYTES[dtype] - 1 for dtype in run.params[run.largest()][1].values())

    formulas = {
        "train": lambda: sum(value for key, value in training_footprint(settings, n_tokens).items()
                             if key.startswith("ram")),
        # the source chunk's bits and the compressed pieces of the chunk being written (measured 1.85-2.0
        # chunks at thimble_7 size, docs/benchmarks.md); one dataset at a time, the largest's chunk the most
        "rechunk": lambda: 2 * chunk(),
        # the compressed source chunk and ΔW′'s compressed pieces (measured ~1 chunk at thimble_7 size)
        "lattice": chunk,
        # per block of steps (thimble.analysis.replay.BLOCK_STEPS), of the parameter being replayed: the decoded
        # rows of its value, grad and both moments (bf16, one more row than steps), the optimizer's W, m, v
        # (bf16) and the criterion's float32 sums; and one step's temporaries (the criterion's float32
        # arithmetic, a listed step's numpy reference); and per dataset of the parameter the lower byte planes
        # of the recording.h5 chunk being read
        "replay": lambda: row_elements() * ((replay_rows() + 1) * 4 * 2 + replay_rows() * (3 * 2 + 4) + 40)
        + run.chunk_rows() * row_elements() * held_planes(),
        # nine (T+1) x rows per-row summaries of 4 bytes and working copies of them, and half a chunk (its low
        # bytes) held while the chunk is decoded
        "freeze": lambda: 2 * 9 * per_row_step() * 4 + chunk() // 2,
        # per dataset (value, grad, both moments), half a chunk (its low bytes) held while the chunk is decoded
        # and a block of decoded rows (2 bytes) with its top bytes (1); the exact average and two float64 rows
        "freeze_drivers": lambda: 4 * (chunk() // 2 + min(steps, DRIVERS_BLOCK_STEPS) * row_elements() * 3)
        + row_elements() * 3 * 8,
        # max |ΔW′| and the norm per row and step
        "figures": lambda: 2 * per_row_step() * 4,
    }
    return {stage: formulas[stage]() for stage in stages}


def peak_ram_bytes(settings: dict | RecordedRun, calibration: dict, n_tokens: int = 0,
                   stages: tuple[str, ...] = STAGES) -> dict[str, int]:
    """Each probed stage's peak RSS at full size: its measured peak, less the probe's arrays, plus the
    full run's arrays (``array_bytes``; of an outside recording, ``settings`` is its ``RecordedRun`` and only
    the stages after training are asked)."""
    measured = calibration["stages"]
    measured_as = {stage: stage if stage in measured else STAND_INS.get(stage) for stage in stages}
    measured_as = {stage: probed_stage for stage, probed_stage in measured_as.items() if probed_stage in measured}
    full = array_bytes(settings, n_tokens, tuple(measured_as))
    probed = array_bytes(calibration["probe_settings"], calibration["n_tokens"], tuple(set(measured_as.values())))
    return {stage: max(0, round(measured[probed_stage]["peak_rss_bytes"] - probed[probed_stage] + full[stage]))
            for stage, probed_stage in measured_as.items()}


def segment_count(steps: int, segment_steps: int) -> int:
    return math.ceil((steps + 1) / segment_steps)


def power_sum(steps: int, exponent: float) -> float:
    """sum of t**exponent over t = 1..steps (the bytes of steps 1..T under a power-law decay)."""
    return math.fsum(t**exponent for t in range(1, steps + 1))


def predict_size(model: dict, steps: int, segment_steps: int) -> int | None:
    """A file's size at ``steps`` from its probe measurement (``thimble.plan.measure.measure_file``)."""
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


def training_seconds(calibration: dict, steps: int, scale: float = 1.0) -> float:
    """Training time of ``steps`` steps: the probe's first step (warm-up), then its steady rate, x ``scale``."""
    return (calibration["first_step_seconds"] + calibration["seconds_per_step"] * (steps - 1)) * scale


def fit_stage_time(short: tuple[int, float], long: tuple[int, float]) -> dict:
    """A stage's time as fixed + per_step x (steps + 1), through two probes' (steps, seconds).

    The fixed part is the interpreter, the imports and opening the files; a probe of a few steps is
    mostly that, so scaling its total by the steps would overstate a long run many times. Both parts
    are kept at 0 or above (a short probe's noise can exceed its per-step work).
    """
    (short_steps, short_seconds), (long_steps, long_seconds) = short, long
    per_step = max(0.0, (long_seconds - short_seconds) / (long_steps - short_steps))
    fixed = max(0.0, long_seconds - per_step * (long_steps + 1))
    return {"fixed": fixed, "per_step": per_step}


def per_step_resolved(calibration: dict, stage: str) -> bool:
    """Whether the probe's two lengths measured ``stage``'s per-step time rather than noise: the steps
    between them make at least ``RESOLVED_SHARE`` of the longer probe's time. A stage whose steps cost
    little beside its start-up is not resolved by a short probe, and its fit would understate a long run."""
    fitted = calibration.get("stage_times", {}).get(stage)
    if fitted is None or calibration.get("short_probe_steps") is None:
        return False
    between = calibration["probe_steps"] - calibration["short_probe_steps"]
    return fitted["per_step"] * between >= RESOLVED_SHARE * calibration["stages"][stage]["seconds"]


def stage_seconds(calibration: dict, steps: int, settings: dict | RecordedRun | None = None) -> dict[str, dict]:
    """Each stage after training: its predicted seconds at ``steps`` and how they were found.

    From the fit of two probe lengths (``fit_stage_time``) where it resolved the per-step part; else
    (one probe length, or steps too cheap to time beside the start-up) the whole time scaled by the
    steps, an upper bound that the result says it is. A probe that recorded other values per step than
    the experiment ``settings`` (another shape, other ``record.tensors``) has its per-step part scaled
    by the recorded values, which these stages read, compare and count one parameter after another
    (``scaled`` gives the factor). ``settings`` may be an outside recording's ``RecordedRun``.
    """
    scale = 1.0
    if settings is not None:
        elements = settings.elements() if isinstance(settings, RecordedRun) else recorded_elements(settings)
        scale = elements / recorded_elements(calibration["probe_settings"])
    times = {}
    for stage in AFTER_TRAINING:
        if stage not in calibration["stages"] and STAND_INS.get(stage) in calibration["stages"]:
            continue  # below, from its stand-in's
        if per_step_resolved(calibration, stage):
            fitted = calibration["stage_times"][stage]
            seconds = fitted["fixed"] + fitted["per_step"] * (steps + 1) * scale
            times[stage] = {"seconds": seconds, "upper_bound": False, "scaled": scale}
        elif stage in calibration["stages"]:
            # never below the probe's own time: its start-up alone does not shrink with fewer steps
            steps_ratio = (max(steps, calibration["probe_steps"]) + 1) / (calibration["probe_steps"] + 1)
            seconds = calibration["stages"][stage]["seconds"] * steps_ratio * max(1.0, scale)
            times[stage] = {"seconds": seconds, "upper_bound": True, "scaled": scale}
    for stage in AFTER_TRAINING:
        if stage not in times and STAND_INS.get(stage) in times:
            times[stage] = {**times[STAND_INS[stage]], "stand_in": STAND_INS[stage]}
    return {stage: times[stage] for stage in AFTER_TRAINING if stage in times}


def job_mem_mb(peak_bytes: int, attempt: int = 1) -> int:
    """The memory a stage's job asks for, in MB: the predicted peak with a margin, times the attempt."""
    return int(peak_bytes * MEM_MARGIN / 1e6 * attempt) + 1


def job_runtime_min(seconds: float) -> int:
    """The runtime a job asks for, in minutes (Snakemake's unit for ``runtime``): the predicted time with
    a margin, at least ``MIN_RUNTIME_MIN``."""
    return max(MIN_RUNTIME_MIN, int(RUNTIME_MARGIN * seconds / 60) + 1)


def recorded_summary(settings: dict) -> dict:
    """What ``record.tensors`` records, for the plan: the patterns, the parameters (name -> shape) of the
    model's parameters (``model_parameters`` of them), their values and uncompressed bytes per step, the datasets kept of each, and the
    largest (which sets the chunks and the analyses' peak)."""
    shapes = recorded_shapes(settings)
    rule, storage = rule_of(settings["training"]), settings["record"]["dtype"]
    elements = {name: math.prod(shape) for name, shape in shapes.items()}
    largest = max(elements, key=elements.get)
    return {"patterns": list(settings["record"].get("tensors", [EMBEDDING])), "count": len(shapes),
            "model_parameters": len(parameter_shapes(settings["model"])),
            "shapes": {name: list(shape) for name, shape in shapes.items()},
            "values_per_step": sum(elements.values()), "step_bytes": step_bytes(rule, storage, sum(elements.values())),
            "datasets": list(recorded_keys(rule, storage)), "largest": largest}
