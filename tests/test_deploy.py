"""Where the engine is built: here only when this machine is the target (issue 15, defect 5)."""

from __future__ import annotations

from pipeline.build import engine_or_bundle
from pipeline.targets import resolve_target
from pipeline.trt.engine import LocalTensorRT

ORIN = LocalTensorRT("10.3.0", "Orin", "8.7")
X86_HOST = LocalTensorRT("10.13.0", "NVIDIA H200", "9.0")


def test_the_target_itself_builds_its_engine():
    assert engine_or_bundle(resolve_target("jetson"), True, "TensorRT 10.3.0", ORIN, False) == ("engine", "TensorRT 10.3.0")


def test_a_gpu_host_that_is_not_the_jetson_writes_the_bundle_and_says_why():
    where, reason = engine_or_bundle(resolve_target("jetson"), True, "TensorRT 10.13.0", X86_HOST, False)
    assert where == "bundle"
    assert "TensorRT here is 10.13.0" in reason and "compute capability 9.0" in reason and "--allow-mismatch" in reason


def test_allow_mismatch_builds_for_this_machine_and_says_so():
    where, reason = engine_or_bundle(resolve_target("jetson"), True, "TensorRT 10.13.0", X86_HOST, True)
    assert where == "engine" and "built for this machine, not the target" in reason


def test_without_tensorrt_the_bundle_is_written():
    assert engine_or_bundle(resolve_target("jetson"), False, "no tensorrt module", None, True) == ("bundle", "no tensorrt module")
