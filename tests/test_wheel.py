"""The wheel a user installs with `pip install .`: built from the checkout, installed into a fresh venv, run from elsewhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LEFT_BEHIND = shutil.ignore_patterns(".git", "build", "out", "*.egg-info", "__pycache__", ".pytest_cache")


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv holding the wheel alone; the dependencies (torch and the rest) come from the system site, as `pip install .` would put them."""
    work = tmp_path_factory.mktemp("wheel")
    # A copy of the checkout: an in-tree build/ could carry files the checkout no longer has into the wheel.
    source = work / "source"
    shutil.copytree(REPO, source, ignore=LEFT_BEHIND)
    run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(work / "dist")], work)
    env_dir = work / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(env_dir)], work)
    (wheel,) = (work / "dist").glob("edgepipe-*.whl")
    run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], work)
    return env_dir


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{command[:3]} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


def test_the_wheel_is_what_the_venv_imports(venv, tmp_path):
    where = run([str(venv / "bin" / "python"), "-c", "import pipeline; print(pipeline.__file__)"], tmp_path).stdout.strip()
    assert where.startswith(str(venv)), f"imported {where}, not the installed wheel"


def test_the_console_script_lists_the_shipped_targets_from_outside_the_checkout(venv, tmp_path):
    listing = json.loads(run([str(venv / "bin" / "edgepipe"), "targets", "--json"], tmp_path).stdout)
    assert {"jetson-orin-nano", "jetson-agx-orin", "gpu-ampere", "cpu"} <= {row["name"] for row in listing}


def test_the_command_line_loads_no_torch_before_its_guards(venv, tmp_path):
    """The console script imports pipeline.cli and calls main(): the allocator and kernel settings must come before torch."""
    probe = "import sys, pipeline.cli; print(sorted(m for m in ('torch', 'numpy', 'onnxruntime') if m in sys.modules))"
    assert run([str(venv / "bin" / "python"), "-c", probe], tmp_path).stdout.strip() == "[]"


@pytest.mark.slow
def test_a_fused_tiny_build_from_the_wheel(venv, tmp_path):
    """The README's build, through the console script, with the calibration set and targets read from the installed package.

    Without compression (the stage modules still import the whole library): what is checked is the package, not the pruning."""
    out = tmp_path / "x"
    run([str(venv / "bin" / "edgepipe"), "build", "--model", "fused-tiny", "--target", "jetson", "--no-compression", "--epochs", "3",
         "--out", str(out)], tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "ok"
    assert [s["name"] for s in manifest["stages"]] == ["source", "export", "quantize"]
    assert manifest["data"]["calibration"]["frozen"] is True  # the emoji data's shipped id list, read from the package
    # the console script ran main()'s guards: kernels pinned and the allocator tuned before torch loaded
    assert manifest["machine"]["pinned"] and manifest["machine"]["allocator"]["THP_MEM_ALLOC_ENABLE"] == "1"
    assert manifest["target"]["source"].startswith(str(venv)), manifest["target"]["source"]
