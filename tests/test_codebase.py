"""The code base's own rules: layering, types and lint (pyproject.toml configures mypy and ruff)."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BOTTOM = ("errors", "values")  # imported by every layer, so they import no other syncd module


def syncd_imports(module: str) -> set[str]:
    """The syncd modules `module` imports, late imports in functions included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse((ROOT / "syncd" / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "syncd":
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("syncd."):
            names.add(str(node.module).removeprefix("syncd."))
        elif isinstance(node, ast.Import):
            names.update(a.name.removeprefix("syncd.") for a in node.names if a.name.startswith("syncd."))
    return names


def test_value_types_and_errors_are_the_bottom_layer():
    assert syncd_imports("errors") == set()
    assert syncd_imports("values") <= {"errors"}
    # What source, mapping, delivery and the offload child pass around is not the store's.
    for module in ("source", "mapping", "delivery", "offload", "metrics"):
        assert "state" not in syncd_imports(module), f"syncd.{module} imports syncd.state"


def test_config_becomes_connections_only_in_runtime():
    """The state store, sources and API client are built by syncd/runtime.py alone (the
    offload child, handed its source by the parent, is the exception it documents)."""
    builders = {"StateStore", "Source", "ApiClient", "TokenSource"}
    allowed = {"runtime", "offload"}
    found = []
    for path in sorted((ROOT / "syncd").glob("*.py")):
        if path.stem in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in builders:
                found.append(f"{path.name}:{node.lineno} {node.func.id}(...)")
    assert not found, "built outside runtime.py: " + ", ".join(found)


def run_tool(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True)


def test_mypy_strict_passes_on_syncd():
    result = run_tool("mypy")  # files and strictness from pyproject.toml
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_finds_nothing():
    result = run_tool("ruff", "check", "--no-cache", "--output-format", "concise")
    assert result.returncode == 0, result.stdout + result.stderr
