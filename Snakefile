# Thimble: freezing of bfloat16 embeddings, from corpus to report.
# This file only loads and validates the config and includes one .smk per stage;
# the work lives in the `thimble` Python package (src/thimble).

import os
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from thimble.config import SCHEMA_IN_WORKFLOW, ConfigError, load_schema, resolve_config
from thimble.util.workflow_dir import WORKFLOW_ENV

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


# The package finds this workflow's files (the shipped calibrations) through this variable; its jobs
# inherit it, so they find the workflow that started them even with --directory elsewhere.
os.environ[WORKFLOW_ENV] = workflow.basedir


# Validate before anything is planned: a bad config fails `snakemake -n` too, and writes nothing.
try:
    CFG = resolve_config(config, load_schema(Path(workflow.basedir) / SCHEMA_IN_WORKFLOW))
except ConfigError as error:
    raise WorkflowError(f"invalid configuration in {', '.join(map(str, workflow.configfiles))}:\n{error}")


wildcard_constraints:
    dataset="|".join(CFG["datasets"]),
    experiment="|".join(CFG["experiments"]),
    series="|".join(CFG["series"]) or "(?!)",
    package=r"[A-Za-z0-9][A-Za-z0-9._]*",
    version=r"[A-Za-z0-9][A-Za-z0-9.+!]*",


# the rules' helpers, by job
include: "rules/inputs.smk"
include: "rules/resources.smk"
include: "rules/routing.smk"
include: "rules/checks.smk"
include: "rules/captions.smk"
# one file per stage
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/rechunk.smk"
include: "rules/lattice.smk"
include: "rules/replay.smk"
include: "rules/freeze.smk"
include: "rules/float16.smk"


# Everything the config defines (days of CPU for the full-size experiments: name a target instead).
rule all:
    input:
        expand("results/{experiment}/figures/loss.png", experiment=CFG["experiments"]),
        expand("results/{experiment}/replay.json", experiment=CFG["experiments"]),
        expand("results/series/{series}/global_freeze.png", series=CFG["series"]),
    default_target: True
