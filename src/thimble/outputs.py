"""The names of an experiment's outputs: declared once, for the rules, the CLI and the notebook API.

Kept free of heavy imports: the Snakefile reads it while building the DAG.
"""

#: figures/{name}.png of an experiment, each with a caption workflow/report/{name}.rst
FIGURES = ("loss", "displacement", "phases", "global_freeze", "variance", "update_ratio", "lattice_positions",
           "drivers")

#: the files of an experiment under results/{experiment}/, each with the stage (rule) that writes it, for the
#: notebook API's messages; the rules declare them, and tests/test_plan.py checks this list against
#: what Snakemake says the rules make
EXPERIMENT_FILES = {
    "stream": "train", "recording.h5": "rechunk", "delta_w_lattice.h5": "lattice",
    "replay.csv": "replay", "replay.json": "replay", "update_ratio.csv": "replay",
    "freeze.csv": "freeze", "freeze_cycles.csv": "freeze", "token_freeze.csv": "freeze",
    "displacement_classes.csv": "freeze", "lattice_positions.csv": "freeze", "exp_avg_sq.csv": "freeze",
    "token_displacement.h5": "freeze", "summary.json": "freeze",
    "freeze_drivers.csv": "freeze_drivers", "freeze_drivers.json": "freeze_drivers", "summary.html": "figures",
    **{f"figures/{name}.png": "figures" for name in FIGURES},
}

#: the files float16_effect writes under results/{experiment}/ for a bf16 experiment that a float16 view derives
#: from (rules/float16.smk), by the rule's output name; each with a caption workflow/report/float16_effect_{name}.rst
FLOAT16_EFFECT_FILES = {"table": "float16_effect.csv", "bands": "float16_effect_bands.csv",
                        "summary": "float16_effect.json", "figure": "float16_effect.png"}
