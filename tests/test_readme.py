from conftest import REPO


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (REPO / "README.md").read_text()
    command = "pip install -e '.[test]' && python -m pytest -q"
    assert f"\n   {command}\n" in readme
    ci_lines = (REPO / ".ci/run").read_text().splitlines()
    assert command in ci_lines
