"""Parity metrics between two sets of logits, ledger rows and gates.

Every stage's artifact runs on the same frozen eval split; its logits are
compared with the reference (stage 0) and with the previous stage. Gates are
checked against the reference so that drops cannot accumulate unseen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

_EPS = 1e-12


@dataclass(frozen=True)
class Comparison:
    """How closely candidate logits follow other logits, sample by sample."""

    agreement: float  # fraction of samples with the same top-1 class
    cosine_mean: float
    cosine_min: float
    max_abs_error: float
    sqnr_db: float  # 10*log10(signal power / error power); inf when identical

    def to_json(self) -> dict[str, float]:
        return {k: _finite_or_str(v) for k, v in asdict(self).items()}


def _finite_or_str(value: float) -> float | str:
    return value if np.isfinite(value) else ("inf" if value > 0 else "-inf")


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def compare(candidate: np.ndarray, reference: np.ndarray) -> Comparison:
    """Compare two [N, C] logit arrays."""
    if candidate.shape != reference.shape:
        raise ValueError(f"logit shapes differ: {candidate.shape} vs {reference.shape}")
    cand = candidate.astype(np.float64)
    ref = reference.astype(np.float64)
    agreement = float(np.mean(np.argmax(cand, axis=1) == np.argmax(ref, axis=1)))
    dots = np.sum(cand * ref, axis=1)
    norms = np.linalg.norm(cand, axis=1) * np.linalg.norm(ref, axis=1)
    cosines = np.where(norms > _EPS, dots / np.maximum(norms, _EPS), 1.0)
    error = cand - ref
    noise = float(np.sum(error**2))
    signal = float(np.sum(ref**2))
    sqnr = float("inf") if noise == 0.0 else 10.0 * np.log10(max(signal, _EPS) / noise)
    return Comparison(
        agreement=agreement,
        cosine_mean=float(np.mean(cosines)),
        cosine_min=float(np.min(cosines)),
        max_abs_error=float(np.max(np.abs(error))),
        sqnr_db=sqnr,
    )


@dataclass(frozen=True)
class ParityRow:
    """One ledger row: a stage's artifact measured on the eval split."""

    stage: str
    accuracy: float
    delta_pts: float  # accuracy change against the reference, in percentage points
    vs_reference: Comparison
    vs_previous: Comparison

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "accuracy": self.accuracy,
            "delta_pts": self.delta_pts,
            "vs_reference": self.vs_reference.to_json(),
            "vs_previous": self.vs_previous.to_json(),
        }


def parity_row(stage: str, logits: np.ndarray, reference: np.ndarray, previous: np.ndarray, labels: np.ndarray) -> ParityRow:
    acc = accuracy(logits, labels)
    return ParityRow(
        stage=stage,
        accuracy=acc,
        delta_pts=100.0 * (acc - accuracy(reference, labels)),
        vs_reference=compare(logits, reference),
        vs_previous=compare(logits, previous),
    )


@dataclass(frozen=True)
class Gate:
    """Thresholds a stage must meet (see check_gate for against what); None means unchecked."""

    max_drop_pts: float | None = None
    min_agreement: float | None = None
    max_abs_error: float | None = None
    min_cosine: float | None = None
    knob: str = ""  # what the user can turn when this gate fails

    @staticmethod
    def from_mapping(data: Mapping[str, Any]) -> "Gate":
        return Gate(**dict(data))


@dataclass(frozen=True)
class Violation:
    stage: str
    metric: str
    threshold: float
    value: float
    knob: str

    def message(self) -> str:
        text = (
            f"parity gate failed at stage '{self.stage}': {self.metric} = {self.value:.6g} "
            f"(threshold {self.threshold:.6g})"
        )
        return text + (f"; to change this: {self.knob}" if self.knob else "")


def check_gate(gate: Gate, row: ParityRow) -> list[Violation]:
    """The thresholds this row breaks, worst first by order of importance.

    The accuracy budget is end to end (drop vs the reference, the trained
    model); fidelity (agreement, max abs error, cosine) is the stage's own,
    vs its input (the previous stage): export and quantization must
    reproduce the model they were given, compressed or not.
    """
    found: list[Violation] = []
    own = row.vs_previous
    if gate.max_drop_pts is not None and -row.delta_pts > gate.max_drop_pts:
        found.append(Violation(row.stage, "accuracy drop vs reference (points)", gate.max_drop_pts, -row.delta_pts, gate.knob))
    if gate.min_agreement is not None and own.agreement < gate.min_agreement:
        found.append(Violation(row.stage, "top-1 agreement with the stage's input", gate.min_agreement, own.agreement, gate.knob))
    if gate.max_abs_error is not None and own.max_abs_error > gate.max_abs_error:
        found.append(Violation(row.stage, "max abs logit error vs the stage's input", gate.max_abs_error, own.max_abs_error, gate.knob))
    if gate.min_cosine is not None and own.cosine_min < gate.min_cosine:
        found.append(Violation(row.stage, "min logit cosine vs the stage's input", gate.min_cosine, own.cosine_min, gate.knob))
    return found
