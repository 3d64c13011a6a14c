"""The names of an experiment's outputs: declared once, for the rules, the CLI and the notebook API.

Kept free of heavy imports: the Snakefile reads it while building the DAG.
"""

from __future__ import annotations

from pathlib import Path

#: the workflow's outputs, under its working directory
RESULTS_DIR = "results"

#: a dataset's files under results/data/{dataset}/ that the experiments read: the tokenizer, the encoded
#: model corpus and its live/dead token masks
DATA_DIR = "data"
TOKENIZER_FILE = "tokenizer.json"
TOKENS_FILE = "tokens.npy"
MASKS_FILE = "live_dead_tokens.safetensors"

#: the recorded tensors' files under results/{experiment}/: the stream directory training writes (its
#: stream.h5 over the segments) and the file rechunk makes of it
STREAM_DIR = "stream"
STREAM_FILE = "stream.h5"
#: the JSON ``thimble.Recorder`` writes beside its segments: the run's attributes and masks (what the workflow
#: reads of a recording while it plans, without opening HDF5, and what ``close_partial`` writes stream.h5 from)
RECORDER_RUN_FILE = "recorder.json"
#: the ``recorded_by`` attribute of a recording made by ``thimble.Recorder`` on a user's loop
RECORDER = "thimble.Recorder"
RECORDING_FILE = "recording.h5"
#: training's resume state under results/{experiment}/, present while a training is under way or interrupted
RESUME_DIR = ".partial"
#: the lattice stage's ΔW′: the dataset, and the file holding it
DELTA_W_DATASET = "delta_w_lattice"
DELTA_W_FILE = f"{DELTA_W_DATASET}.h5"

#: figures/{name}.png of an experiment, each with a caption workflow/report/{name}.rst
FIGURES_DIR = "figures"
FIGURES = ("loss", "displacement", "phases", "global_freeze", "variance", "update_ratio", "lattice_positions",
           "drivers", "tensor_freeze", "tensor_onsets")

#: the freeze stage's files under results/{experiment}/, each under its key in ``thimble.analysis.freeze.analyse``'s outputs,
#: which is also its option of ``thimble freeze`` ("-" for "_") and its name in the freeze rule's output
#: (but ``variance``, which the rule names ``exp_avg_sq``); the .csv files are its tables
FREEZE_OUTPUTS = {
    "freeze": "freeze.csv", "cycles": "freeze_cycles.csv", "tokens": "token_freeze.csv",
    "classes": "displacement_classes.csv", "lattice_positions": "lattice_positions.csv", "variance": "exp_avg_sq.csv",
    "token_steps": "token_displacement.h5", "summary": "summary.json",
}
#: token_freeze.csv's column of each token's text (read back as text, never as a number or missing)
TOKEN_TEXT_COLUMN = "token_text"
#: the replay stage's files, by their option of ``thimble replay`` ("-" for "_")
REPLAY_OUTPUTS = {"table": "replay.csv", "summary": "replay.json", "ratio_table": "update_ratio.csv"}
#: the freeze_drivers stage's files, by their option of ``thimble freeze-drivers``
DRIVERS_OUTPUTS = {"table": "freeze_drivers.csv", "summary": "freeze_drivers.json"}


def figure_file(name: str) -> str:
    """Where the figure ``name`` is, under results/{experiment}/."""
    return f"{FIGURES_DIR}/{name}.png"


def dataset_dir(results: Path, dataset: str) -> Path:
    """A dataset's folder under the results folder ``results``."""
    return Path(results) / DATA_DIR / dataset


#: the files of an experiment under results/{experiment}/, each with the stage (rule) that writes it, for the
#: notebook API's messages; the rules declare them, and tests/test_plan.py checks this list against
#: what Snakemake says the rules make
EXPERIMENT_FILES = {
    STREAM_DIR: "train", RECORDING_FILE: "rechunk", DELTA_W_FILE: "lattice",
    **dict.fromkeys(REPLAY_OUTPUTS.values(), "replay"),
    **dict.fromkeys(FREEZE_OUTPUTS.values(), "freeze"),
    **dict.fromkeys(DRIVERS_OUTPUTS.values(), "freeze_drivers"), "summary.html": "figures",
    **{figure_file(name): "figures" for name in FIGURES},
}

#: the files float16_effect writes under results/{experiment}/ for a bf16 experiment that a float16 view derives
#: from (rules/float16.smk), by the rule's output name; each with a caption workflow/report/float16_effect_{name}.rst
FLOAT16_EFFECT_FILES = {"table": "float16_effect.csv", "bands": "float16_effect_bands.csv",
                        "summary": "float16_effect.json", "figure": "float16_effect.png"}
