"""Building the DAG loads neither torch nor h5py: `snakemake -n` stays quick and works on a submit host
without them. And no import cycle in the package."""

import ast
import os
import subprocess
import sys

import numpy as np
import yaml
from conftest import REPO, offline_config, run_snakemake

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


#: a sitecustomize that appends to $THIMBLE_IMPORT_PROBE each heavy module any Python process starts to import
#: (whether or not the import then succeeds)
IMPORT_PROBE = f"""
import os, sys


class HeavyImports:
    def find_spec(self, name, path=None, target=None):
        if name in {HEAVY!r}:
            with open(os.environ["THIMBLE_IMPORT_PROBE"], "a") as log:
                log.write(f"{{name}} in {{sys.argv}}\\n")
        return None


sys.meta_path.insert(0, HeavyImports())
"""


def probed(tmp_path, monkeypatch):
    """Every Python process started from here on records its heavy imports; returns the record's path."""
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe/sitecustomize.py").write_text(IMPORT_PROBE)
    record = tmp_path / "heavy_imports.txt"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path / "probe"),
                                                                     os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("THIMBLE_IMPORT_PROBE", str(record))
    subprocess.run([sys.executable, "-c", "import h5py"], check=True)
    assert "h5py in ['-c']" in record.read_text()  # the probe can fail
    record.unlink()
    return record


def test_planning_a_rerun_imports_neither_torch_nor_h5py_in_any_process(workdir, tmp_path, monkeypatch):
    """A dry run that replaces a stream and a recording.h5 (where a check of the stream would decode it) and
    trains on cuda (where a check of the device would ask torch), and the lint: no process they start, the
    checks' included, imports torch or h5py."""
    config = offline_config()
    config["experiments"]["thimble_mini"]["training"]["device"] = "cuda"
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    (workdir / "results/data/shakespeare_mini").mkdir(parents=True)
    np.save(workdir / "results/data/shakespeare_mini/tokens.npy", np.zeros(100_000, np.int32))
    (workdir / "results/thimble_mini/stream").mkdir(parents=True)
    (workdir / "results/thimble_mini/stream/stream.h5").write_bytes(b"not read")
    (workdir / "results/thimble_mini/recording.h5").write_bytes(b"not read")
    record = probed(tmp_path, monkeypatch)
    result = run_snakemake(workdir, "-n", "results/thimble_mini/figures/loss.png", "--forcerun", "train")
    assert "rule rechunk:" in result.stdout and "gpu=1" in result.stdout, result.stdout
    assert not record.exists(), record.read_text()
    result = run_snakemake(workdir, "--lint")
    assert "Congratulations" in result.stdout + result.stderr
    assert not record.exists(), record.read_text()


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


def test_the_recordings_public_readers_import_from_thimble_record_on_first_use():
    from thimble.record import RecordedTensor, open_stream, read_steps, read_steps_torch, verify_stream
    from thimble.record import reader, stream_reader

    assert (open_stream, verify_stream) == (stream_reader.open_stream, stream_reader.verify_stream)
    assert (read_steps, read_steps_torch, RecordedTensor) == (reader.read_steps, reader.read_steps_torch,
                                                              reader.RecordedTensor)
    # the codec alone loads no reader; an unknown name is an AttributeError, as for any module
    probe = ("import sys, thimble.record.codec; "
             "print(sorted(m for m in ('thimble.record.reader', 'thimble.record.stream_reader') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"
    import thimble.record

    try:
        thimble.record.no_such_reader
    except AttributeError as error:
        assert "no_such_reader" in str(error)
    else:
        raise AssertionError("thimble.record served a name it does not define")
