"""Building the DAG loads neither torch nor h5py: `snakemake -n` stays quick and works on a submit host
without them. And no import cycle in the package."""

import ast
import subprocess
import sys

from conftest import REPO

HEAVY = ("torch", "h5py")


def loaded_after(code: str) -> list[str]:
    check = f"import sys\n{code}\nprint([m for m in {HEAVY!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    return eval(result.stdout.strip().splitlines()[-1])


def test_config_and_plan_import_neither_torch_nor_h5py():
    assert loaded_after("import thimble.config") == []
    assert loaded_after("import thimble.plan, thimble.sizes, thimble.outputs, thimble.cli") == []
    assert loaded_after("import thimble.training.train") == ["torch", "h5py"]  # the check can fail


def test_the_xarray_engine_guesses_without_h5py_or_torch(tmp_path):
    # xarray asks every installed engine about every file it opens without one
    (tmp_path / "recording.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(8))
    assert loaded_after("from thimble.notebook.xarray_backend import ThimbleBackendEntrypoint\n"
                        f"assert ThimbleBackendEntrypoint().guess_can_open({str(tmp_path / 'recording.h5')!r})") == []


def test_dry_run_imports_neither_torch_nor_h5py(workdir):
    # snakemake in this interpreter, reporting at exit what it loaded (its sys.exit runs the atexit hook)
    code = ("import atexit, sys\n"
            f"atexit.register(lambda: print('LOADED', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr))\n"
            "from snakemake.cli import main\n"
            # thimble_mini's dataset is local here: the dry run checks its vocab_size on the texts
            f"sys.argv = ['snakemake', 'results/thimble_7/freeze.csv', 'results/thimble_small/figures/loss.png',"
            f" 'results/thimble_mini/figures/loss.png', '-n',"
            f" '--snakefile', {str(REPO / 'Snakefile')!r}, '--directory', {str(workdir)!r}]\n"
            "main()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "mem_mb=" in output and "runtime=" in output, "the dry run evaluated the jobs' resources"
    assert "LOADED []" in output, output
    assert list((workdir / ".snakemake" / "thimble").glob("vocab-*.json")), "the vocab_size check ran"


def imports_of(path) -> set[str]:
    """The thimble modules a module imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("thimble"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("thimble"))
    return found


def test_no_import_cycle_in_the_package():
    source = REPO / "src"
    modules = {".".join(path.relative_to(source).with_suffix("").parts).removesuffix(".__init__"): path
               for path in source.rglob("*.py")}
    graph = {name: {imported for imported in imports_of(path) if imported in modules and imported != name}
             for name, path in modules.items()}
    # a package's __init__ re-exporting its own modules is not a cycle
    graph = {name: {imported for imported in targets if not imported.startswith(name + ".")
                    and not name.startswith(imported + ".")} for name, targets in graph.items()}
    state: dict[str, str] = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", f"import cycle: {' -> '.join([*trail, name])}"
        state[name] = "open"
        for imported in sorted(graph[name]):
            visit(imported, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])
