"""Load, validate and resolve the workflow configuration.

The JSON schema (``workflow/schemas/config.schema.yaml`` of the workflow) is the single source
of the settings' types and defaults. ``resolve_config`` checks a config dict
against it, then the cross-key rules a schema cannot express, and returns
every experiment with its settings fully merged:
schema defaults <- ``defaults`` <- the experiment's own keys.

An experiment either trains (it names a ``dataset``) or analyses a recording that a loop of the user's made
with ``thimble.Recorder`` (``source: {recording: <path>}``): that one has no dataset, model, training or record
settings, only what the stages after training read (``RECORDING_SECTIONS``).

Every problem becomes one ``ConfigError`` line that names the offending key.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from thimble.errors import ThimbleError
from thimble.sizes import (
    EMBEDDING,
    HDF5_MAX_CHUNK_BYTES,
    parameter_shapes,
    row_bytes,
    select_parameters,
    steps_per_chunk,
)
from thimble.update_rules import rule_problems

#: the schema's place in the workflow directory (the design's workflow/schemas/)
SCHEMA_IN_WORKFLOW = Path("workflow") / "schemas" / "config.schema.yaml"
#: names that are directories of their own under results/, not experiments
RESERVED_NAMES = {"data", "downloads", "series"}


class ConfigError(ThimbleError, ValueError):
    """A configuration problem; the message names the key and the fix."""


def load_yaml(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle) or {}


def schema_path() -> Path:
    """``workflow/schemas/config.schema.yaml`` of the workflow this package runs (thimble.util.workflow_dir)."""
    from thimble.util.workflow_dir import find_workflow_dir

    return find_workflow_dir() / SCHEMA_IN_WORKFLOW


def load_schema(path: str | Path | None = None) -> dict:
    return load_yaml(schema_path() if path is None else path)


def _key(path) -> str:
    return ".".join(str(part) for part in path) or "(top level)"


def _describe(error: jsonschema.ValidationError) -> str:
    """One line per schema violation, naming the config key."""
    where = _key(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        keys = ", ".join(_key([*error.absolute_path, name]) for name in unknown)
        return f"unknown config key {keys}; allowed here: {', '.join(allowed)}"
    if error.validator == "required":
        return f"config key {where}: {error.message}"
    if error.validator == "type":
        return (f"config key {where} must be of type {error.validator_value}, "
                f"got {type(error.instance).__name__} {error.instance!r}")
    if "propertyNames" in error.absolute_schema_path:
        return (f"config key {where}: name {error.instance!r} is not allowed; "
                "names start with a letter and use letters, digits and '_'")
    if error.validator == "oneOf" and error.context:
        reasons = "; ".join(sorted({sub.message for sub in error.context}))
        return f"config key {where}: {error.instance!r} is not valid ({reasons})"
    return f"config key {where}: {error.message}"


def non_finite_numbers(value, path=()) -> list[tuple[tuple, float]]:
    """(key path, value) of every NaN or infinity in ``value`` (YAML's .nan, .inf and -.inf), nested keys and
    list items included. JSON Schema's ``number`` takes them, and no bound refuses NaN (every comparison with
    it is false)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [(path, value)]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in non_finite_numbers(item, (*path, key))]
    if isinstance(value, list):
        return [found for index, item in enumerate(value) for found in non_finite_numbers(item, (*path, index))]
    return []


def _yaml_number(value: float) -> str:
    return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")


def validate_schema(config: dict, schema: dict) -> None:
    non_finite = {tuple(path): value for path, value in non_finite_numbers(config)}
    lines = [(path, f"config key {_key(path)}: {_yaml_number(value)} is not a finite number; NaN and infinities are "
                    "refused wherever the config takes a number: give a finite value")
             for path, value in non_finite.items()]
    # a non-finite value's own line says what is wrong with it: a type error of it would not
    lines += [(tuple(error.absolute_path), _describe(error))
              for error in jsonschema.Draft202012Validator(schema).iter_errors(config)
              if tuple(error.absolute_path) not in non_finite]
    if lines:
        lines.sort(key=lambda line: [str(part) for part in line[0]])
        raise ConfigError("\n".join(text for _, text in lines))


def schema_defaults(schema: dict) -> dict:
    """The default of every setting, read from ``$defs/settings``."""

    def walk(node: dict) -> Any:
        if "properties" in node:
            return {name: walk(sub) for name, sub in node["properties"].items()
                    if "properties" in sub or "default" in sub}
        return copy.deepcopy(node["default"])

    return walk(schema["$defs"]["settings"])


#: an experiment's own keys beside its settings sections: none of them is a default to override
EXPERIMENT_KEYS = ("dataset", "description", "float16_view", "source")
#: the settings sections of an experiment whose source is a recording: what the stages after training read
RECORDING_SECTIONS = ("rechunk", "analysis")
#: keys an experiment whose source is a recording cannot have, each with why (the message's end)
NOT_FOR_RECORDINGS = {
    "dataset": "its data went through the loop that made the recording; drop dataset",
    "model": "its model is the one the recording holds (the parameters' names and shapes are the recording's; "
             "source.tensors states which it must hold); drop model",
    "training": "it trains nothing: the optimizer's settings at every step are the recording's own (its "
                "hyperparameters table); drop training",
    "record": "what is recorded was chosen in the loop (thimble.Recorder(..., tensors=...)); drop record",
    "float16_view": "it applies to float16 storage of a training; drop float16_view",
}


def experiment_default(schema: dict, key: str):
    """The schema's default of an experiment's own key (``EXPERIMENT_KEYS``)."""
    return schema["properties"]["experiments"]["additionalProperties"]["properties"][key]["default"]


def deep_merge(base: dict, override: dict) -> dict:
    """A new dict: ``override`` on top of ``base``; nested dicts merge, the rest replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def settings_hash(settings: dict) -> str:
    """A stable hash of resolved settings (recorded as provenance)."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


#: what each stage reads of an experiment's settings: its rule passes only these (a
#: section name alone means the whole section), so editing any other key, `description`
#: included, reruns only the stages that read it
STAGE_SETTINGS = {
    "train": ("name", "dataset", "model", "training", "record"),
    "rechunk": (("rechunk", "steps_per_chunk"), ("rechunk", "max_chunk_bytes"), ("rechunk", "compression_level")),
    "freeze": ("name", "analysis"),
}
#: keys inside a stage's settings that change none of its outputs' data, only what the stage verifies:
#: left out of the stage's settings (its rule's tracked params) and of the resume key, so editing one
#: reruns nothing and keeps a resumable run; the rule hands them to the job beside the settings
UNTRACKED_SETTINGS = {
    "train": (("training", "determinism_check_steps"),),
    # what the config expects a recording to hold: checked whenever rechunk reads the recording (at -n too),
    # and no bit of recording.h5 depends on it
    "rechunk": (("source", "tensors"), ("source", "experiment")),
}


def without_untracked(settings: dict, stage: str) -> dict:
    """A copy of ``settings`` without the ``UNTRACKED_SETTINGS`` of ``stage``."""
    tracked = copy.deepcopy(settings)
    for section, name in UNTRACKED_SETTINGS.get(stage, ()):
        tracked.get(section, {}).pop(name, None)
    return tracked


def stage_settings(experiment: dict, stage: str) -> dict:
    """The part of a resolved experiment that ``stage`` reads (``STAGE_SETTINGS``), less its ``UNTRACKED_SETTINGS``.

    The rechunk of a recording also reads the experiment's name (recording.h5's attribute ``experiment``) and
    its source (the recording's path, written beside it); an experiment whose source is a recording has no
    train stage."""
    source = recording_source(experiment)
    if stage == "train" and source is not None:
        raise ConfigError(f"experiment {experiment['name']} analyses the recording {source['recording']}: it has no "
                          "train stage")
    selected: dict = {}
    for key in STAGE_SETTINGS[stage]:
        if isinstance(key, tuple):
            section, name = key
            selected.setdefault(section, {})[name] = copy.deepcopy(experiment[section][name])
        else:
            selected[key] = copy.deepcopy(experiment[key])
    if stage == "rechunk" and source is not None:
        selected.update(name=experiment["name"], source=copy.deepcopy(source))
    return without_untracked(selected, stage)


def recording_source(experiment: dict) -> dict | None:
    """The resolved ``source`` of an experiment that analyses a recording (``recording``: its path as the config
    gives it, relative to the working directory or absolute; ``tensors`` and ``experiment``: what it must hold,
    or None), or None for an experiment that trains."""
    return experiment.get("source")


def recording_path(experiment: dict, workdir: str | Path = ".") -> Path:
    """The recording an experiment analyses (the folder ``thimble.Recorder`` was given; its stream is under
    ``stream/``), relative paths taken from ``workdir``, the workflow's working directory."""
    return Path(workdir) / Path(recording_source(experiment)["recording"]).expanduser()


def recording_mismatch(key: str, source: dict, where: str, param_names: list[str],
                       recorded_experiment: str | None) -> str | None:
    """Why a recording does not hold what the config expects of it (``source.tensors``: names or shell-style
    patterns each matching a recorded parameter; ``source.experiment``: the name it was recorded under), or
    None. ``key``: the experiment's config key; ``where``: the file the recording's names were read from."""
    expected = source.get("experiment")
    if expected is not None and recorded_experiment != expected:
        return (f"{where} was recorded as experiment {recorded_experiment!r}, but config key {key}.source.experiment "
                f"expects {expected!r}: it is another run's recording; point {key}.source.recording at the run's "
                "recording, or correct source.experiment")
    unmatched = [pattern for pattern in source.get("tensors") or ()
                 if not fnmatch.filter(param_names, pattern)]
    if unmatched:
        shown = ", ".join(param_names[:8]) + (", ..." if len(param_names) > 8 else "")
        return (f"{where} records {len(param_names)} parameters ({shown}), and none is named "
                f"{' or '.join(map(repr, unmatched))}, which config key {key}.source.tensors expects: it is a "
                "recording of another model, or of other tensors; point source.recording at the recording of "
                "this model, or correct source.tensors")
    return None


def trajectory_settings(settings: dict) -> dict:
    """The settings that shape a recorded trajectory, bit for bit, and the layout of its resume state:
    model, training (math threads included), the stored dtype, the segment length and the recorded tensors."""
    return {"model": copy.deepcopy(settings["model"]),
            "training": without_untracked(settings, "train")["training"],
            "record": {"dtype": settings["record"]["dtype"], "segment_steps": settings["record"]["segment_steps"],
                       "tensors": settings["record"]["tensors"]}}


def _training_without_storage(experiment: dict) -> dict:
    """What decides a recorded trajectory's bits apart from how it is stored: the dataset, the model and the
    (tracked) training settings. record.dtype is the storage; record.segment_steps only lays out the stream
    and the resume state."""
    return {"dataset": experiment["dataset"], "model": experiment["model"],
            "training": without_untracked(experiment, "train")["training"]}


def training_twin(experiments: dict, name: str) -> str | None:
    """The bf16 experiment whose recording ``name``'s float16 storage is a view of, or None (``name`` trains).

    The rule: ``name`` stores float16 (``record.dtype: float16``, and its ``float16_view`` is not false), and an
    experiment that stores bfloat16 has
    the same dataset, model and training settings (``_training_without_storage``; the untracked ones aside):
    the first such experiment in config order. Its recording holds every bit the float16 run would train, so
    the float16 recording is derived from it (``thimble float16-view``), and ``name`` never trains. Pure and
    cheap: the Snakefile calls it while building the DAG.
    """
    experiment = experiments[name]
    if recording_source(experiment) is not None or experiment["record"]["dtype"] != "float16" \
            or not experiment.get("float16_view", True):
        return None
    trajectory = _training_without_storage(experiment)
    for other, candidate in experiments.items():
        if other != name and recording_source(candidate) is None and candidate["record"]["dtype"] == "bfloat16" \
                and _training_without_storage(candidate) == trajectory:
            return other
    return None


def float16_views(experiments: dict) -> dict[str, str]:
    """{float16 experiment: its training twin} for every experiment ``training_twin`` derives."""
    views = {name: training_twin(experiments, name) for name in experiments}
    return {name: twin for name, twin in views.items() if twin is not None}


def float16_view_of(experiments: dict, twin: str) -> str | None:
    """The first float16 experiment (config order) derived from bf16 experiment ``twin``, or None."""
    return next((view for view, source in float16_views(experiments).items() if source == twin), None)


def _check_experiment(name: str, exp: dict, datasets: dict) -> list[str]:
    problems = []
    key = f"experiments.{name}"
    if name in RESERVED_NAMES:
        problems.append(f"config key {key}: the name '{name}' is reserved for results/{name}/; "
                        "rename the experiment")
    if exp["dataset"] not in datasets:
        problems.append(f"config key {key}.dataset: dataset '{exp['dataset']}' is not defined; "
                        f"defined datasets: {', '.join(sorted(datasets))}")
        return problems
    model = exp["model"]
    if model["hidden_dim"] % model["n_heads"]:
        problems.append(f"config key {key}.model.n_heads: {model['n_heads']} does not divide "
                        f"model.hidden_dim {model['hidden_dim']}; choose heads that divide it")
    try:
        select_parameters(exp["record"]["tensors"], parameter_shapes(model), f"{key}.record.tensors")
    except ThimbleError as error:
        return [*problems, str(error)]
    if exp["record"]["dtype"] == "float16" and exp["record"]["tensors"] != [EMBEDDING]:
        problems.append(f"config key {key}.record.tensors: float16 storage (record.dtype) is the seed's storage of "
                        f"the embedding alone; record {EMBEDDING!r} only, or store bfloat16")
    rechunk = exp["rechunk"]
    problems += rule_problems(key, exp["training"], exp["record"])
    # the widest recorded tensor (float32 state under fp32_master) sizes the largest chunk
    step_bytes = row_bytes(exp)
    if rechunk["max_chunk_bytes"] > HDF5_MAX_CHUNK_BYTES:
        problems.append(f"config key {key}.rechunk.max_chunk_bytes: {rechunk['max_chunk_bytes']} is over "
                        f"HDF5's chunk limit of {HDF5_MAX_CHUNK_BYTES} bytes (4 GiB - 1)")
    elif rechunk["steps_per_chunk"] == "auto" and step_bytes > rechunk["max_chunk_bytes"]:
        problems.append(f"config key {key}.rechunk.max_chunk_bytes: one step takes {step_bytes} bytes, "
                        "more than the cap; raise the cap")
    else:
        rows = steps_per_chunk(exp["training"]["steps"] + 1, step_bytes,
                               rechunk["steps_per_chunk"], rechunk["max_chunk_bytes"])
        if rows * step_bytes > HDF5_MAX_CHUNK_BYTES:
            fit = HDF5_MAX_CHUNK_BYTES // step_bytes
            problems.append(f"config key {key}.rechunk.steps_per_chunk: {rows} steps x {step_bytes} bytes "
                            f"= {rows * step_bytes} bytes per chunk, over HDF5's 4 GiB chunk limit; "
                            f"use at most {fit} or 'auto'")
    return problems + _analysis_problems(key, exp["analysis"], exp["training"]["steps"])


def _analysis_problems(key: str, analysis: dict, steps: int | None) -> list[str]:
    """The analysis settings' cross-key problems; ``steps``: the run's, None for a recording (whose steps are
    known once it is read: the workflow checks its windows then, ``window_problem``)."""
    problems = []
    if analysis["cold_max"] <= analysis["solid_max"]:
        problems.append(f"config key {key}.analysis.cold_max: {analysis['cold_max']} must exceed "
                        f"analysis.solid_max {analysis['solid_max']}")
    for index, (start, end) in enumerate(analysis["windows"]):
        if steps is None and not 1 <= start <= end:
            problems.append(f"config key {key}.analysis.windows[{index}]: [{start}, {end}] must satisfy "
                            "1 <= start <= end <= the recording's steps")
        elif steps is not None and not 1 <= start <= end <= steps:
            problems.append(f"config key {key}.analysis.windows[{index}]: [{start}, {end}] must satisfy "
                            f"1 <= start <= end <= training.steps ({steps})")
    return problems


def window_problem(experiment: dict, steps: int, where: str) -> str | None:
    """An analysis window of a recording's experiment past the recording's last step ``steps`` (read from
    ``where``), or None."""
    for index, (start, end) in enumerate(experiment["analysis"]["windows"]):
        if end > steps:
            return (f"config key experiments.{experiment['name']}.analysis.windows[{index}]: [{start}, {end}] ends "
                    f"after the recording's last step {steps} ({where}); end it at {steps} at most")
    return None


def _check_recording_experiment(name: str, raw: dict, exp: dict) -> list[str]:
    """The problems of an experiment whose source is a recording: keys it cannot have, its rechunk and analysis
    settings."""
    key = f"experiments.{name}"
    problems = []
    if name in RESERVED_NAMES:
        problems.append(f"config key {key}: the name '{name}' is reserved for results/{name}/; "
                        "rename the experiment")
    where = f"the recording {exp['source']['recording']}"
    problems += [f"config key {key}.{section}: the experiment's source is {where}, and {why}"
                 for section, why in NOT_FOR_RECORDINGS.items() if section in raw]
    if "keep_stream" in raw.get("rechunk", {}):
        problems.append(f"config key {key}.rechunk.keep_stream: the experiment's source is {where}, whose stream is "
                        "the loop's own and is never deleted; drop rechunk.keep_stream")
    if exp["rechunk"]["max_chunk_bytes"] > HDF5_MAX_CHUNK_BYTES:
        problems.append(f"config key {key}.rechunk.max_chunk_bytes: {exp['rechunk']['max_chunk_bytes']} is over "
                        f"HDF5's chunk limit of {HDF5_MAX_CHUNK_BYTES} bytes (4 GiB - 1)")
    return problems + _analysis_problems(key, exp["analysis"], None)


def resolve_config(config: dict, schema: dict | None = None) -> dict:
    """Validate ``config`` and return ``{"datasets", "experiments", "series", "cluster"}``, fully resolved.

    Each resolved experiment that trains holds ``name``, ``dataset``, ``description``, ``float16_view`` and the
    settings sections, with ``model.vocab_size`` taken from its dataset; one whose source is a recording holds
    ``name``, ``description``, ``source`` (``recording_source``) and the ``RECORDING_SECTIONS``.
    """
    schema = load_schema() if schema is None else schema
    validate_schema(config, schema)
    defaults = deep_merge(schema_defaults(schema), config.get("defaults", {}))
    datasets = config["datasets"]
    problems: list[str] = []
    for name, dataset in datasets.items():
        if name in RESERVED_NAMES:
            problems.append(f"config key datasets.{name}: the name '{name}' is reserved; rename the dataset")
    experiments = {}
    for name, raw in config["experiments"].items():
        if "source" in raw:
            exp = {section: deep_merge(defaults.get(section, {}), raw.get(section, {}))
                   for section in RECORDING_SECTIONS}
            # the recording's stream is the loop's: never deleted, so keep_stream does not apply
            exp["rechunk"].pop("keep_stream", None)
            exp.update(name=name, description=raw.get("description", ""),
                       source={"recording": raw["source"]["recording"], "tensors": raw["source"].get("tensors"),
                               "experiment": raw["source"].get("experiment")})
            problems += _check_recording_experiment(name, raw, exp)
            experiments[name] = exp
            continue
        if "dataset" not in raw:
            problems.append(f"config key experiments.{name}: give dataset (an experiment that thimble trains) or "
                            "source: {recording: <path>} (one that analyses a recording made with thimble.Recorder)")
            continue
        overrides = {k: v for k, v in raw.items() if k not in EXPERIMENT_KEYS}
        exp = deep_merge(defaults, overrides)
        exp.update(name=name, dataset=raw["dataset"], description=raw.get("description", ""),
                   float16_view=raw.get("float16_view", experiment_default(schema, "float16_view")))
        if raw["dataset"] in datasets:
            exp["model"]["vocab_size"] = datasets[raw["dataset"]]["vocab_size"]
        problems += _check_experiment(name, exp, datasets)
        experiments[name] = exp
    series = config.get("series", {})
    for name, members in series.items():
        if name in experiments:
            problems.append(f"config key series.{name}: a series cannot share its name with an experiment")
        for index, member in enumerate(members):
            if member not in experiments:
                problems.append(f"config key series.{name}[{index}]: experiment '{member}' is not defined; "
                                f"defined experiments: {', '.join(sorted(experiments))}")
    if problems:
        raise ConfigError("\n".join(problems))
    cluster_defaults = {name: node["default"] for name, node in schema["properties"]["cluster"]["properties"].items()}
    return {"datasets": copy.deepcopy(datasets), "experiments": experiments, "series": copy.deepcopy(series),
            "cluster": deep_merge(cluster_defaults, config.get("cluster", {}))}


def load_config(path: str | Path, schema: str | Path | None = None) -> dict:
    """Read a config file and resolve it against ``schema`` (default: the workflow's); errors name the file."""
    try:
        return resolve_config(load_yaml(path), load_schema(schema))
    except ConfigError as error:
        raise ConfigError(f"invalid configuration in {path}:\n{error}") from None
