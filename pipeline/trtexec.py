"""build_engine.sh: the engine stage's build as one `trtexec` command, for a device with JetPack and nothing else.

The flags follow `trtexec --help` of each TensorRT version (NVIDIA/TensorRT
samples/common/sampleOptions.cpp at 8.4/8.5 (22.08, 22.12), 8.6.1, 10.0, 10.3,
10.9, 11.1; facts in shared/TENSORRT.md):

- precision: weakly typed builds (8.x/10.x, builder.network_typing not
  "strong") get `--int8` (a Q/DQ network still needs it, TensorRT#4021) and
  `--fp16` when builder.fp16_fallback; strongly typed builds (11.x always,
  10.x opting in) get `--stronglyTyped` and no precision flag (11.1 keeps
  `--stronglyTyped` as a no-op);
- workspace: `--memPoolSize=workspace:<N>M` on 10.x+ (size suffixes), the
  suffix-less MiB form on 8.4-8.6, `--workspace=<N>` before 8.4 (removed in 10.0);
- `--builderOptimizationLevel`, `--hardwareCompatibilityLevel=ampere+`,
  `--versionCompatible` from 8.6; `sameComputeCapability` from 10.9;
- `--minShapes/--optShapes/--maxShapes` for every input with a dynamic axis,
  the batch axis from builder.batch (pipeline.trt.engine.profile_shapes, the
  same profile the engine stage sets);
- DLA: `--useDLACore=N` and `--allowGPUFallback` when builder.gpu_fallback;
- `--skipInference` (8.6+; `--buildOnly` before): build only, as `python -m
  pipeline engine` does.

The plan, timing cache and layer report go to `device/` (the part of the
bundle its checksums ignore), where `python -m pipeline verify --runtime trt`
looks for the plan; the script then copies the plan into the Triton model
repository (`triton/<model>/1/model.plan`).
"""

from __future__ import annotations

import shlex
from typing import Sequence

from pipeline.errors import InputError
from pipeline.onnx_io import TensorSpec
from pipeline.targets import Target, version_tuple
from pipeline.trt.engine import PLAN_NAME, profile_shapes, uses_weak_typing

SCRIPT_NAME = "build_engine.sh"
DEVICE_DIR = "device"  # = pipeline.bundle.DEVICE_DIR (bundle imports this module)
TIMING_CACHE_NAME = "timing.cache"
LAYER_INFO_NAME = "layers.json"
JETPACK_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"

_HARDWARE_LEVELS = {"ampere_plus": ("ampere+", (8, 6)), "same_compute_capability": ("sameComputeCapability", (10, 9))}


def _shape_name(name: str) -> str:
    """trtexec reads `name:dims` lists split at ',' and ':'; such names go in single quotes."""
    if any(c in name for c in ",:'"):
        if "'" in name:
            raise InputError(f"input name {name!r} contains a single quote, which a trtexec shape spec cannot hold")
        return f"'{name}'"
    return name


def _shape_spec(shapes: Sequence[tuple[str, tuple[int, ...]]]) -> str:
    return ",".join(f"{_shape_name(name)}:{'x'.join(str(d) for d in dims)}" for name, dims in shapes)


def trtexec_args(target: Target, inputs: Sequence[TensorSpec], model_file: str = "model.int8.onnx",
                 plan_path: str = f"{DEVICE_DIR}/{PLAN_NAME}") -> list[str]:
    """The arguments after `trtexec` that build target's plan from model_file, in the order they are written."""
    if target.software.runtime != "tensorrt" or not target.software.tensorrt:
        raise InputError(f"target '{target.name}' does not deploy with TensorRT: no trtexec command for it")
    trt = version_tuple(target.software.tensorrt)
    major = trt[0]
    builder = target.builder
    args = [f"--onnx={model_file}", f"--saveEngine={plan_path}"]
    if uses_weak_typing(target, major):
        if target.precision == "int8":
            args.append("--int8")
        if target.precision == "fp16" or (target.precision == "int8" and builder.fp16_fallback):
            args.append("--fp16")
    else:
        args.append("--stronglyTyped")
    if major >= 10:
        args.append(f"--memPoolSize=workspace:{builder.workspace_mb}M")
    elif trt >= (8, 4):
        args.append(f"--memPoolSize=workspace:{builder.workspace_mb}")  # MiB; no size suffixes before 10.x
    else:
        args.append(f"--workspace={builder.workspace_mb}")
    low, opt, high = [], [], []
    for spec in inputs:
        if not any(d < 0 for d in spec.dims):
            continue  # static input: trtexec takes its shape from the model
        shapes = profile_shapes(spec.name, spec.dims, target)
        for bucket, dims in zip((low, opt, high), shapes):
            bucket.append((spec.name, dims))
    if low:
        args += [f"--minShapes={_shape_spec(low)}", f"--optShapes={_shape_spec(opt)}", f"--maxShapes={_shape_spec(high)}"]
    args.append(f"--timingCacheFile={DEVICE_DIR}/{TIMING_CACHE_NAME}")
    if trt >= (8, 6):
        args.append(f"--builderOptimizationLevel={builder.optimization_level}")
    if builder.use_dla:
        args.append(f"--useDLACore={builder.dla_core}")
        if builder.gpu_fallback:
            args.append("--allowGPUFallback")
    if builder.hardware_compatibility != "none":
        level, since = _HARDWARE_LEVELS[builder.hardware_compatibility]
        if trt < since:
            raise InputError(f"target '{target.name}': trtexec of TensorRT {target.software.tensorrt} has no "
                             f"--hardwareCompatibilityLevel={level} (from {'.'.join(map(str, since))})")
        args.append(f"--hardwareCompatibilityLevel={level}")
    if builder.version_compatible:
        args.append("--versionCompatible")
    args += [f"--exportLayerInfo={DEVICE_DIR}/{LAYER_INFO_NAME}", "--profilingVerbosity=detailed",
             "--skipInference" if trt >= (8, 6) else "--buildOnly"]
    return args


def build_engine_script(target: Target, inputs: Sequence[TensorSpec], model_file: str = "model.int8.onnx",
                        triton_version_dir: str | None = None) -> str:
    """build_engine.sh: checks the bundle, runs trtexec into device/, copies the plan into the Triton repository."""
    args = trtexec_args(target, inputs, model_file)
    software = target.software
    ships = f"TensorRT {software.tensorrt}" + (f" (JetPack {software.jetpack})" if software.jetpack else "")
    notes = []
    if version_tuple(software.tensorrt or "0") < (8, 6):
        notes.append(f"# TensorRT {software.tensorrt}'s trtexec has no --builderOptimizationLevel (8.6+): "
                     f"the target's level {target.builder.optimization_level} is not applied.")
    command = " \\\n    ".join(['"$TRTEXEC"'] + [shlex.quote(arg) for arg in args])
    copy = ""
    if triton_version_dir:
        copy = (f"\n# The Triton model repository (triton/) serves this plan.\n"
                f"mkdir -p {shlex.quote(triton_version_dir)}\n"
                f"cp {DEVICE_DIR}/{PLAN_NAME} {shlex.quote(triton_version_dir + '/' + PLAN_NAME)}\n")
    note_text = ("\n".join(notes) + "\n") if notes else ""
    return f"""#!/usr/bin/env bash
# Build the TensorRT plan for target '{target.name}' with trtexec, on the device
# ({target.device.name}, {ships}): nothing but JetPack's TensorRT needed.
# The same build as `python -m pipeline engine --bundle .` (pipeline/trt/engine.py).
# Writes {DEVICE_DIR}/{PLAN_NAME}, {DEVICE_DIR}/{TIMING_CACHE_NAME} and {DEVICE_DIR}/{LAYER_INFO_NAME} (per-layer
# precisions); {DEVICE_DIR}/ is outside the bundle's checksums.
# Set TRTEXEC to use another trtexec than the one on PATH or JetPack's {JETPACK_TRTEXEC}.
{note_text}set -euo pipefail
cd "$(dirname "${{BASH_SOURCE[0]}}")"

TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo {JETPACK_TRTEXEC})}}"
if [ ! -x "$TRTEXEC" ]; then
    echo "trtexec not found (tried PATH and {JETPACK_TRTEXEC}); set TRTEXEC=/path/to/trtexec" >&2
    exit 4
fi
if command -v sha256sum >/dev/null; then
    sha256sum --check --quiet SHA256SUMS
fi
mkdir -p {DEVICE_DIR}

{command}
{copy}"""
