"""The export pass: the (compressed) torch model -> simplified FP32 ONNX with a dynamic batch axis; judged to be exact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from pipeline.artifacts import Artifact
from pipeline.data.encode import InputSpec
from pipeline.export import OPSET, export_onnx
from pipeline.models.checkpoint import load_torch_artifact
from pipeline.stages.base import Context, Measure, Pass


@dataclass(frozen=True)
class ExportConfig:
    simplifier: str
    opset: int
    spec: InputSpec


def declare(ctx: Context, done: Mapping[str, Artifact]) -> Pass:
    model = next(reversed(done.values()))
    config = ExportConfig(ctx.simplifier, OPSET, ctx.spec)
    run = lambda workdir: export_onnx(load_torch_artifact(model.path), ctx.spec, workdir, ctx.simplifier)
    return Pass("export", config, model.sha256, run, Measure("onnxruntime"), code=__name__, gate="export")
