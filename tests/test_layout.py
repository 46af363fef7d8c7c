"""The package's layout stays readable: no import cycle (function-level imports included) and no
oversized module.

The import graph is read from the source with ``ast`` (nothing is imported), one node per module
(a package is its ``__init__.py``). An edge ``a -> b`` is an ``import`` in ``a``, at any depth, that
names ``b`` itself or a name that ``b`` defines: ``from .x import y`` is an edge to ``x.y`` when that
is a module, else to ``x``. Implicit imports of parent packages are not edges (Python initializes
them first in any case, and every module would otherwise sit on a cycle with ``fastmeta/__init__``).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fastmeta"
MAX_LINES = 450
# Compiled modules (``from . import _C``): leaves of the graph, whether built yet or not.
NATIVE = {"fastmeta._C"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _is_package(name: str, mods: dict[str, Path]) -> bool:
    return mods[name].name == "__init__.py"


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if _is_package(name, mods) else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                for alias in node.names:
                    sub = f"{src}.{alias.name}"
                    targets.append(sub if sub in mods or sub in NATIVE else src)
            for t in targets:
                if t in mods and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_import_graph_is_acyclic():
    graph = import_graph()
    assert len(graph) > 40 and graph["fastmeta.learner"], "the parser found no modules or no imports"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_function_level_cycles(tmp_path, monkeypatch):
    # The checker itself must see an import hidden inside a function (the kind that hid the
    # learner -> distributed -> train -> learner circle).
    pkg = tmp_path / "fastmeta"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "c.py").write_text("def g():\n    from .a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    cycle = find_cycle(import_graph())
    assert cycle is not None and set(cycle) == {"fastmeta.a", "fastmeta.b", "fastmeta.c"}


def test_the_learner_knows_nothing_of_training():
    graph = import_graph()
    reach, todo = set(), ["fastmeta.learner"]
    while todo:
        for n in graph[todo.pop()] - reach:
            reach.add(n)
            todo.append(n)
    assert not {m for m in reach if m.startswith(("fastmeta.training", "fastmeta.cli"))}, sorted(reach)


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_size(name):
    lines = _modules()[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{name} has {lines} lines (> {MAX_LINES}): split it by concept"
