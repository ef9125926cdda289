"""The dependency map of ``src/sonocl`` (docs/internals.md, "Layers"): no import circle, no arrow from a lower layer up.

Every import counts, at module level or inside a function, typing-only ones too: an import moved into a function to
dodge a circle is still an arrow of the map."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = (
    (
        "sonocl._version",
        "sonocl.errors",
        "sonocl.files",
        "sonocl.options",
        "sonocl.progress",
        "sonocl.runtime",
        "sonocl.workers",
    ),
    ("sonocl.data", "sonocl.outputs"),
    ("sonocl.pairs", "sonocl.augment", "sonocl.backbones", "sonocl.models", "sonocl.losses", "sonocl.provenance"),
    ("sonocl.methods",),
    ("sonocl.train",),
    ("sonocl.evaluate",),
    ("sonocl.report", "sonocl.export", "sonocl.model_card"),
    ("sonocl.cli", "sonocl.demo", "sonocl.__main__", "sonocl"),
)
"""Lowest first; a module may import its own layer's and lower layers' modules. ``sonocl`` itself (the package's
``__init__``: the public API, ``sonocl.load_encoder``) sits on top."""


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((SRC / "sonocl").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The sonocl modules that module ``name`` imports (``from package import module`` names the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
    return {module for module in found if module in modules and module != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> int:
    """The layer of the longest prefix of ``module`` that `LAYERS` names."""
    matches = [
        (len(prefix), index)
        for index, prefixes in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    assert matches, f"{module} is in no layer: add it to LAYERS and to docs/internals.md"
    return max(matches)[1]


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return circles


def test_no_import_circle() -> None:
    assert _circles(_graph()) == []


def test_no_import_from_a_higher_layer() -> None:
    graph = _graph()
    upward = sorted(f"{a} → {b}" for a, targets in graph.items() for b in targets if _layer(b) > _layer(a))
    assert upward == []


def test_the_checks_see_a_circle_and_an_upward_arrow() -> None:
    """The map's own checks on a made-up graph: a circle through two modules and a method importing the trainer."""
    graph = {"sonocl.pairs": {"sonocl.methods.base"}, "sonocl.methods.base": {"sonocl.pairs", "sonocl.train.config"}}
    graph["sonocl.train.config"] = set()
    assert _circles(graph) == [["sonocl.methods.base", "sonocl.pairs"]]
    assert _layer("sonocl.methods.base") < _layer("sonocl.train.config")
    assert _layer("sonocl") == len(LAYERS) - 1 and _layer("sonocl.data.store") == 1
