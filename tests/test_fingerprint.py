"""The code fingerprint in every cache key: the pipeline modules a pass imports, transitively, read from the source."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.fingerprint import code_closure, code_fingerprint, imported_modules

REPO = Path(__file__).resolve().parent.parent


def test_a_pass_closure_holds_the_library_it_calls_and_not_the_other_passes():
    closure = set(code_closure("pipeline.stages.factorize"))
    assert {"pipeline.compression.factorize", "pipeline.compression.sensitivity", "pipeline.training", "pipeline.stages.base",
            "pipeline.compression", "pipeline"} <= closure
    assert "pipeline.stages.prune" not in closure and "pipeline.build" not in closure
    assert "pipeline.quantization.quantize" in code_closure("pipeline.stages.quantize")


def test_imports_inside_functions_and_relative_imports_count(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("from . import store\n\ndef f():\n    from pipeline.compression import factorize\n    import pipeline.export\n")
    found = imported_modules(path, "pipeline.fake")
    assert {"pipeline.store", "pipeline.compression.factorize", "pipeline.export"} <= found


def fingerprint_in(package: Path, module: str) -> str:
    code = f"from pipeline.fingerprint import code_fingerprint; print(code_fingerprint({module!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=package, capture_output=True, text=True, check=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(package)}).stdout.strip()


def test_editing_one_library_constant_changes_the_passes_that_import_it_and_only_those(tmp_path):
    package = tmp_path / "copy"
    shutil.copytree(REPO / "pipeline", package / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    assert fingerprint_in(package, "pipeline.stages.factorize") == code_fingerprint("pipeline.stages.factorize")  # paths do not count
    path = package / "pipeline" / "compression" / "factorize.py"
    path.write_text(path.read_text().replace("RANK_QUANTUM = 8\n", "RANK_QUANTUM = 16\n"))
    assert fingerprint_in(package, "pipeline.stages.factorize") != code_fingerprint("pipeline.stages.factorize")
    assert fingerprint_in(package, "pipeline.stages.export") == code_fingerprint("pipeline.stages.export")


def test_the_prune_pass_does_not_depend_on_the_factorize_library():
    assert "pipeline.compression.factorize" not in code_closure("pipeline.stages.prune")
