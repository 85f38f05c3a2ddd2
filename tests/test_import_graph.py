"""The package's dependency graph, read from the source with ``ast`` (no module is imported).

(a) No import cycle between fedflat modules. Module-level and function-level imports both
count (a lazy import inside a function still ties the two modules together); imports under
``if TYPE_CHECKING:`` do not (they never run). An import of ``fedflat.a.b`` is an edge to the
module ``fedflat.a.b`` only, not to the package ``fedflat.a`` that Python initialises first:
packages re-export their submodules, and counting that edge would report every such
package as a cycle.
(b) The libraries (privacy, client, server, comm, data, models, scenario, metrics, attacks)
import nothing from the runtime or the Flower front end, nor ray or flwr (DESIGN.md: client
and server logic never import Ray or Flower; dependencies point one way).
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fedflat"
LIBRARIES = ("privacy", "client", "server", "comm", "data", "models", "scenario", "metrics",
             "attacks")
FORBIDDEN = ("fedflat.runtime", "fedflat.flower", "ray", "flwr")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str) -> list[tuple[str, int]]:
    """(imported module, line) of every import that runs: module level, in functions, in
    classes; not under ``if TYPE_CHECKING:``."""
    is_pkg = MODULES[module].name == "__init__.py"
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".")
                pkg = pkg if is_pkg else pkg[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from pkg import submodule` imports the submodule; `from m import name`, m.
                out.append((sub if sub in MODULES else base, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _graph() -> dict[str, dict[str, int]]:
    """module -> {fedflat module it imports: first line of that import}."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in MODULES.items():
        edges: dict[str, int] = {}
        for target, line in _imports(ast.parse(path.read_text(), str(path)), name):
            if target in MODULES and target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one
    cycle through it, so that the message shows a path to break."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_cycle_in(graph, set(c), c[0]) for c in comps]


def _cycle_in(graph: dict[str, dict[str, int]], comp: set[str], start: str) -> list[str]:
    """A shortest cycle through ``start`` inside one strongly connected component (BFS)."""
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in comp:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover - comp is an SCC


def _describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return " -> ".join(
        f"{a} (line {graph[a][b]})" for a, b in itertools.pairwise(cycle)
    ) + f" -> {cycle[-1]}"


def test_the_graph_sees_known_edges():
    # Independent facts read off the source: the driver imports the loader at module
    # level, and the core commands (fedflat.commands) import the runtime inside a function.
    graph = _graph()
    assert "fedflat.scenario.loader" in graph["fedflat.runtime.run"]
    assert "fedflat.runtime.run" in graph["fedflat.commands"]
    assert len(MODULES) > 50


def test_cycle_finder_reports_a_planted_cycle():
    graph = {"a": {"b": 3}, "b": {"c": 5}, "c": {"a": 7}, "d": {"a": 1}}
    (cycle,) = _cycles(graph)
    assert cycle == ["a", "b", "c", "a"]
    assert _describe(graph, cycle) == "a (line 3) -> b (line 5) -> c (line 7) -> a"


def test_no_import_cycle_between_fedflat_modules():
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(graph, c) for c in cycles)


def test_libraries_import_no_runtime_flower_ray_or_flwr():
    bad = []
    for name, path in MODULES.items():
        if name.split(".")[1:2] and name.split(".")[1] in LIBRARIES:
            for target, line in _imports(ast.parse(path.read_text(), str(path)), name):
                if any(target == f or target.startswith(f + ".") for f in FORBIDDEN):
                    bad.append(f"{path.relative_to(PKG.parent)}:{line}: imports {target}")
    assert not bad, "\n".join(bad)
