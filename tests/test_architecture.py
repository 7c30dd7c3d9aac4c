"""The package's layering, read from the source: which folder may import which.

Every import statement of every module counts, including those inside functions (a lazy
import is still an arrow between layers). The rules are those of docs/architecture.md.
"""

from __future__ import annotations

import ast
import importlib
import pickle
import sys
import warnings
from pathlib import Path

import pytest

from singan_insert._compat import MOVED_MODULES

PACKAGE = Path(__file__).resolve().parents[1] / "singan_insert"
ROOT = "singan_insert"

CORE = {"harmonizer", "insertion"}
BASE = {"checks", "devices", "errors", "io", "_version"}
ABOVE_CORE = {"integrations", "batch", "evaluation", "pipeline", "stages", "cli"}
#: Who may import stages/ (besides stages/ itself): the workflow, and an nnU-Net integration.
STAGES_USERS = ("singan_insert.pipeline", "singan_insert.integrations.nnunet")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that ``name`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in known else base)
    return {m for m in found if m == ROOT or m.startswith(ROOT + ".")}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def floor(module: str) -> str:
    """The layer of a module: its first component below the package (``"<root>"`` for it)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks a layering rule, as ``"importer -> imported: rule"``."""
    found = []
    for importer, imports in graph.items():
        here = floor(importer)
        for imported in sorted(imports):
            there = floor(imported)
            if there == here:
                continue
            if here in CORE and (there in ABOVE_CORE or there == "<root>"):
                found.append(f"{importer} -> {imported}: the core (harmonizer, insertion) imports no upper layer")
            if here in BASE and there not in BASE:
                found.append(f"{importer} -> {imported}: checks/devices/errors/io import only each other")
            if there == "stages" and not importer.startswith(STAGES_USERS):
                found.append(f"{importer} -> {imported}: only pipeline/ imports stages/")
            if there == "cli" and importer != "singan_insert.__main__":
                found.append(f"{importer} -> {imported}: nothing imports the CLI but __main__")
    return found


def test_the_package_keeps_its_layers():
    graph = import_graph()
    assert len(graph) > 30 and "singan_insert.harmonizer.model" in graph  # the scan found the package
    assert violations(graph) == []


def test_the_import_scan_sees_every_kind_of_import(tmp_path):
    # Absolute, from-package, relative and lazy imports are all arrows.
    source = (
        "from singan_insert import batch\n"
        "from ..stages import cyclegan\n"
        "def lazy():\n"
        "    import singan_insert.cli\n"
        "    from . import model\n"
    )
    path = tmp_path / "harmonizer" / "example.py"
    path.parent.mkdir()
    path.write_text(source)
    known = {"singan_insert.batch", "singan_insert.stages.cyclegan", "singan_insert.harmonizer.model"}
    assert imported_modules("singan_insert.harmonizer.example", path, known) == {
        "singan_insert.batch", "singan_insert.stages.cyclegan", "singan_insert.cli",
        "singan_insert.harmonizer.model",
    }


@pytest.mark.parametrize(
    "importer, imported, rule",
    [
        ("singan_insert.harmonizer.model", "singan_insert.integrations.torchio", "core"),
        ("singan_insert.insertion.insert", "singan_insert.batch", "core"),
        ("singan_insert.harmonizer.model_file", "singan_insert", "core"),
        ("singan_insert.evaluation.demo", "singan_insert.stages.cyclegan", "only pipeline/"),
        ("singan_insert.batch", "singan_insert.cli", "CLI"),
        ("singan_insert.io", "singan_insert.harmonizer.model_file", "checks/devices"),
    ],
)
def test_a_broken_rule_is_reported(importer, imported, rule):
    graph = import_graph()
    graph[importer] = graph[importer] | {imported}
    found = violations(graph)
    assert len(found) == 1 and found[0].startswith(f"{importer} -> {imported}") and rule in found[0]


def test_allowed_arrows_are_not_reported():
    graph = {
        "singan_insert.pipeline.workflow": {"singan_insert.stages.nnunet", "singan_insert.harmonizer.model"},
        "singan_insert.integrations.nnunet": {"singan_insert.stages.nnunet"},
        "singan_insert.stages.cyclegan": {"singan_insert.stages._training", "singan_insert.harmonizer.model_file"},
        "singan_insert.__main__": {"singan_insert.cli"},
        "singan_insert.devices": {"singan_insert.errors"},
    }
    assert violations(graph) == []


@pytest.mark.parametrize("old, new", sorted(MOVED_MODULES.items()))
def test_an_old_module_path_imports_the_new_module_and_warns_once(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
        again = importlib.import_module(old)
    assert module is again is importlib.import_module(new)
    moved = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(moved) == 1 and new in str(moved[0].message) and old in str(moved[0].message)


def test_a_transform_pickled_under_its_old_path_loads(monkeypatch, tmp_path):
    from singan_insert.integrations.torchio import TumorInsertion

    model = tmp_path / "harmonizer.safetensors"
    model.write_bytes(b"")  # the transform checks the path exists; it loads the model lazily
    transform = TumorInsertion(str(model), "ceT1", (10, 12, 4), contrast=0.5, seed=3, appearance="fixed")
    # A pickle written by version 0.1 names the class by its old module (protocol 0 is text,
    # so the module name can be rewritten in place).
    data = pickle.dumps(transform, protocol=0)
    new_path = b"singan_insert.integrations.torchio\n"
    assert data.count(new_path) >= 1
    old_data = data.replace(new_path, b"singan_insert.transforms\n")
    monkeypatch.delitem(sys.modules, "singan_insert.transforms", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        restored = pickle.loads(old_data)
    assert type(restored) is TumorInsertion
    assert restored.__dict__.keys() == transform.__dict__.keys()
    assert (restored.location, restored.contrast, restored.seed) == (transform.location, 0.5, 3)
    assert repr(restored) == repr(transform)
    assert b"singan_insert.transforms" not in pickle.dumps(restored, protocol=0)  # saved under the new path
