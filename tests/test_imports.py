"""The package's import graph: layers import only downward, and no module imports itself through others.

Every `import` / `from ... import` in mathgrpo/ counts, including those inside functions (the lazy imports
that keep the CLI light), so a lazy import cannot hide an upward dependency or a cycle.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mathgrpo"

# The layers, bottom first (README "Layout"). A module may import from a lower layer, or from its own
# subpackage; never from a higher or equal layer elsewhere, and never from benchmarks/, tests/ or scripts/.
LAYERS = {
    "mathgrpo": 0, "mathgrpo.utils": 0,
    "mathgrpo.config": 1,
    "mathgrpo.model": 2, "mathgrpo.data": 2, "mathgrpo.reward": 2, "mathgrpo.tracking": 2,
    "mathgrpo.weights": 3, "mathgrpo.parallel": 3,
    "mathgrpo.rl": 4, "mathgrpo.distill": 5, "mathgrpo.rollout": 4, "mathgrpo.testing": 4,
    "mathgrpo.eval": 5,
    "mathgrpo.train": 6,
    "mathgrpo.tools": 7,
    "mathgrpo.__main__": 8,
}
OUTSIDE = ("benchmarks", "tests", "scripts")


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the modules it imports (an imported name that is a submodule counts as that module)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{name}: relative import (line {node.lineno}); the package uses absolute ones")
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t.split(".")[0] in ("mathgrpo", *OUTSIDE)}
    return graph


def layer_of(module: str) -> tuple[str, int]:
    """(layer name, rank) of a module: its longest prefix in LAYERS."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return prefix, LAYERS[prefix]
    raise KeyError(module)


def test_every_subpackage_has_a_layer():
    missing = sorted({m for m in import_graph() if m.count(".") >= 1 and ".".join(m.split(".")[:2]) not in LAYERS})
    assert not missing, f"modules outside every layer (add their subpackage to LAYERS and the README): {missing}"


def test_imports_point_down():
    upward = []
    for module, targets in import_graph().items():
        layer, rank = layer_of(module)
        for target in targets:
            if target.split(".")[0] in OUTSIDE:
                upward.append(f"{module} imports {target} (outside the library)")
                continue
            target_layer, target_rank = layer_of(target)
            if target_layer == layer or target_layer == "mathgrpo":
                continue
            if target_rank >= rank:
                upward.append(f"{module} (layer {layer}, {rank}) imports {target} "
                              f"(layer {target_layer}, {target_rank})")
    assert not upward, "imports that do not point down:\n" + "\n".join(sorted(upward))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"a"}}, ["a", "a"]),
])
def test_cycle_finder(graph, expected):
    """The checker itself finds a cycle when there is one."""
    assert find_cycle(graph) == expected
