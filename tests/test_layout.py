"""The package's imports point one way (data <- features <- graph/models <- training <- tracking <- CLIs).

Imports are read from the source with ``ast``: module level, inside functions and under
``TYPE_CHECKING`` alike, so a cycle hidden in a function body fails here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dprec"

# Layer of each part of the package; a module may import only from its own layer or lower ones.
LAYERS = {
    "dprec": 0,  # the package's __init__
    "dprec.io": 0,
    "dprec.config": 0,
    "dprec.kernels": 0,
    "dprec.data": 1,
    "dprec.features": 2,
    "dprec.graph": 3,
    "dprec.models": 4,
    "dprec.training": 5,
    "dprec.tracking": 6,
}
CLI_LAYER = 7  # dprec/<stage>.py and dprec/__main__.py


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str) -> str | None:
    """The dprec module that ``import name`` loads (a package's __init__ for a package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """The dprec modules ``module`` imports anywhere in its source."""
    path = MODULES[module]
    return imports_in(path.read_text(encoding="utf-8"), module, is_package=path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool = False) -> set[str]:
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from dprec.graph import knn`` imports the submodule dprec.graph.knn
            names = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source for alias in node.names
            ]
        else:
            continue
        for name in names:
            if name == "dprec" or name.startswith("dprec."):
                target = resolve(name)
                if target and target != module:
                    found.add(target)
    return found


def layer_of(module: str) -> int:
    best = None
    for prefix, layer in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    if best is None or best[0] == "dprec" and module != "dprec":
        return CLI_LAYER
    return best[1]


GRAPH = {m: imports_of(m) for m in MODULES}


def test_import_parser_sees_every_kind_of_import():
    """The checker itself: imports in functions, under TYPE_CHECKING, relative and submodule imports count."""
    source = """
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from dprec.tracking.registry import Registration
def f():
    from dprec.training import loop
    import dprec.io
from .knn import build_item_knn_graph
"""
    found = imports_in(source, "dprec.graph.api")
    assert found == {"dprec.tracking.registry", "dprec.training.loop", "dprec.io", "dprec.graph.knn"}
    # every CLI imports something of the library
    for stage in ("prepare", "extract", "train", "evaluate", "register", "recommend", "demo"):
        assert GRAPH[f"dprec.{stage}"], f"dprec.{stage} imports nothing of dprec"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_detects_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    upward = sorted(dep for dep in GRAPH[module] if layer_of(dep) > layer_of(module))
    assert not upward, f"{module} (layer {layer_of(module)}) imports higher layers: {upward}"


def test_serving_code_imports_nothing_of_dprec():
    """The registered pyfunc is logged from code and must load without the training code."""
    assert GRAPH["dprec.tracking.serving"] == set()
