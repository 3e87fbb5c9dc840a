"""The package's import rules: one package per stage, imports one way (docs/architecture.md).

Static checks read every module's imports with ``ast``; the torch rule is also checked at run time,
in a fresh interpreter, because an innocent-looking import can pull torch in transitively.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dicomnode"
WRITTEN_ONLY_BY_QUEUE = {"Job", "Outbox", "Result"}


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imports(tree: ast.Module) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count too)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _ours(imported: set[str]) -> set[str]:
    return {name for name in imported if name == "dicomnode" or name.startswith("dicomnode.")}


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


MODULES = dict(_modules())


def test_the_package_has_the_stage_packages() -> None:
    """Each stage of the data path has its own package."""
    for package in ("net", "receive", "queue", "work", "report", "deliver", "node", "lifecycle", "cli"):
        assert f"dicomnode.{package}" in MODULES, package


def test_net_imports_only_status_errors_and_itself() -> None:
    """The upper layer knows nothing of storage, the queue or the configuration."""
    allowed = ("dicomnode.net", "dicomnode.status", "dicomnode.errors")
    for module, tree in MODULES.items():
        if not _in(module, "dicomnode.net"):
            continue
        for name in _ours(_imports(tree)):
            top_level = name in ("dicomnode", "dicomnode.__version__")
            assert top_level or any(_in(name, a) for a in allowed), f"{module} imports {name}"


@pytest.mark.parametrize("stage", ["dicomnode.receive", "dicomnode.report", "dicomnode.net"])
def test_listener_and_reporting_never_import_torch_or_models(stage: str) -> None:
    """Reception and reporting stay up when torch or a model is broken: they never import either."""
    for module, tree in MODULES.items():
        if not _in(module, stage):
            continue
        imported = _imports(tree)
        assert not {n for n in imported if n == "torch" or n.startswith("torch.")}, module
        assert not {n for n in _ours(imported) if _in(n, "dicomnode.models")}, module


def test_listener_and_reporting_do_not_load_torch_at_run_time() -> None:
    """Importing the listener, supervisor, report builders and HTTP server leaves torch unloaded."""
    code = (
        "import sys\n"
        "import dicomnode.node.serve, dicomnode.receive.scp, dicomnode.report.bundle\n"
        "import dicomnode.deliver.sender, dicomnode.http.app, dicomnode.http.server, dicomnode.metrics\n"
        "sys.exit(1 if 'torch' in sys.modules else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr or "torch was imported"


def test_lifecycle_is_imported_only_by_the_cli() -> None:
    """Training and evaluation never become part of the runtime."""
    for module, tree in MODULES.items():
        if _in(module, "dicomnode.lifecycle") or _in(module, "dicomnode.cli"):
            continue
        used = {n for n in _ours(_imports(tree)) if _in(n, "dicomnode.lifecycle")}
        assert not used, f"{module} imports {sorted(used)}"


def _writes(tree: ast.Module) -> set[str]:
    """Names of the queue's tables this module writes: insert/update/delete statements on them,
    or new rows built with their constructors."""
    written: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            continue
        if node.func.id in WRITTEN_ONLY_BY_QUEUE:
            written.add(node.func.id)
        elif node.func.id in ("insert", "update", "delete") and node.args:
            target = node.args[0]
            if isinstance(target, ast.Name) and target.id in WRITTEN_ONLY_BY_QUEUE:
                written.add(target.id)
    return written


def test_only_the_queue_writes_jobs_outbox_and_results() -> None:
    """The Job, Outbox and Result tables have one owner, so their state machines live in one place."""
    for module, tree in MODULES.items():
        if _in(module, "dicomnode.queue") or module == "dicomnode.db":
            continue
        assert not _writes(tree), f"{module} writes {sorted(_writes(tree))}"
