"""The kernel path a build computes with: pinned to AVX2 before torch loads, unless the user chose otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.kernels import PINNED, RECORDED, kernel_signature, pin_kernels

REPO = Path(__file__).resolve().parent.parent


def test_pinning_sets_the_avx2_paths_but_keeps_what_the_user_set(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as in a fresh `python -m pipeline` process
    environ = {"ONEDNN_MAX_CPU_ISA": "SSE41"}
    assert pin_kernels(environ) == "avx2"
    assert environ == {**PINNED, "ONEDNN_MAX_CPU_ISA": "SSE41"}
    native = {"EDGEPIPE_KERNELS": "native"}
    assert pin_kernels(native) == "native" and native == {"EDGEPIPE_KERNELS": "native"}


def test_pinning_after_torch_loaded_changes_nothing():
    import torch  # noqa: F401  (already loaded by the test session; the variables would be read too late)

    environ: dict[str, str] = {}
    pin_kernels(environ)
    assert environ == {}


def fresh_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in RECORDED and k != "EDGEPIPE_KERNELS"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**environment, "PYTHONPATH": str(REPO), **env})


PROBE = ("import json, sys; from pipeline.kernels import pin_kernels, kernel_facts; pin_kernels(); "
         "print(json.dumps(kernel_facts()))")


def test_a_fresh_process_runs_torch_on_the_pinned_path_and_records_it():
    facts = json.loads(fresh_python(PROBE).stdout)
    assert facts["pinned"] and facts["aten_capability"] == "AVX2"
    assert facts["settings"] == {**PINNED, "MKL_CBWR": None}
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in kernel_signature(facts) and "aten=AVX2" in kernel_signature(facts)
    assert "MKL_CBWR=AVX2" in kernel_signature(json.loads(fresh_python(PROBE, MKL_CBWR="AVX2").stdout))  # a user's setting is keyed
    native = json.loads(fresh_python(PROBE, EDGEPIPE_KERNELS="native").stdout)
    assert not native["pinned"] and all(value is None for value in native["settings"].values())
    assert kernel_signature(native) != kernel_signature(facts)  # a different kernel path is a different cache key


def test_an_unknown_kernel_policy_is_a_clear_error():
    result = fresh_python("from pipeline.cli import main; raise SystemExit(main(['targets']))", EDGEPIPE_KERNELS="fast")
    assert result.returncode == 2
    assert "EDGEPIPE_KERNELS='fast'" in result.stderr and "Traceback" not in result.stderr
