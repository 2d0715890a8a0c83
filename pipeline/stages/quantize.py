"""The quantize pass: FP32 ONNX -> INT8 ONNX with Q/DQ, calibrated on the target's set, tuned on calib, never on eval."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from pipeline.artifacts import Artifact
from pipeline.models.onnx_source import in_batches_of
from pipeline.parity import Gate
from pipeline.quantization.evaluate import make_evaluator
from pipeline.quantization.quantize import ALGORITHM, quantize
from pipeline.quantization.weight_form import WeightForm, weight_form_for
from pipeline.stages.base import Context, Measure, Pass, onnx_source
from pipeline.targets import Quantize

# The fallback tunes on calib (284 samples) for a gate judged on eval (474): near 0.97 their agreements differ by
# about 0.013 (one standard deviation), and a cpu-form model tuned to 0.975 on calib measured 0.962 on eval. So it
# tunes to the gate's agreement plus this margin.
TUNING_AGREEMENT_MARGIN = 0.01
TUNING_SPLIT = "calib"


@dataclass(frozen=True)
class QuantizeConfig:
    quantize: Quantize
    algorithm: str
    calibration: tuple[str, str]  # (name, sha256 of the ids)
    tuning_data: str  # content fingerprint of the split the fallback tunes on
    tuning_gate: Gate
    tuning_reference: str  # sha256 of the torch model (the ONNX source, for --onnx) whose calib answers the fallback tunes towards
    tuning_source: str  # sha256 of the source model, whose calib accuracy the tuning gate's budget counts from


@dataclass(frozen=True)
class FloatWeightQuantizeConfig(QuantizeConfig):
    """The config of an INT8 model whose weights are float -> QuantizeLinear -> DequantizeLinear (TensorRT 8.x).

    A class of its own, as export's LoweredExportConfig is, so that targets whose TensorRT reads INT8 weight
    initializers keep QuantizeConfig's fields exactly, and with them their cache key's settings and their bytes."""

    weights: WeightForm


def quantize_config(ctx: Context, gate: Gate, torch_model: Artifact, source: Artifact) -> QuantizeConfig:
    target, calibration = ctx.target, ctx.calibration
    fields = (target.quantize, ALGORITHM, (calibration.name, calibration.sha256), ctx.splits.fingerprint(TUNING_SPLIT), gate,
              torch_model.sha256, source.sha256)
    weights = weight_form_for(target)  # from the lint's fact (pipeline.lint.takes_prequantized_weights)
    return QuantizeConfig(*fields) if weights is None else FloatWeightQuantizeConfig(*fields, weights)


def tuning_gate(gate: Gate) -> Gate:
    """What the fallback tunes to on calib: the point estimates (an interval on 284 samples would never close), with margin."""
    agreement = None if gate.min_agreement is None else min(1.0, gate.min_agreement + TUNING_AGREEMENT_MARGIN)
    return dataclasses.replace(gate, min_agreement=agreement, mode="point")


def tuning_reference(ctx: Context, done: Mapping[str, Artifact]) -> tuple[Artifact, Measure]:
    """The model whose calib answers the fallback tunes towards, and how it runs: the model export was given, or the ONNX source."""
    if onnx_source(ctx) is not None:
        return done["source"], Measure("onnxruntime")
    return [artifact for artifact in done.values() if artifact.kind == "torch"][-1], Measure("torch", reach=ctx.target.compression)


def declare(ctx: Context, done: Mapping[str, Artifact]) -> Pass:
    fp32, source = done["export"], done["source"]
    reference_model, how = tuning_reference(ctx, done)
    target, calibration = ctx.target, ctx.calibration
    gate = tuning_gate(target.gates.quantize)
    config = quantize_config(ctx, gate, reference_model, source)
    weights = config.weights if isinstance(config, FloatWeightQuantizeConfig) else None
    static_batch = fp32.meta.get("static_batch")  # an ONNX source's static batch (1): every run of the graph takes that size

    def run(workdir):
        samples = in_batches_of(ctx.splits.get(calibration.split).select_ids(calibration.ids), static_batch)
        reference = ctx.logits(reference_model, TUNING_SPLIT, how)
        # the eval gate's budget is end to end: on calib too, the drop counts from the source, not from the compressed input
        source_logits = None if source.sha256 == reference_model.sha256 else ctx.logits(source, TUNING_SPLIT, how)
        evaluator = make_evaluator(in_batches_of(ctx.splits.get(TUNING_SPLIT), static_batch), reference, gate,
                                   source_logits=source_logits)
        return quantize(fp32, samples, target.quantize, workdir, evaluator=evaluator, weights=weights)

    return Pass("quantize", config, fp32.sha256, run, Measure("onnxruntime"), code=__name__, gate="quantize")
