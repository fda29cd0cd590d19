"""The library's modules import each other without cycles (lazy, function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGES = ("acon", "models")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the suite's modules it imports anywhere in its body (package __init__ edges left out)."""
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for t in targets:
                if t in files and t != name and files[t].name != "__init__.py":
                    edges.add(t)
        graph[name] = edges
    return graph


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """A path start -> ... -> goal, if any."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == goal:
                return path + [nxt]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


@pytest.mark.parametrize(
    "module", ["acon.validate", "acon.trainer", "acon.data.build", "models.registry", "models.features"]
)
def test_no_import_cycle_through(module):
    cycle = reaches(import_graph(), module, module)
    assert cycle is None, " -> ".join(cycle)


def test_no_module_lies_on_an_import_cycle():
    """Every pair of modules imports in one direction only (the fused-op self-check and the decode check
    included), so any module can be imported first."""
    graph = import_graph()
    cycles = [" -> ".join(c) for m in sorted(graph) if (c := reaches(graph, m, m))]
    assert not cycles, "\n".join(cycles)


def test_package_names_load_on_first_use():
    """``acon``'s public names (loaded on first use, so that the command lines' checks run without torch)
    are exactly ``__all__``, and each resolves to the object its module defines."""
    import importlib

    import acon

    assert sorted(acon.__all__) == sorted(acon._SOURCES)
    for name in acon.__all__:
        assert getattr(acon, name) is getattr(importlib.import_module(acon._SOURCES[name]), name)
    with pytest.raises(AttributeError, match="no attribute 'AconD'"):
        acon.AconD  # noqa: B018
