"""The folder layout is the architecture: each layer imports only layers below it, and no
module imports another that imports it back (directly or through others)."""

from __future__ import annotations

import ast
import pathlib

import pytest

import keepax

ROOT = pathlib.Path(keepax.__file__).parent

# Lowest first. A module may import its own layer and any layer listed before it.
LAYERS = [
    ("keepax.errors", "keepax._src.util", "keepax._src"),
    ("keepax._src.io",),
    ("keepax._src.format", "keepax._src.policies", "keepax.policies"),
    ("keepax._src.commit",),
    ("keepax._src.checkpoint",),
    ("keepax._src.async_engine",),
    ("keepax._src.manager",),
    ("keepax._src.tools",),
    ("keepax.cli", "keepax.__main__", "keepax"),
]


def _module_name(path: pathlib.Path) -> str:
    parts = ("keepax", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    best, level = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    return level


def _imports(path: pathlib.Path) -> set[str]:
    """Every keepax module a file imports: at module level, in functions, and for type
    checking only (a cycle through type-only imports is still a knot in the design)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("keepax"):
            # ``from keepax._src import checkpoint`` imports the submodule, not the package.
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULE_NAMES else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("keepax")}
    return found


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
MODULE_NAMES = set(MODULES)
GRAPH = {
    name: {m for m in _imports(path) if m in MODULES and m != name}
    for name, path in MODULES.items()
}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module: str) -> None:
    mine = _layer(module)
    assert mine >= 0, f"{module} is in no layer: add it to LAYERS"
    upward = sorted(m for m in GRAPH[module] if _layer(m) > mine)
    assert not upward, f"{module} (layer {mine}) imports higher layers: {upward}"


def test_no_import_cycles() -> None:
    # Package __init__ modules re-export their children by design; the cycles that matter are
    # between modules, so a package is not counted as importing its own children.
    def edges(name: str) -> set[str]:
        return {m for m in GRAPH[name] if not m.startswith(name + ".")}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for child in sorted(edges(name)):
            if state.get(child) == 1:
                cycle = stack[stack.index(child):] + [child]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if child not in state:
                visit(child)
        stack.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
