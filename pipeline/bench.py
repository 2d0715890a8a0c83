"""`python -m pipeline bench`: a built directory's models timed side by side on this CPU.

The issue-3 comparison as a command: the source model's FP32 export (exported
now, with the export stage's exporter and simplifier), the export stage's FP32
file and the quantize stage's INT8 file, with ONNX Runtime on the CPU, taking
turns (pipeline.side_by_side). It reads the manifest a build wrote and changes
nothing in the directory.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.report import read_manifest
from pipeline.side_by_side import Latency, Timing, time_side_by_side
from pipeline.models.checkpoint import input_spec_of, load_torch_artifact, read_description
from pipeline.export import export_onnx


@dataclass(frozen=True)
class BenchResult:
    labels: tuple[str, ...]
    latencies: tuple[Latency, ...]
    note: str | None  # what the INT8 file's CPU latency does not say


def _stage_file(out: Path, manifest: dict[str, Any], name: str, kind: str) -> Path:
    stage = next((s for s in manifest.get("stages", []) if s.get("name") == name), None)
    if stage is None or stage.get("artifact", {}).get("kind") != kind:
        raise InputError(f"{out / 'manifest.json'}: no {name} stage with a {kind} artifact (build status: {manifest.get('status')}); "
                         "bench needs a build that reached the quantize stage")
    path = out / stage["artifact"]["path"]
    if not path.exists():
        raise InputError(f"{path}: the {name} stage's artifact named in {out / 'manifest.json'} is missing")
    return path


def bench(out: Path, timing: Timing) -> BenchResult:
    manifest = read_manifest(out)
    source = _stage_file(out, manifest, "source", "torch")
    fp32 = _stage_file(out, manifest, "export", "onnx")
    int8 = _stage_file(out, manifest, "quantize", "onnx")
    spec = input_spec_of(read_description(source))
    form = next(s for s in manifest["stages"] if s["name"] == "quantize")["artifact"].get("meta", {}).get("form", "?")
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as tmp:
        simplifier = manifest.get("config", {}).get("simplifier", "onnxsim")
        reference = export_onnx(load_torch_artifact(source), spec, Path(tmp), simplifier).path
        latencies = time_side_by_side([reference, fp32, int8], spec, timing)
    note = None
    if form == "tensorrt":
        note = ("the INT8 file is in TensorRT's Q/DQ form: ONNX Runtime's CPU provider has no int8 kernel for that placement and "
                "dequantizes the weights on every run, so its CPU latency says nothing of the engine's on the device "
                "(the `cpu` target builds the form ONNX Runtime runs in int8)")
    labels = ("source model, FP32 export (reference)", "export stage, FP32", f"quantize stage, INT8 ({form} form)")
    return BenchResult(labels, tuple(latencies), note)
