"""Measuring a candidate INT8 model on the tuning set against the reference logits.

The tuning set is the calib split, never the eval split: the fallback tunes on
it, and the eval gate the conductor checks afterwards stays an honest,
unseen measurement. A candidate is judged as that gate judges it: fidelity
against the stage's input (the FP32 model it was given) and the accuracy
budget end to end, from the source model's answers, so what prune and
factorize already spent on the tuning set is not spent again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pipeline.data.encode import Encoded
from pipeline.parity import Gate, accuracy, check_gate, paired, parity_row
from pipeline.runners import ort_session

EVAL_BATCH = 16


@dataclass(frozen=True)
class Evaluation:
    """A candidate's standing on the tuning set."""

    passes: bool  # the gate holds on the tuning set
    per_sample_error: np.ndarray  # normalized squared logit error per sample (0 = identical to the reference)
    metrics: dict = field(default_factory=dict)  # accuracy, delta_pts, agreement, ... and the violations


Evaluator = Callable[[Path], Evaluation]


def normalized_error(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per sample: |candidate - reference|^2 / |reference|^2 (scale-free, so samples compare)."""
    difference = candidate.astype(np.float64) - reference.astype(np.float64)
    power = np.sum(reference.astype(np.float64) ** 2, axis=1)
    return np.sum(difference**2, axis=1) / np.maximum(power, 1e-12)


def evaluation_of(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray, gate: Gate,
                  source: np.ndarray | None = None) -> Evaluation:
    """reference: the stage input's logits (fidelity, the per-sample error); source: the logits the accuracy
    budget counts from (the source model's; None: the reference's)."""
    row = parity_row("quantize", logits, reference if source is None else source, reference, labels)
    violations = check_gate(gate, row)
    errors = normalized_error(logits, reference)
    metrics: dict[str, Any] = {
        "samples": int(len(labels)),
        "accuracy": row.accuracy,
        "reference_accuracy": row.accuracy - row.delta_pts / 100.0,
        "input_accuracy": accuracy(reference, labels),
        "delta_pts": row.delta_pts,
        "agreement": row.vs_previous.agreement,
        "cosine_min": row.vs_previous.cosine_min,
        "sqnr_db": row.vs_previous.to_json()["sqnr_db"],
        "mean_error": float(np.mean(errors)),
        "violations": [v.message() for v in violations],
        # the gate without its accuracy budget: the stage's own fidelity to its input
        "fidelity_passes": not check_gate(replace(gate, max_drop_pts=None), row),
        # the stage's input against the accuracy budget alone, and the candidate's own accuracy change vs that input
        # (95% paired interval, points): the fallback does not chase a budget its input already missed by noise
        "input_within_budget": not check_gate(Gate(max_drop_pts=gate.max_drop_pts, mode=gate.mode),
                                              parity_row("input", reference, reference if source is None else source, reference, labels)),
        "own_delta_ci_pts": [float(v) for v in paired(logits, reference, labels).delta_ci_pts],
    }
    return Evaluation(passes=not violations, per_sample_error=errors, metrics=metrics)


def ort_logits(path: Path, data: Encoded, threads: int = 2, session_config: Mapping[str, str] | None = None) -> np.ndarray:
    """Logits of an ONNX file over data with ONNX Runtime's CPU EP and extra session config entries."""
    session = ort_session(path, threads, session_config)
    names = [i.name for i in session.get_inputs()]
    outputs = [session.run(None, {name: np.ascontiguousarray(batch[name]) for name in names})[0]
               for batch in data.batches(EVAL_BATCH)]
    return np.concatenate(outputs, axis=0).astype(np.float32)


class TuningEvaluator:
    """Evaluator over a tuning set; also runs a subset of it (the fallback's ranking samples).

    session_config: ONNX Runtime session entries the candidate runs with; the
    TensorRT form runs with "session.disable_quant_qdq" so ONNX Runtime computes
    what TensorRT does (dequantize, float op) instead of its own x86 INT8 kernels.
    """

    def __init__(self, tuning: Encoded, reference_logits: np.ndarray, gate: Gate, threads: int = 2,
                 session_config: Mapping[str, str] | None = None, source_logits: np.ndarray | None = None):
        for name, rows in (("reference", reference_logits), ("source", source_logits)):
            if rows is not None and len(tuning) != len(rows):
                raise ValueError(f"{len(tuning)} tuning samples but {len(rows)} {name} rows")
        self.tuning = tuning
        self.reference = np.asarray(reference_logits, dtype=np.float32)
        self.source = None if source_logits is None else np.asarray(source_logits, dtype=np.float32)
        self.gate = gate
        self.threads = threads
        self.session_config = dict(session_config or {})

    def logits(self, path: Path) -> np.ndarray:
        return ort_logits(Path(path), self.tuning, self.threads, self.session_config)

    def __call__(self, path: Path) -> Evaluation:
        return evaluation_of(self.logits(path), self.reference, self.tuning.labels, self.gate, self.source)

    def subset(self, indices: Sequence[int]) -> "TuningEvaluator":
        index = np.asarray(indices, dtype=np.int64)
        return TuningEvaluator(self.tuning.subset(index), self.reference[index], self.gate, self.threads,
                               self.session_config, None if self.source is None else self.source[index])

    def with_session_config(self, session_config: Mapping[str, str]) -> "TuningEvaluator":
        return TuningEvaluator(self.tuning, self.reference, self.gate, self.threads, session_config, self.source)


def make_evaluator(tuning: Encoded, reference_logits: np.ndarray, gate: Gate, threads: int = 2,
                   source_logits: np.ndarray | None = None) -> Evaluator:
    """The conductor's evaluator: an ONNX file -> its Evaluation on the tuning set.

    reference_logits: the stage input's answers on the tuning set; source_logits: the source model's, where the
    accuracy budget is end to end and the input is a compressed model (None: the budget counts from the input)."""
    return TuningEvaluator(tuning, reference_logits, gate, threads, source_logits=source_logits)
