"""The export pass: the (compressed) torch model -> simplified FP32 ONNX with a dynamic batch axis; judged to be exact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from pipeline.artifacts import Artifact
from pipeline.data.encode import InputSpec
from pipeline.errors import InputError
from pipeline.export import OPSET, export_onnx
from pipeline.models.checkpoint import load_torch_artifact
from pipeline.onnx_compat import Lowering, lowering_for
from pipeline.stages.base import Context, Measure, Pass


@dataclass(frozen=True)
class ExportConfig:
    simplifier: str
    opset: int  # the opset the exporter writes
    spec: InputSpec


@dataclass(frozen=True)
class LoweredExportConfig(ExportConfig):
    """The config of an export rewritten for an older parser (TensorRT 8.5: opset 17, no LayerNormalization).

    A class of its own so that targets whose parser takes the export as it is keep ExportConfig's fields
    exactly, and with them their cache key's settings and their bytes."""

    lowering: Lowering


def export_config(ctx: Context) -> ExportConfig:
    lowering = lowering_for(ctx.target)
    if lowering is None:
        return ExportConfig(ctx.simplifier, OPSET, ctx.spec)
    return LoweredExportConfig(ctx.simplifier, OPSET, ctx.spec, lowering)


def declare(ctx: Context, done: Mapping[str, Artifact]) -> Pass:
    model = next(reversed(done.values()))
    config = export_config(ctx)
    lowering = config.lowering if isinstance(config, LoweredExportConfig) else None

    def run(workdir):
        try:
            return export_onnx(load_torch_artifact(model.path), ctx.spec, workdir, ctx.simplifier, lowering)
        except InputError as error:  # an op the target's parser lacks: name the target that refuses it
            raise InputError(f"target '{ctx.target.name}' cannot take this model: {error}") from error

    return Pass("export", config, model.sha256, run, Measure("onnxruntime"), code=__name__, gate="export")
