"""The names of an experiment's figures: declared once, for the rules, the CLI and the plan.

Kept free of heavy imports: the Snakefile reads it while building the DAG.
"""

#: figures/{name}.png of an experiment, each with a caption workflow/report/{name}.rst
FIGURES = ("loss", "displacement", "phases", "global_freeze", "variance", "update_ratio", "lattice_positions")
