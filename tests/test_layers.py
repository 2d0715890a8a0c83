"""The layers point down only: cli -> build -> stages -> the library, with no cycles (import-linter and grimp)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
ABOVE_THE_LIBRARY = {"pipeline.cli", "pipeline.fleet", "pipeline.build", "pipeline.stages", "pipeline.__main__"}


def contracts() -> list[dict]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_lint_imports_keeps_every_contract():
    command = shutil.which("lint-imports")
    if command is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    result = subprocess.run([command], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_every_library_module_is_under_the_forbidden_contract():
    """A new module is either above the library (cli, build, stages) or bound by the contract: none slips between."""
    forbidden = next(c for c in contracts() if c["type"] == "forbidden")
    assert set(forbidden["forbidden_modules"]) >= {"pipeline.stages", "pipeline.build"}
    covered = set(forbidden["source_modules"]) | ABOVE_THE_LIBRARY
    top_level = {f"pipeline.{p.stem}" for p in (REPO / "pipeline").glob("*.py") if p.stem != "__init__"}
    top_level |= {f"pipeline.{p.parent.name}" for p in (REPO / "pipeline").glob("*/__init__.py")}
    assert sorted(top_level - covered) == []


def test_there_are_no_import_cycles():
    graph = grimp.build_graph("pipeline", include_external_packages=False)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported != module and graph.chain_exists(importer=imported, imported=module):
                cycles.append((module, imported))
    assert cycles == []


def test_pipeline_modules_are_imported_at_the_top_except_by_the_command_line():
    """In-function imports are for optional or heavy dependencies; the CLI's wait until the kernels are pinned (before torch loads)."""
    late = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    module = inner.module if isinstance(inner, ast.ImportFrom) else None
                    if isinstance(inner, ast.Import):
                        module = inner.names[0].name
                    if module and module.split(".")[0] == "pipeline":
                        late.append(f"{path.relative_to(REPO)}:{inner.lineno} {module}")
    assert late == []
