"""Parity metrics between two sets of logits, ledger rows, their intervals and gates.

Every stage's artifact runs on the same frozen eval split; its logits are
compared with the reference (stage 0) and with the previous stage. Gates are
checked against the reference so that drops cannot accumulate unseen.

A small eval set cannot resolve a small drop: on 474 samples one sample is
0.21 points. So every row also carries the paired statistics of the drop:
the samples the stage fixed and broke (the only ones that move the
difference) and a 95% interval for the accuracy difference, Newcombe's hybrid
score interval for paired proportions (Newcombe 1998, method 10: Wilson
intervals of both accuracies, combined with the pairs' correlation). It is
closed-form and deterministic (the same logits give the same interval on
every machine) and, unlike a bootstrap or an interval built from the
discordant pairs alone, it does not shrink to zero width when a stage
happens to change no answer on the eval set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
import math
from typing import Any, Literal, Mapping

import numpy as np

_EPS = 1e-12
Z_95 = 1.959963984540054  # two-sided 95% normal quantile


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


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes / n."""
    if n <= 0:
        raise ValueError("an interval of an empty set is undefined")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference_interval(both: int, broken: int, fixed: int, neither: int, z: float = Z_95) -> tuple[float, float]:
    """95% interval of p_candidate - p_reference for paired right/wrong outcomes (Newcombe's method 10).

    both: right in both; broken: right in the reference only; fixed: right in
    the candidate only; neither: wrong in both.
    """
    n = both + broken + fixed + neither
    p_candidate, p_reference = (both + fixed) / n, (both + broken) / n
    l1, u1 = wilson_interval(both + fixed, n, z)
    l2, u2 = wilson_interval(both + broken, n, z)
    denominator = (both + broken) * (fixed + neither) * (both + fixed) * (broken + neither)
    phi = 0.0
    if denominator > 0:
        numerator = both * neither - broken * fixed
        if numerator > 0:  # Newcombe's continuity correction of the correlation
            numerator = max(numerator - n / 2, 0.0)
        phi = numerator / math.sqrt(denominator)
    difference = p_candidate - p_reference
    below = math.sqrt(max((p_candidate - l1) ** 2 - 2 * phi * (p_candidate - l1) * (u2 - p_reference) + (u2 - p_reference) ** 2, 0.0))
    above = math.sqrt(max((u1 - p_candidate) ** 2 - 2 * phi * (u1 - p_candidate) * (p_reference - l2) + (p_reference - l2) ** 2, 0.0))
    return max(-1.0, difference - below), min(1.0, difference + above)


@dataclass(frozen=True)
class Paired:
    """The accuracy change vs the reference, sample by sample, with its 95% interval."""

    samples: int
    fixed: int  # wrong in the reference, right here
    broken: int  # right in the reference, wrong here
    delta_ci_pts: tuple[float, float]  # 95% interval of the accuracy change in points (negative: worse)
    agreement_ci: tuple[float, float]  # 95% Wilson interval of top-1 agreement with the reference
    # Agreement on the samples the reference is sure of (top-1 probability ahead of the second by CONFIDENT_MARGIN):
    # a compressed model's disagreements gather where the reference's own answer is close to a coin flip.
    confident_samples: int = 0
    confident_agreement: float | None = None

    @property
    def half_width_pts(self) -> float:
        return (self.delta_ci_pts[1] - self.delta_ci_pts[0]) / 2

    def samples_to_resolve(self, budget_pts: float) -> int:
        """About how many eval samples would make the interval's half-width equal budget_pts (width scales as 1/sqrt(n))."""
        return math.ceil(self.samples * (self.half_width_pts / max(budget_pts, 1e-9)) ** 2)

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "fixed": self.fixed, "broken": self.broken,
                "delta_ci_pts": [round(v, 4) for v in self.delta_ci_pts], "agreement_ci": [round(v, 6) for v in self.agreement_ci],
                "interval": "95%, Newcombe hybrid score (paired); agreement: Wilson",
                "confident_samples": self.confident_samples, "confident_margin": CONFIDENT_MARGIN,
                "confident_agreement": None if self.confident_agreement is None else round(self.confident_agreement, 6)}


CONFIDENT_MARGIN = 0.5  # top-1 minus top-2 softmax probability of the reference


def confident(reference: np.ndarray, margin: float = CONFIDENT_MARGIN) -> np.ndarray:
    """Which samples the reference answers with at least `margin` between its two most likely classes."""
    shifted = reference.astype(np.float64) - reference.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    top = np.sort(probabilities, axis=1)
    return top[:, -1] - (top[:, -2] if top.shape[1] > 1 else 0.0) >= margin


def paired(candidate: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> Paired:
    right = np.argmax(candidate, axis=1) == labels
    right_before = np.argmax(reference, axis=1) == labels
    both, broken = int(np.sum(right & right_before)), int(np.sum(~right & right_before))
    fixed, neither = int(np.sum(right & ~right_before)), int(np.sum(~right & ~right_before))
    low, high = paired_difference_interval(both, broken, fixed, neither)
    same = np.argmax(candidate, axis=1) == np.argmax(reference, axis=1)
    sure = confident(reference)
    return Paired(len(labels), fixed, broken, (100.0 * low, 100.0 * high), wilson_interval(int(np.sum(same)), len(labels)),
                  int(np.sum(sure)), float(np.mean(same[sure])) if sure.any() else None)


@dataclass(frozen=True)
class ParityRow:
    """One ledger row: a stage's artifact measured on the eval split."""

    stage: str
    accuracy: float
    delta_pts: float  # accuracy change against the reference, in percentage points
    vs_reference: Comparison
    vs_previous: Comparison
    paired: Paired  # vs the reference: fixed/broken samples and the 95% intervals

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "accuracy": self.accuracy,
            "delta_pts": self.delta_pts,
            "vs_reference": self.vs_reference.to_json(),
            "vs_previous": self.vs_previous.to_json(),
            "paired": self.paired.to_json(),
        }


def parity_row(stage: str, logits: np.ndarray, reference: np.ndarray, previous: np.ndarray, labels: np.ndarray) -> ParityRow:
    acc = accuracy(logits, labels)
    return ParityRow(
        stage=stage,
        accuracy=acc,
        delta_pts=100.0 * (acc - accuracy(reference, labels)),
        vs_reference=compare(logits, reference),
        vs_previous=compare(logits, previous),
        paired=paired(logits, reference, labels),
    )


GateMode = Literal["point", "confidence"]


@dataclass(frozen=True)
class Gate:
    """Thresholds a stage must meet (see check_gate for against what); None means unchecked.

    mode "point" judges the accuracy drop's point estimate; "confidence" fails
    unless the whole 95% interval of the drop is within max_drop_pts (for eval
    sets large enough to resolve the budget).
    """

    max_drop_pts: float | None = None
    min_agreement: float | None = None
    max_abs_error: float | None = None
    min_cosine: float | None = None
    knob: str = ""  # what the user can turn when this gate fails
    mode: GateMode = "point"

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
    if gate.max_drop_pts is not None and gate.mode == "confidence" and -row.paired.delta_ci_pts[0] > gate.max_drop_pts:
        found.append(Violation(row.stage, "upper 95% bound of the accuracy drop vs reference (points)", gate.max_drop_pts,
                               -row.paired.delta_ci_pts[0], gate.knob))
    elif gate.max_drop_pts is not None and -row.delta_pts > gate.max_drop_pts:
        found.append(Violation(row.stage, "accuracy drop vs reference (points)", gate.max_drop_pts, -row.delta_pts, gate.knob))
    if gate.min_agreement is not None and own.agreement < gate.min_agreement:
        found.append(Violation(row.stage, "top-1 agreement with the stage's input", gate.min_agreement, own.agreement, gate.knob))
    if gate.max_abs_error is not None and own.max_abs_error > gate.max_abs_error:
        found.append(Violation(row.stage, "max abs logit error vs the stage's input", gate.max_abs_error, own.max_abs_error, gate.knob))
    if gate.min_cosine is not None and own.cosine_min < gate.min_cosine:
        found.append(Violation(row.stage, "min logit cosine vs the stage's input", gate.min_cosine, own.cosine_min, gate.knob))
    return found


def unresolved_budget(gate: Gate, row: ParityRow) -> str | None:
    """A line saying so when the eval set is too small to resolve the gate's accuracy budget, else None."""
    if gate.max_drop_pts is None or row.paired.half_width_pts <= gate.max_drop_pts:
        return None
    low, high = row.paired.delta_ci_pts
    needed = (f"about {row.paired.samples_to_resolve(gate.max_drop_pts)} samples would resolve it" if gate.max_drop_pts > 0
              else "no eval set resolves a 0-point budget (any interval has a width)")
    return (f"{row.stage}: the eval set ({row.paired.samples} samples) cannot resolve the {gate.max_drop_pts:g}-point budget: "
            f"the 95% interval of the change is [{low:+.2f}, {high:+.2f}] points (±{row.paired.half_width_pts:.2f}); {needed}")
