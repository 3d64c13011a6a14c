"""The package's imports follow the layer order that docs/architecture.md states (its "Layers" table),
function-local imports included, and form no cycle: the picture in the docs stays true."""

import ast
import re
from pathlib import Path

from conftest import REPO

SOURCE = REPO / "src"
PACKAGE = "thimble"


def package_modules(source: Path = SOURCE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its ``__init__``)."""
    return {".".join(path.relative_to(source).with_suffix("").parts).removesuffix(".__init__"): path
            for path in sorted((source / PACKAGE).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module ``name`` imports, anywhere in it (functions included).

    ``from a import b`` imports the module ``a.b`` when there is one, else a name of ``a``. Importing a
    module also runs its parent packages' ``__init__``; that is Python's, not an edge of the graph."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package ``level - 1`` above this one
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module
            for alias in node.names:
                found.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module)
    return {imported for imported in found if imported in modules and imported != name}


def import_graph(source: Path = SOURCE) -> dict[str, set[str]]:
    modules = package_modules(source)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> list[str] | None:
        if state.get(name) == "open":
            return [*trail[trail.index(name):], name]
        if state.get(name) == "done":
            return None
        state[name] = "open"
        for imported in sorted(graph.get(name, ())):
            cycle = visit(imported, [*trail, name])
            if cycle:
                return cycle
        state[name] = "done"
        return None

    for name in sorted(graph):
        cycle = visit(name, [])
        if cycle:
            return cycle
    return None


def documented_layers(text: str) -> dict[str, int]:
    """The "Layers" table of docs/architecture.md: each listed module (dotted, under the package) and its
    layer number."""
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    layers = {}
    for row in re.findall(r"^\| (\d+) \|.*\|(.*)\|$", section, flags=re.MULTILINE):
        number, listed = int(row[0]), re.findall(r"`([\w.]+)`", row[1])
        for module in listed:
            dotted = module if module == PACKAGE else f"{PACKAGE}.{module}"
            assert dotted not in layers, f"{module} is listed in two layers"
            layers[dotted] = number
    return layers


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    """The layer of ``module``: its own row, else its package's (``plan`` places ``plan.costs``)."""
    while module:
        if module in layers:
            return layers[module]
        module = module.rpartition(".")[0]
    return None


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    return [f"{name} (layer {layer_of(name, layers)}) imports {imported} (layer {layer_of(imported, layers)})"
            for name, targets in sorted(graph.items()) for imported in sorted(targets)
            if layer_of(imported, layers) > layer_of(name, layers)]


def test_no_import_cycle_in_the_package():
    assert find_cycle(import_graph()) is None, f"import cycle: {' -> '.join(find_cycle(import_graph()))}"


def test_the_cycle_finder_finds_a_cycle_and_the_layer_check_an_import_up():
    # the check can fail: a synthetic graph with a circle through three modules, and one import up
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert upward_imports({"thimble.errors": {"thimble.plan.costs"}}, {"thimble.errors": 1, "thimble.plan": 4}) \
        == ["thimble.errors (layer 1) imports thimble.plan.costs (layer 4)"]


def test_the_import_finder_sees_function_local_and_relative_imports(tmp_path):
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from thimble.sub import high\n")
    (package / "sub" / "__init__.py").write_text("from .high import NAME\n")
    (package / "sub" / "high.py").write_text("NAME = 1\nimport thimble.low\n")
    graph = import_graph(tmp_path)
    assert graph["thimble.low"] == {"thimble.sub.high"}
    assert graph["thimble.sub"] == {"thimble.sub.high"}
    assert graph["thimble.sub.high"] == {"thimble.low"}
    assert find_cycle(graph) == ["thimble.low", "thimble.sub.high", "thimble.low"]


def test_imports_follow_the_documented_layers():
    layers = documented_layers((REPO / "docs" / "architecture.md").read_text())
    graph = import_graph()
    unplaced = sorted(name for name in graph if layer_of(name, layers) is None)
    assert not unplaced, f"modules not in docs/architecture.md's Layers table: {unplaced}"
    stale = sorted(set(layers) - set(graph))
    assert not stale, f"docs/architecture.md's Layers table lists modules that do not exist: {stale}"
    assert upward_imports(graph, layers) == []
