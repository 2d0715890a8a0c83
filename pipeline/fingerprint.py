"""A fingerprint of the code a pass runs: the pipeline source files its module imports, transitively.

Part of every stage's cache key, so an edited pass (or a library module it
calls, or a constant in one) never serves an artifact the old code made.
Imports are read from the source with ast (top level and inside functions,
which is where the optional heavy dependencies are imported), not from
sys.modules, so the fingerprint does not depend on what happened to be
imported first. Computed once per module per process.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE = "pipeline"
PACKAGE_ROOT = Path(__file__).resolve().parent


def module_file(module: str) -> Path | None:
    """The source file of a pipeline module (a package's __init__.py), or None if it is not one of ours."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_ROOT.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, module: str) -> set[str]:
    """The pipeline modules a source file imports (a from-import of a submodule counts as that submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if module_file(name) is not None}


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]  # importing a.b.c runs a and a.b first


@functools.cache
def code_closure(module: str) -> tuple[str, ...]:
    """Every pipeline module that importing module runs, sorted."""
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        for part in _with_parents(name):
            if part in seen or module_file(part) is None:
                continue
            seen.add(part)
            pending.extend(imported_modules(module_file(part), part))
    return tuple(sorted(seen))


@functools.cache
def code_fingerprint(module: str) -> str:
    """sha256 over the names and bytes of the source files in module's closure."""
    digest = hashlib.sha256()
    for name in code_closure(module):
        digest.update(name.encode())
        digest.update(hashlib.sha256(module_file(name).read_bytes()).digest())
    return digest.hexdigest()
