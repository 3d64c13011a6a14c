"""The names of an experiment's outputs: declared once, for the rules, the CLI and the notebook API.

Kept free of heavy imports: the Snakefile reads it while building the DAG.
"""

#: the recorded tensors' files under results/{experiment}/: the stream directory training writes (its
#: stream.h5 over the segments) and the file rechunk makes of it
STREAM_DIR = "stream"
STREAM_FILE = "stream.h5"
RECORDING_FILE = "recording.h5"

#: figures/{name}.png of an experiment, each with a caption workflow/report/{name}.rst
FIGURES = ("loss", "displacement", "phases", "global_freeze", "variance", "update_ratio", "lattice_positions",
           "drivers")

#: the freeze stage's files under results/{experiment}/, each under its key in ``thimble.analysis.freeze.analyse``'s outputs,
#: which is also its option of ``thimble freeze`` ("-" for "_") and its name in the freeze rule's output
#: (but ``variance``, which the rule has always called ``exp_avg_sq``); the .csv files are its tables
FREEZE_OUTPUTS = {
    "freeze": "freeze.csv", "cycles": "freeze_cycles.csv", "tokens": "token_freeze.csv",
    "classes": "displacement_classes.csv", "lattice_positions": "lattice_positions.csv", "variance": "exp_avg_sq.csv",
    "token_steps": "token_displacement.h5", "summary": "summary.json",
}

#: the files of an experiment under results/{experiment}/, each with the stage (rule) that writes it, for the
#: notebook API's messages; the rules declare them, and tests/test_plan.py checks this list against
#: what Snakemake says the rules make
EXPERIMENT_FILES = {
    STREAM_DIR: "train", RECORDING_FILE: "rechunk", "delta_w_lattice.h5": "lattice",
    "replay.csv": "replay", "replay.json": "replay", "update_ratio.csv": "replay",
    **dict.fromkeys(FREEZE_OUTPUTS.values(), "freeze"),
    "freeze_drivers.csv": "freeze_drivers", "freeze_drivers.json": "freeze_drivers", "summary.html": "figures",
    **{f"figures/{name}.png": "figures" for name in FIGURES},
}

#: the files float16_effect writes under results/{experiment}/ for a bf16 experiment that a float16 view derives
#: from (rules/float16.smk), by the rule's output name; each with a caption workflow/report/float16_effect_{name}.rst
FLOAT16_EFFECT_FILES = {"table": "float16_effect.csv", "bands": "float16_effect_bands.csv",
                        "summary": "float16_effect.json", "figure": "float16_effect.png"}
