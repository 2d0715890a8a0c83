"""Quantize stage: FP32 ONNX -> INT8 ONNX with explicit Q/DQ, calibrated on real data.

    prepare (ONNX Runtime's quant_pre_process: shape inference, cleanup; name every node)
    -> find regions (placement.py: weighted ops, residual adds, the token embedding)
    -> calibrate their activations (calibrate.py: minmax / percentile / entropy)
    -> write the Q/DQ model in the target's form (qdq.py: "tensorrt" or "cpu"), each INT8 convolution's bias
       corrected for its weights' rounding (bias_correction.py) where that agrees more with the reference on the tuning set
    -> with an evaluator: accuracy-aware fallback (fallback.py) until the gate holds on the tuning set.

The conductor gates the result on the eval split afterwards; meta records what
stayed in float, why, and what each step bought.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx
from onnxruntime.quantization.shape_inference import quant_pre_process

from pipeline.artifacts import Artifact
from pipeline.data.encode import Encoded
from pipeline.quantization.bias_correction import BIAS_CORRECTION_RULE, ConvInputMeans, conv_input_means
from pipeline.quantization.calibrate import CALIBRATION_BATCH, TensorRange, calibrate, to_tensors_data
from pipeline.quantization.evaluate import Evaluation, Evaluator, TuningEvaluator, make_evaluator
from pipeline.quantization.fallback import FallbackResult, accuracy_aware_fallback, summary
from pipeline.quantization.placement import PLACEMENT_RULE, Region, find_regions, name_unnamed_nodes
from pipeline.quantization.qdq import FORMS, Form, quiet, write_qdq
from pipeline.quantization.weight_form import WEIGHT_FORM_RULE, WeightForm
from pipeline.export import onnx_facts
from pipeline.store import sha256_file
from pipeline.targets import Quantize

__all__ = ["quantize", "quantize_settings", "Evaluation", "Evaluator", "make_evaluator", "CALIBRATION_BATCH"]

# Bump when the algorithm changes what it writes: part of the cache key.
# 5: nodes written topologically sorted; 6: INT8 convolutions' biases corrected;
# 7: the tuning gate counts the accuracy budget from the source model; 8: no fallback step for a budget spent upstream
ALGORITHM = "edgepipe-int8/8"
OUTPUT_NAME = "model.int8.onnx"


def quantize_settings(settings: Quantize) -> dict:
    """What changes the INT8 output: part of the stage's cache key."""
    return {**asdict(settings), "algorithm": ALGORITHM, "embedding": _embedding_setting(settings)}


def _embedding_setting(settings: Quantize) -> str:
    # "int8" unless a target opts out (a `quantize.embedding` field, proposed for targets.Quantize)
    return getattr(settings, "embedding", "int8")


def _prepare(fp32: Path, output: Path) -> Path:
    """Shape inference and cleanup (ONNX Runtime's quant_pre_process), then a name for every node."""

    with quiet():
        quant_pre_process(str(fp32), str(output), skip_symbolic_shape=True)
    model = onnx.load(str(output))
    name_unnamed_nodes(model)
    onnx.save(model, str(output))
    return output


def _calibrated_tensors(regions: list[Region], form: Form) -> list[str]:
    tensors = {t for region in regions for t in region.activations}
    # a fused Relu/Clip is quantized with its op: its output gets the Q/DQ the op's would
    tensors |= {t for region in regions if region.op_type in form.output_quantized_ops or region.fused
                for t in region.outputs}
    return sorted(tensors)


class _CandidateBuilder:
    """Writes (once) the INT8 model with a given set of regions kept in float."""

    def __init__(self, prepared: Path, regions: list[Region], ranges: dict[str, TensorRange], form: Form,
                 method: str, directory: Path, weights: WeightForm | None = None, conv_means: ConvInputMeans | None = None):
        self.prepared, self.regions, self.form, self.directory = prepared, regions, form, directory
        self.weights = weights  # every candidate is written in the form that ships, so the fallback measures that
        self.conv_means = conv_means
        self.ranges = to_tensors_data(ranges, method)
        directory.mkdir(parents=True, exist_ok=True)

    def __call__(self, floats: frozenset[str]) -> Path:
        key = hashlib.sha256("\n".join(sorted(floats)).encode()).hexdigest()[:16]
        path = self.directory / f"candidate-{key}.onnx"
        if not path.exists():
            quantized = {region.name for region in self.regions} - floats
            write_qdq(self.prepared, self.regions, quantized, self.ranges, self.form, path, self.weights, self.conv_means)
        return path


def _with_or_without_correction(corrected: _CandidateBuilder, plain: _CandidateBuilder, evaluator: Evaluator
                                ) -> tuple[_CandidateBuilder, Evaluation, dict[str, Any]]:
    """The builder whose all-INT8 model answers more like the reference on the tuning set (agreement, then mean error),
    with that model's evaluation.

    Bias correction removes the mean its rounded weights add to each convolution's output, measured with the FP32
    model's inputs; on the default model it lifts agreement (BENCHMARKS.md), but on a small CNN (fused-tiny, 32 px) it
    lowered eval agreement from 0.979 to 0.966, so each model's tuning set decides, never the eval split."""
    with_it, without = evaluator(corrected(frozenset())), evaluator(plain(frozenset()))
    rank = lambda e: (e.metrics["agreement"], -e.metrics["mean_error"])
    kept = rank(with_it) >= rank(without)
    return (corrected if kept else plain), (with_it if kept else without), \
        {"kept": kept, "corrected": summary(with_it), "uncorrected": summary(without)}


def _range_counts(ranges: dict[str, TensorRange]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in ranges.values():
        counts[value.method] = counts.get(value.method, 0) + 1
    return dict(sorted(counts.items()))


def _float_region_rows(result: FallbackResult) -> list[dict[str, Any]]:
    return [step.to_json() for step in result.steps if step.kept]


def quantize(fp32: Artifact, calibration: Encoded, settings: Quantize, workdir: Path,
             evaluator: Evaluator | None = None, weights: WeightForm | None = None, form: Form | None = None,
             bias_correction: bool = True) -> Artifact:
    """weights: None writes INT8 weight initializers; FLOAT_QDQ float weights -> Q -> DQ (weight_form.py).

    form: None writes the form settings.form names (qdq.FORMS); a benchmark may pass a variant of one.
    bias_correction: correct each INT8 convolution's bias for its weights' rounding (bias_correction.py); a
    benchmark may turn it off to measure what it buys."""
    form = FORMS[settings.form] if form is None else form
    scratch = workdir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    prepared = _prepare(fp32.path, scratch / "prepared.onnx")
    regions = find_regions(onnx.load(str(prepared), load_external_data=False), settings.op_types,
                           residual_adds=form.residual_adds, embedding=_embedding_setting(settings) == "int8",
                           fuse_activations=form.fuse_activations, float_residual_writers=form.float_residual_writers)
    ranges = calibrate(prepared, _calibrated_tensors(regions, form), calibration, settings.method,
                       symmetric=form.symmetric_activations, percentile=settings.percentile)
    conv_means = conv_input_means(prepared, calibration) if bias_correction else None
    build = _CandidateBuilder(prepared, regions, ranges, form, settings.method, scratch / "candidates", weights, conv_means)
    result: FallbackResult | None = None
    if isinstance(evaluator, TuningEvaluator):  # measure the candidates as the deploy runtime computes them
        evaluator = evaluator.with_session_config(form.ort_session_config)
    choice, measured = None, None
    if conv_means is not None and evaluator is not None:
        plain = _CandidateBuilder(prepared, regions, ranges, form, settings.method, scratch / "uncorrected", weights)
        build, measured, choice = _with_or_without_correction(build, plain, evaluator)
        conv_means = conv_means if choice["kept"] else None
    if evaluator is None:
        chosen = build(frozenset())
    else:
        result = accuracy_aware_fallback(build, prepared, regions, evaluator, settings.max_fallback_steps,
                                         probe_data=calibration.subset(range(min(len(calibration), 32))),
                                         session_config=form.ort_session_config, measured=measured)
        chosen = result.path
    output = workdir / OUTPUT_NAME
    shutil.copyfile(chosen, output)
    shutil.rmtree(scratch)
    meta = _meta(output, settings, form, calibration, regions, ranges, result, conv_means)
    if choice is not None:
        meta["bias_correction_choice"] = choice
    if weights is not None:  # only then: other targets' meta stays as it was
        meta.update({"weight_form": weights, "weight_form_rule": WEIGHT_FORM_RULE})
    return Artifact(kind="onnx", path=output, sha256=sha256_file(output), meta=meta)


def _meta(output: Path, settings: Quantize, form: Form, calibration: Encoded, regions: list[Region],
          ranges: dict[str, TensorRange], result: FallbackResult | None, conv_means: ConvInputMeans | None) -> dict[str, Any]:
    floats = set(result.float_regions) if result else set()
    kinds = {kind: sum(r.kind == kind and r.name not in floats for r in regions)
             for kind in ("weighted", "residual-add", "embedding")}
    meta: dict[str, Any] = {
        **onnx_facts(output),
        "form": form.name,
        "form_rule": form.rule,
        # how ONNX Runtime must run this file to compute what the deploy runtime computes
        "ort_session_config": dict(form.ort_session_config),
        "placement_rule": PLACEMENT_RULE,
        "method": settings.method,
        "percentile": settings.percentile if settings.method == "percentile" else None,
        "op_types": list(settings.op_types),
        "calibration_samples": len(calibration),
        "calibrated_tensors": len(ranges),
        "calibration_ranges": _range_counts(ranges),
        "regions": len(regions),
        "quantized_regions": kinds,
        "embedding": _embedding_setting(settings),
        "bias_correction": BIAS_CORRECTION_RULE if conv_means is not None else None,
        "algorithm": ALGORITHM,
        "float_regions": _float_region_rows(result) if result else [],
        "fallback_steps": len(result.steps) if result else 0,
        "fallback_max_steps": settings.max_fallback_steps,
    }
    if result is not None:
        meta.update({
            "fallback_tried": [step.to_json() for step in result.steps if not step.kept],
            "fallback_stop": result.stop_reason,
            "tuning_before": summary(result.initial) | {"violations": result.initial.metrics.get("violations", [])},
            "tuning_after": summary(result.final) | {"violations": result.final.metrics.get("violations", [])},
            "tuning_samples": result.final.metrics.get("samples"),
        })
    else:
        meta["fallback_stop"] = "no evaluator: fallback not run"
    return meta
