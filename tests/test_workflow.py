"""The workflow as a whole: planning, linting."""

import re

from conftest import run_snakemake
from thimble.config import load_config

from conftest import REPO


def planned_jobs(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run, as {rule: count}."""
    table = output.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_data_targets_of_every_dataset_plan(workdir):
    datasets = load_config(REPO / "config.yaml")["datasets"]
    targets = [f"results/data/{name}/live_dead_tokens.safetensors" for name in datasets]
    result = run_snakemake(workdir, "-n", *targets)
    jobs = planned_jobs(result.stdout)
    assert jobs == {"fetch_sdist": 1, "corpus": len(datasets), "tokenizer": len(datasets),
                    "encode": len(datasets), "masks": len(datasets)}
    assert not (workdir / "results").exists()


def test_lint_only_asks_for_software_environments(workdir):
    result = run_snakemake(workdir, "--lint", check=False)
    lints = re.findall(r"^\s+\* (.+?):$", result.stdout + result.stderr, re.M)
    assert lints, "expected the conda/container suggestion per rule"
    assert set(lints) == {"Specify a conda environment or container for each rule."}
