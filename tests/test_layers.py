"""Imports point down the layers: no module imports one of a layer above its own.

The order is the README's architecture section, top to bottom. Packages on the
same row may not import each other either (they are independent), and inside
the engine the API-process side (`engine/client`) never imports the core
process's modules (`engine/core`): they meet only in `engine/messages.py`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "inferd"

# top to bottom; a layer may import only layers strictly below it (and itself)
LAYERS: list[set[str]] = [
    {"cli"},
    {"api", "bench"},
    {"batch"},
    {"tenancy"},
    {"gateway"},
    {"providers"},
    {"wire", "store"},
    {"engine", "classic"},
    {"models"},
    {"layers"},
]
LEVEL = {name: i for i, row in enumerate(LAYERS) for name in row}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `inferd.*` import in the file, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "inferd" else [f"inferd.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names if n.startswith("inferd.")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("inferd.")]
    return found


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if len(p.relative_to(PACKAGE).parts) > 1)


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(LEVEL), "add new packages to LAYERS (and the README's architecture section)"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    own = path.relative_to(PACKAGE).parts[0]
    upward = []
    for line, module in _imports(path):
        target = module.split(".")[1]
        if target in LEVEL and target != own and LEVEL[target] <= LEVEL[own]:
            upward.append(f"line {line}: {module} ({target} is not below {own})")
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("path", sorted((PACKAGE / "engine" / "client").glob("*.py")), ids=lambda p: p.name)
def test_the_api_side_of_the_engine_does_not_import_the_core_side(path):
    core = [m for _, m in _imports(path) if m.startswith("inferd.engine.core.") and m != "inferd.engine.core.process"]
    # the client spawns the core process by its entry point, and nothing else of the core
    assert not core, core
