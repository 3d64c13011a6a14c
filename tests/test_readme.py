import re
import tomllib

from packaging.requirements import Requirement

from conftest import REPO


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (REPO / "README.md").read_text()
    command = "pip install -e '.[test]' && python -m pytest -q"
    assert f"\n   {command}\n" in readme
    ci_lines = (REPO / ".ci/run").read_text().splitlines()
    assert ci_lines[-1] == command
    # before it, a non-editable install (pip install .) is checked in an environment of its own
    assert any(line.startswith("bash .ci/check_installed ") for line in ci_lines[:-1])
    assert "pip\" install --quiet .\n" in (REPO / ".ci/check_installed").read_text()


def test_constraints_pin_every_dependency_within_pyproject_ranges():
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = [Requirement(text) for text in
                project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]]
    assert "thimble" not in pins, "the project itself is not a constraint"
    for requirement in required:
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"constraints.txt does not pin {name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])
    assert "+" not in pins["torch"], "a build label would exclude the CPU or the CUDA build"
