"""The package finds the workflow's files without relying on an editable install (thimble.util.workflow_dir)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from thimble.util import workflow_dir
from thimble.util.workflow_dir import WORKFLOW_ENV, WorkflowNotFoundError, find_workflow_dir


def fake_workflow(path: Path) -> Path:
    """A directory that looks like a clone: a Snakefile and rules/."""
    (path / "rules").mkdir(parents=True)
    (path / "Snakefile").write_text("# a workflow\n")
    return path


@pytest.fixture
def installed_copy(monkeypatch, tmp_path):
    """The package as a non-editable install sees it: no Snakefile beside the package, no variable set."""
    monkeypatch.delenv(WORKFLOW_ENV, raising=False)
    monkeypatch.setattr(workflow_dir, "source_checkout", lambda: tmp_path / "site-packages")


def test_the_editable_checkout_is_found_from_anywhere(monkeypatch, tmp_path):
    monkeypatch.delenv(WORKFLOW_ENV, raising=False)
    assert find_workflow_dir(cwd=tmp_path) == REPO


def test_the_variable_comes_first_and_must_name_a_workflow(monkeypatch, tmp_path):
    other = fake_workflow(tmp_path / "other_clone")
    monkeypatch.setenv(WORKFLOW_ENV, str(other))
    assert find_workflow_dir(cwd=REPO) == other.resolve()
    monkeypatch.setenv(WORKFLOW_ENV, str(tmp_path))
    with pytest.raises(WorkflowNotFoundError, match=f"{WORKFLOW_ENV}=.* is not a thimble workflow directory"):
        find_workflow_dir()


def test_an_installed_copy_finds_the_clone_from_a_subdirectory(installed_copy, tmp_path):
    clone = fake_workflow(tmp_path / "clone")
    inside = clone / "results" / "thimble_mini"
    inside.mkdir(parents=True)
    assert find_workflow_dir(cwd=inside) == clone.resolve()
    assert find_workflow_dir(cwd=clone) == clone.resolve()


def test_an_installed_copy_outside_a_clone_says_what_to_do(installed_copy, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(WorkflowNotFoundError) as raised:
        find_workflow_dir(cwd=elsewhere)
    message = str(raised.value)
    assert str(elsewhere) in message and "run inside a clone" in message and WORKFLOW_ENV in message


def test_a_copied_package_needs_the_workflow_and_says_so(tmp_path):
    """The package copied out of the checkout, as pip installs it: `thimble validate` reads the schema
    from the workflow's workflow/schemas/ and `thimble plan` runs its Snakefile, so outside a clone both
    stop with the one-line error; THIMBLE_WORKFLOW points the copy at the clone."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "src" / "thimble", site / "thimble", ignore=shutil.ignore_patterns("__pycache__"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(REPO / "config.yaml", elsewhere / "config.yaml")
    env = {key: value for key, value in os.environ.items() if key != WORKFLOW_ENV}
    env["PYTHONPATH"] = str(site)

    def thimble(*args):
        return subprocess.run([sys.executable, "-m", "thimble", *args], cwd=elsewhere, env=env, capture_output=True,
                              text=True)

    where = subprocess.run([sys.executable, "-c", "import thimble; print(thimble.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True)
    assert where.stdout.strip() == str(site / "thimble" / "__init__.py"), "the copy, not the checkout, is imported"
    refused = thimble("validate", "config.yaml")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "run inside a clone of the workflow repository or set THIMBLE_WORKFLOW" in refused.stderr
    env[WORKFLOW_ENV] = str(REPO)
    validated = thimble("validate", "config.yaml")
    assert validated.returncode == 0 and "config.yaml: valid" in validated.stdout, validated.stderr
    del env[WORKFLOW_ENV]
    planned = thimble("plan", "results/thimble_mini/freeze.csv")
    assert planned.returncode == 1, planned.stdout + planned.stderr
    assert "Traceback" not in planned.stderr, planned.stderr
    last = planned.stderr.strip().splitlines()[-1]  # the CLI's one-line error (the log line above repeats it)
    assert last.startswith("thimble plan: error: no thimble workflow"), planned.stderr
    assert "run inside a clone of the workflow repository or set THIMBLE_WORKFLOW" in last
