"""build_engine.sh: the trtexec command line per TensorRT version, its shapes from the ONNX graph, and a dry run."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

import onnx
import pytest

from pipeline import trtexec
from pipeline.bundle import verify_bundle_checksums
from pipeline.errors import InputError
from pipeline.onnx_io import graph_io
from pipeline.targets import available_targets, resolve_target, version_tuple, with_overrides

from test_bundle import SEQ, make_bundle, tiny_fused_model  # noqa: E402  (tests/ is on sys.path)


def trtexec_argv(script: str) -> list[str]:
    """The arguments of the script's one trtexec command (its continuation lines joined)."""
    joined = script.replace("\\\n", " ")
    lines = [line for line in joined.splitlines() if line.lstrip().startswith('"$TRTEXEC"')]
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0])
    assert argv[0] == "$TRTEXEC"
    return argv[1:]


def flags(argv: list[str]) -> dict[str, str | None]:
    parsed: dict[str, str | None] = {}
    for arg in argv:
        assert arg.startswith("--"), arg
        name, sep, value = arg.partition("=")
        assert name not in parsed, f"{name} given twice"
        parsed[name] = value if sep else None
    return parsed


def shapes(spec: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for item in spec.split(","):
        name, _, dims = item.rpartition(":")
        out[name.strip("'")] = tuple(int(d) for d in dims.split("x"))
    return out


def script_for(tmp_path, model_path, target_name=None, target=None):
    target = target or resolve_target(target_name)
    return trtexec.build_engine_script(target, graph_io(model_path).inputs, triton_version_dir="triton/edgepipe/1")


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.int8.onnx"
    onnx.save(tiny_fused_model(), path)
    return path


def expected_shapes(target, which):
    batch = getattr(target.builder.batch, which)
    return {"image": (batch, 3, 4, 4), "input_ids": (batch, SEQ), "attention_mask": (batch, SEQ)}


def check_common(parsed, target):
    assert parsed["--onnx"] == "model.int8.onnx"
    assert parsed["--saveEngine"] == "device/model.plan"
    assert parsed["--timingCacheFile"] == "device/timing.cache"
    assert parsed["--exportLayerInfo"] == "device/layers.json"
    assert parsed["--profilingVerbosity"] == "detailed"
    for flag, which in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
        assert shapes(parsed[flag]) == expected_shapes(target, which)


def test_jetson_tensorrt_10_3_weakly_typed_int8_with_fp16(tmp_path, model_path):
    target = resolve_target("jetson")
    assert version_tuple(target.software.tensorrt)[:2] == (10, 3)
    script = script_for(tmp_path, model_path, target=target)
    parsed = flags(trtexec_argv(script))
    check_common(parsed, target)
    assert "--int8" in parsed and "--fp16" in parsed and "--stronglyTyped" not in parsed
    assert parsed["--memPoolSize"] == f"workspace:{target.builder.workspace_mb}M" and "--workspace" not in parsed
    assert parsed["--builderOptimizationLevel"] == str(target.builder.optimization_level)
    assert "--useDLACore" not in parsed and "--allowGPUFallback" not in parsed
    assert "--skipInference" in parsed
    assert script.splitlines()[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in script
    assert 'cd "$(dirname "${BASH_SOURCE[0]}")"' in script


def test_tensorrt_11_is_strongly_typed_without_precision_flags(tmp_path, model_path):
    eleven = [t for t in available_targets().values() if t.software.tensorrt and version_tuple(t.software.tensorrt)[0] >= 11]
    # No 11.x target in targets/ yet: Thor moved to a TensorRT 11 JetPack plays the part.
    target = eleven[0] if eleven else with_overrides(resolve_target("jetson-thor"), **{"software.tensorrt": "11.4"})
    parsed = flags(trtexec_argv(script_for(tmp_path, model_path, target=target)))
    check_common(parsed, target)
    assert "--stronglyTyped" in parsed
    assert not {"--int8", "--fp16", "--workspace"} & set(parsed)
    assert parsed["--memPoolSize"] == f"workspace:{target.builder.workspace_mb}M"


def test_tensorrt_10_opting_into_strong_typing(tmp_path, model_path):
    target = with_overrides(resolve_target("jetson-thor"), **{"builder.network_typing": "strong"})
    parsed = flags(trtexec_argv(script_for(tmp_path, model_path, target=target)))
    assert "--stronglyTyped" in parsed and "--int8" not in parsed and "--fp16" not in parsed


def test_dla_target_static_shapes_core_and_gpu_fallback(tmp_path, model_path):
    target = resolve_target("jetson-agx-orin")
    assert target.builder.use_dla
    parsed = flags(trtexec_argv(script_for(tmp_path, model_path, target=target)))
    check_common(parsed, target)
    assert parsed["--useDLACore"] == str(target.builder.dla_core)
    assert "--allowGPUFallback" in parsed
    assert shapes(parsed["--minShapes"]) == shapes(parsed["--optShapes"]) == shapes(parsed["--maxShapes"])
    assert "--int8" in parsed and "--fp16" in parsed
    no_fallback = with_overrides(target, **{"builder.gpu_fallback": False})
    assert "--allowGPUFallback" not in flags(trtexec_argv(script_for(tmp_path, model_path, target=no_fallback)))


def test_tensorrt_8_5_flags(tmp_path, model_path):
    target = resolve_target("jetson-xavier-nx")
    script = script_for(tmp_path, model_path, target=target)
    parsed = flags(trtexec_argv(script))
    check_common(parsed, target)
    assert parsed["--memPoolSize"] == f"workspace:{target.builder.workspace_mb}"  # MiB, no suffix before 10.x
    assert "--builderOptimizationLevel" not in parsed and "--skipInference" not in parsed and "--buildOnly" in parsed
    assert "no --builderOptimizationLevel" in script


def test_compatibility_flags(tmp_path, model_path):
    target = with_overrides(resolve_target("gpu-ampere"), **{"builder.hardware_compatibility": "ampere_plus",
                                                              "builder.version_compatible": True})
    parsed = flags(trtexec_argv(script_for(tmp_path, model_path, target=target)))
    assert parsed["--hardwareCompatibilityLevel"] == "ampere+" and "--versionCompatible" in parsed
    same_cc = with_overrides(resolve_target("jetson"), **{"builder.hardware_compatibility": "same_compute_capability"})
    with pytest.raises(InputError, match="sameComputeCapability"):
        script_for(tmp_path, model_path, target=same_cc)  # 10.3 predates it (10.9)


def test_no_script_for_an_onnx_runtime_target(model_path):
    with pytest.raises(InputError, match="does not deploy with TensorRT"):
        trtexec.trtexec_args(resolve_target("cpu"), graph_io(model_path).inputs)


def test_shape_names_with_separators_are_quoted():
    assert trtexec._shape_spec([("input:0", (1, 3)), ("ids", (1, 5))]) == "'input:0':1x3,ids:1x5"


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("sha256sum") is None, reason="bash/sha256sum not installed")
def test_script_runs_with_a_stub_trtexec_and_keeps_the_bundle_valid(tmp_path, model_path):
    """A stub trtexec writes the plan: the script puts it in device/ and the Triton repository, checksums still hold."""
    bundle = make_bundle(tmp_path, model_path)
    subprocess.run(["bash", "-n", str(bundle / "build_engine.sh")], check=True)
    stub = tmp_path / "trtexec"
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$PWD/device/argv.txt"\n'
                    'for a in "$@"; do case "$a" in --saveEngine=*) echo plan > "${a#--saveEngine=}";; esac; done\n')
    stub.chmod(0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([str(bundle / "build_engine.sh")], cwd=elsewhere, capture_output=True, text=True,
                            env={**os.environ, "TRTEXEC": str(stub)})
    assert result.returncode == 0, result.stderr
    assert (bundle / "device" / "model.plan").read_text() == "plan\n"
    assert (bundle / "triton" / "edgepipe" / "1" / "model.plan").read_text() == "plan\n"
    recorded = (bundle / "device" / "argv.txt").read_text().splitlines()
    assert recorded == trtexec_argv((bundle / "build_engine.sh").read_text())
    verify_bundle_checksums(bundle)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_script_without_trtexec_says_so(tmp_path, model_path):
    bundle = make_bundle(tmp_path, model_path)
    result = subprocess.run([str(bundle / "build_engine.sh")], capture_output=True, text=True,
                            env={**os.environ, "TRTEXEC": str(tmp_path / "missing")})
    assert result.returncode == 4 and "trtexec not found" in result.stderr
