"""The house rules of ARCHITECTURE.md, checked on the code's own imports (every import, also those inside
function bodies and under TYPE_CHECKING):

- ``tasks/`` is the engine: it imports neither Prefect nor ``flows/``;
- layers import downward only: the core (``tasks/*.py``) < inputs < images < endpoint < outputs < run
  < flows; a module imports its own layer and the ones below, never one above;
- no import circles, between modules or between layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["core", "inputs", "images", "endpoint", "outputs", "run", "flows"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "flows":
        return "flows"
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS):
        return parts[1]
    return "core"


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for top in ("tasks", "flows") for p in sorted((ROOT / top).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports (``from tasks.x import y`` counts as tasks.x, or as tasks.x.y
    when that is a module), and every other top-level package as itself (``prefect``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def test_the_layers_are_the_folders() -> None:
    layers = {layer_of(m) for m in project_modules()}
    assert layers == set(LAYERS)


def test_tasks_imports_neither_prefect_nor_flows(graph: dict[str, set[str]]) -> None:
    bad = {
        module: sorted(i for i in imports if i.split(".")[0] in ("prefect", "flows"))
        for module, imports in graph.items()
        if module.startswith("tasks")
    }
    assert {m: i for m, i in bad.items() if i} == {}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of ``graph`` (module -> what it imports) from a layer into a higher one, said."""
    upward = []
    for module, imports in sorted(graph.items()):
        for target in sorted(imports):
            if target in graph and LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(module)):
                upward.append(f"{module} ({layer_of(module)}) -> {target} ({layer_of(target)})")
    return upward


def find_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph`` (module -> what it imports; imports of modules outside it, and of
    itself, ignored), each as the path from a module back to it: ``["a", "b", "a"]``. Depth first; a
    circle is reported where the search finds an edge back onto its current path."""
    edges = {m: {t for t in imports if t in graph and t != m} for m, imports in graph.items()}
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return circles


def test_imports_run_downward_only(graph: dict[str, set[str]]) -> None:
    assert upward_imports(graph) == []


def test_no_import_circles(graph: dict[str, set[str]]) -> None:
    # a package's __init__ is imported with each of its modules: an edge into a package is an edge into
    # its __init__, which is how Python runs it; circles through one are circles all the same
    assert [" -> ".join(circle) for circle in find_circles(graph)] == []


def test_circles_are_found_and_only_circles() -> None:
    """find_circles on hand-made graphs: the check above can fail, and does not fail for nothing."""
    assert find_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "prefect"}}) == [["a", "b", "c", "a"]]
    assert find_circles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}) == [
        ["a", "b", "a"],
        ["c", "d", "c"],
    ]
    assert find_circles({"tasks": {"tasks.x"}, "tasks.x": {"tasks"}}) == [["tasks", "tasks.x", "tasks"]]
    # acyclic: a diamond (d reached twice, never on the path twice), a self-import, outside modules
    assert find_circles({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) == []
    assert find_circles({"a": {"a", "b", "prefect"}, "b": {"os"}}) == []
    assert find_circles({}) == []


def test_the_check_sees_an_upward_import_and_a_circle(tmp_path: Path) -> None:
    """The rules above can fail: a core module importing a stage is upward, two modules importing each
    other are a circle."""
    assert LAYERS.index(layer_of("tasks.images.prepare")) > LAYERS.index(layer_of("tasks.config"))
    assert layer_of("tasks.run.plan") == "run" and layer_of("flows.cli.run") == "flows"
    graph = {"tasks.config": {"tasks.images.prepare"}, "tasks.images.prepare": {"tasks.config"}}
    assert upward_imports(graph) == ["tasks.config (core) -> tasks.images.prepare (images)"]
    assert find_circles(graph) == [["tasks.config", "tasks.images.prepare", "tasks.config"]]
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from tasks.config import RunConfig\nimport prefect\n")
    b.write_text("from tasks import config\n")
    modules = {"tasks.config": a}
    assert imports_of(a, modules) == {"tasks.config", "prefect"}
    assert imports_of(b, modules) == {"tasks.config"}
