"""The export pass: the (compressed) torch model -> simplified FP32 ONNX with a dynamic batch axis; judged to be exact.

For an ONNX source (--onnx) there is no torch model to export: the user's graph is simplified as an export is
(and lowered where the target's parser needs it), its batch axis kept as it was, judged exact against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from pipeline.artifacts import Artifact
from pipeline.data.encode import InputSpec
from pipeline.errors import InputError
from pipeline.export import OPSET, export_onnx
from pipeline.models.checkpoint import load_torch_artifact
from pipeline.models.onnx_source import batch_json, simplify_onnx_source
from pipeline.onnx_compat import Lowering, lowering_for
from pipeline.stages.base import Context, Measure, Pass, onnx_source


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


@dataclass(frozen=True)
class OnnxSourceExportConfig:
    """The export of an ONNX source: the user's graph simplified, not a torch model exported (no opset of ours, no example inputs)."""

    simplifier: str
    spec: InputSpec
    lowering: Lowering | None  # the rewrite the target's parser needs (TensorRT 8.5), or None
    batch: str | int  # the source graph's batch axis, which the simplified graph keeps: "dynamic" or 1
    source: str = "onnx"


def export_config(ctx: Context) -> ExportConfig:
    lowering = lowering_for(ctx.target)
    if lowering is None:
        return ExportConfig(ctx.simplifier, OPSET, ctx.spec)
    return LoweredExportConfig(ctx.simplifier, OPSET, ctx.spec, lowering)


def declare(ctx: Context, done: Mapping[str, Artifact]) -> Pass:
    if onnx_source(ctx) is not None:
        return declare_onnx(ctx, done["source"])
    model = next(reversed(done.values()))
    config = export_config(ctx)
    lowering = config.lowering if isinstance(config, LoweredExportConfig) else None

    def run(workdir):
        try:
            return export_onnx(load_torch_artifact(model.path), ctx.spec, workdir, ctx.simplifier, lowering)
        except InputError as error:  # an op the target's parser lacks: name the target that refuses it
            raise InputError(f"target '{ctx.target.name}' cannot take this model: {error}") from error

    return Pass("export", config, model.sha256, run, Measure("onnxruntime"), code=__name__, gate="export")


def declare_onnx(ctx: Context, source: Artifact) -> Pass:
    config = OnnxSourceExportConfig(ctx.simplifier, ctx.spec, lowering_for(ctx.target), batch_json(source.meta.get("static_batch")))
    run = lambda workdir: simplify_onnx_source(source, workdir, ctx.simplifier, config.lowering, ctx.target.name)
    return Pass("export", config, source.sha256, run, Measure("onnxruntime"), code=__name__, gate="export")
