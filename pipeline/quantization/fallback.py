"""Accuracy-aware fallback: return the most harmful INT8 regions to float until the gate holds.

The idea INC and NNCF use, in three moves per step:

1. rank on the samples that suffer most: the RANKING_SAMPLES tuning samples
   with the largest INT8-vs-reference logit error;
2. screen every quantized region with one instrumented run of the FP32 and the
   current INT8 model on those samples: a region's proxy score is the error it
   adds (normalized MSE at its output minus the worst at its inputs);
3. confirm the SHORTLIST best-scored regions by measuring each one returned to
   float on the ranking samples, and keep the one that buys the most.

The step is then measured on the whole tuning set; a step that neither raises
the top-1 agreement nor (at equal agreement) lowers the mean error is undone and its region not tried again (the next step
re-ranks from the current model). Stops when the gate holds, the step budget
is spent or no region is left. No randomness: ties break by region name.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pipeline.data.encode import Encoded
from pipeline.progress import track
from pipeline.quantization.calibrate import CALIBRATION_BATCH, run_with_intermediates
from pipeline.quantization.evaluate import Evaluation, Evaluator, TuningEvaluator
from pipeline.quantization.placement import Region

log = logging.getLogger(__name__)
RANKING_SAMPLES = 32
SHORTLIST = 4

Builder = Callable[[frozenset[str]], Path]  # names of regions kept in float -> an INT8 ONNX file


@dataclass(frozen=True)
class FallbackStep:
    """One region returned to float (or tried and undone) and what it bought on the tuning set."""

    step: int
    region: Region
    proxy_score: float  # error the region adds on the ranking samples (normalized MSE, output minus inputs)
    ranking_gain: float  # drop of the mean error on the ranking samples when it is in float
    before: Mapping[str, Any]
    after: Mapping[str, Any]
    kept: bool

    def to_json(self) -> dict[str, Any]:
        return {**self.region.to_json(), "step": self.step, "score": self.proxy_score, "ranking_gain": self.ranking_gain,
                "before": dict(self.before), "after": dict(self.after), "kept": self.kept}


@dataclass(frozen=True)
class FallbackResult:
    path: Path
    float_regions: tuple[str, ...]
    steps: tuple[FallbackStep, ...]
    initial: Evaluation
    final: Evaluation
    stop_reason: str
    notes: tuple[str, ...] = field(default=())


def summary(evaluation: Evaluation) -> dict[str, Any]:
    keys = ("accuracy", "delta_pts", "agreement", "mean_error")
    return {key: evaluation.metrics[key] for key in keys if key in evaluation.metrics} | {"passes": evaluation.passes}


SPENT_UPSTREAM = ("the accuracy budget was spent before this stage: its input misses it on the tuning set, and the INT8 model "
                  "lost no accuracy against that input that the tuning set can resolve")


def _spent_upstream(evaluation: Evaluation) -> bool:
    """The gate fails on its accuracy budget alone, its input (all regions in float) misses that budget too, and the
    INT8 model's own accuracy change against the input is no loss the tuning set resolves (its 95% interval reaches 0).

    Returning regions to float moves the model towards that input, so no step can make the gate hold; a step could
    only win back samples that the tuning set cannot tell from noise. On the default build that was one of 284 calib
    samples, for three steps (30 s, 1.4 GB of peak memory) that kept a region without moving a gate's metric.
    A loss the interval resolves is still worth trying to win back: the eval gate counts it too."""
    metrics = evaluation.metrics
    _, own_high = metrics.get("own_delta_ci_pts", (-100.0, -100.0))
    return (not evaluation.passes and bool(metrics.get("fidelity_passes")) and metrics.get("input_within_budget") is False
            and own_high >= 0.0)


def _standing(evaluation: Evaluation) -> tuple[float, float]:
    """How close a candidate is to the gate: top-1 agreement first, then (lower) mean logit error."""
    agreement = evaluation.metrics.get("agreement", 0.0)
    return (round(float(agreement), 9), -float(np.mean(evaluation.per_sample_error)))


def worst_samples(errors: np.ndarray, count: int = RANKING_SAMPLES) -> np.ndarray:
    """Indices of the largest errors, largest first; ties by index (stable)."""
    order = np.argsort(-errors, kind="stable")
    return np.sort(order[: min(count, len(errors))])


def _error_ratios(reference_model: Path, quantized_model: Path, tensors: Sequence[str], data: Encoded,
                  session_config: Mapping[str, str] | None, clips: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """nMSE of each tensor in the INT8 model against the FP32 model, accumulated batch by batch (memory stays flat).

    clips: tensors whose activation the INT8 graph folded into its Q range, with the bounds to apply first.
    """
    error = dict.fromkeys(tensors, 0.0)
    power = dict.fromkeys(tensors, 0.0)
    batches = list(data.batches(CALIBRATION_BATCH))
    reference_runs = run_with_intermediates(reference_model, tensors, batches)
    quantized_runs = run_with_intermediates(quantized_model, tensors, batches, session_config=session_config)
    for reference, quantized in zip(reference_runs, quantized_runs):
        for name in tensors:
            expected = np.asarray(reference[name], dtype=np.float64)
            actual = np.asarray(quantized[name], dtype=np.float64)
            if name in clips:
                actual = np.clip(actual, *clips[name])
            error[name] += float(np.sum((actual - expected) ** 2))
            power[name] += float(np.sum(expected**2))
    return {name: error[name] / max(power[name], 1e-12) for name in tensors}


def proxy_scores(reference_model: Path, quantized_model: Path, regions: Sequence[Region], data: Encoded,
                 session_config: Mapping[str, str] | None = None,
                 clips: Mapping[str, tuple[float, float]] | None = None) -> dict[str, float]:
    """Error each region adds in the current INT8 model: nMSE at its output minus the worst nMSE at its inputs."""
    tensors = sorted({t for region in regions for t in (*region.activations, region.output)})
    error = _error_ratios(reference_model, quantized_model, tensors, data, session_config, clips or {})
    return {region.name: error[region.output] - max((error[t] for t in region.activations), default=0.0)
            for region in regions}


def _shortlist(scores: Mapping[str, float], count: int) -> list[str]:
    return [name for name, _ in sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:count]]


def _pick(build: Builder, floats: frozenset[str], shortlist: list[str], ranking: Evaluator | None,
          baseline: float) -> tuple[str, Path, float]:
    """The shortlisted region whose return to float lowers the ranking error most (or the top one unmeasured)."""
    if ranking is None:
        return shortlist[0], build(floats | {shortlist[0]}), float("nan")
    best: tuple[str, Path, float] | None = None
    for name in track(shortlist, desc=f"fallback: measuring {len(shortlist)} candidates", unit="candidate", leave=False):
        path = build(floats | {name})
        gain = baseline - float(np.mean(ranking(path).per_sample_error))
        if best is None or gain > best[2]:
            best = (name, path, gain)
    return best


def accuracy_aware_fallback(build: Builder, reference_model: Path, regions: Sequence[Region], evaluator: Evaluator,
                            max_steps: int, probe_data: Encoded,
                            session_config: Mapping[str, str] | None = None, measured: Evaluation | None = None) -> FallbackResult:
    """Return regions to float one at a time until evaluator passes or max_steps are spent.

    probe_data: inputs for the proxy ranking when the evaluator cannot run a subset of its tuning set.
    session_config: how ONNX Runtime runs the INT8 candidates (see qdq.Form.ort_session_config).
    measured: the evaluator's figures for the all-INT8 model, where the caller has them already.
    """
    started = time.monotonic()
    by_name = {region.name: region for region in regions}
    floats: frozenset[str] = frozenset()
    current = build(floats)
    initial = evaluation = measured if measured is not None else evaluator(current)
    steps: list[FallbackStep] = []
    rejected: set[str] = set()
    stop_reason = "gate holds without fallback" if evaluation.passes else SPENT_UPSTREAM if _spent_upstream(evaluation) else "step budget spent"
    while not evaluation.passes and not _spent_upstream(evaluation) and len(steps) < max_steps:
        candidates = [r for r in regions if r.name not in floats and r.name not in rejected]
        if not candidates:
            stop_reason = "every region tried"
            break
        ranking_indices = worst_samples(evaluation.per_sample_error)
        ranking = evaluator.subset(ranking_indices) if isinstance(evaluator, TuningEvaluator) else None
        data = ranking.tuning if ranking is not None else probe_data
        clips = {r.output: r.clip for r in regions if r.clip is not None and r.name not in floats}
        scores = proxy_scores(reference_model, current, candidates, data, session_config, clips)
        baseline = float(np.mean(evaluation.per_sample_error[ranking_indices]))
        name, path, gain = _pick(build, floats, _shortlist(scores, SHORTLIST), ranking, baseline)
        after = evaluator(path)
        kept = after.passes or _standing(after) > _standing(evaluation)
        steps.append(FallbackStep(len(steps) + 1, by_name[name], scores[name], gain, summary(evaluation), summary(after), kept))
        log.info("fallback step %d: %s %s to float (score %.3g): %s -> %s%s [%.0f s]", len(steps), by_name[name].op_type,
                 name, scores[name], summary(evaluation), summary(after), "" if kept else " (no help: undone)",
                 time.monotonic() - started)
        if kept:
            floats, current, evaluation = floats | {name}, path, after
        else:
            rejected.add(name)
        if evaluation.passes:
            stop_reason = "gate holds"
        elif _spent_upstream(evaluation):
            stop_reason = SPENT_UPSTREAM
    return FallbackResult(path=current, float_regions=tuple(r.name for r in regions if r.name in floats),
                          steps=tuple(steps), initial=initial, final=evaluation, stop_reason=stop_reason)
