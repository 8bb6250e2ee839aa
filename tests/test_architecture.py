"""The package's shape: its import graph has no circle, so each layer stands on the ones below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"cpl_masks": ROOT / "cpl_masks", "cpl_masks.cli": ROOT / "cli", "cpl_masks.registry": ROOT / "registry"}


def module_files() -> dict[str, Path]:
    """Every module of the installed package by dotted name (``cli/`` and ``registry/`` install under it)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules ``path`` imports anywhere in it (top level, functions, TYPE_CHECKING blocks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            # ``from package import module`` depends on the module; ``from package import name`` on the package
            candidates = [name for name in submodules if name in modules] or [node.module]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(name for name in candidates if name in modules)
    return found


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target] if target in path else [node, target]
            if target not in state:
                found = visit(target, [*path, target])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def package_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def test_the_import_graph_has_no_circle():
    graph = package_graph()
    assert len(graph) > 30 and "cpl_masks.masks.format" in graph
    assert cycle_in(graph) is None, " -> ".join(cycle_in(graph) or [])


def test_the_cycle_finder_finds_a_circle():
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": set()}) is None


def test_every_subpackage_is_installed():
    """A folder of modules missing from pyproject's package list works in an editable install and breaks
    a wheel (``cpl_masks.methods`` once did: ``import cpl_masks`` failed on a machine with a plain install)."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    folders = {
        ".".join((package, *init.parent.relative_to(folder).parts))
        for package, folder in PACKAGES.items()
        for init in folder.rglob("__init__.py")
    }
    assert "cpl_masks.methods" in folders
    assert set(setuptools["packages"]) == folders
    assert {name: ROOT / path for name, path in setuptools["package-dir"].items()} == PACKAGES


TOP_LEVEL = {"__init__", "errors", "models", "hub"}  # the package's own modules beside its subpackages
MAX_LINES = 450  # a module read in one sitting


def test_the_library_is_grouped_by_concern():
    """At the top of ``cpl_masks/`` only the package, its error type and two stages stand; the rest lives
    in a subpackage named for what it does."""
    top = {path.stem for path in (ROOT / "cpl_masks").glob("*.py")}
    assert top == TOP_LEVEL
    assert {"data", "scoring", "masks", "profiling", "methods", "training", "evaluation", "sweep"} <= {
        path.parent.name for path in (ROOT / "cpl_masks").glob("*/__init__.py")
    }


def test_every_module_is_short_enough_to_read_in_one_sitting():
    long = {
        name: lines
        for name, path in module_files().items()
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_public_names_are_importable_from_the_package():
    import cpl_masks

    missing = [name for name in cpl_masks.__all__ if not hasattr(cpl_masks, name)]
    assert not missing and callable(cpl_masks.profile) and cpl_masks.Mask.from_ref is not None
