import math

import numpy as np
import pytest

from pipeline.parity import Gate, accuracy, check_gate, compare, paired_difference_interval, parity_row, unresolved_budget, wilson_interval


def test_identical_logits_are_perfect():
    logits = np.array([[1.0, 2.0, 0.5], [3.0, -1.0, 0.0]])
    result = compare(logits, logits)
    assert result.agreement == 1.0
    assert result.cosine_min == pytest.approx(1.0)
    assert result.max_abs_error == 0.0
    assert math.isinf(result.sqnr_db)


def test_known_values():
    reference = np.array([[1.0, 0.0], [0.0, 1.0]])
    candidate = np.array([[1.0, 0.1], [1.0, 0.0]])  # second sample flips class and is orthogonal
    result = compare(candidate, reference)
    assert result.agreement == 0.5
    assert result.cosine_min == pytest.approx(0.0)
    assert result.cosine_mean == pytest.approx((1 / math.sqrt(1.01) + 0.0) / 2)
    assert result.max_abs_error == pytest.approx(1.0)
    # signal power 2, error power 0.01 + 1 + 1 = 2.01
    assert result.sqnr_db == pytest.approx(10 * math.log10(2 / 2.01))


def test_accuracy_and_row_delta():
    labels = np.array([0, 1, 1, 0])
    reference = np.eye(2)[[0, 1, 1, 0]]
    candidate = np.eye(2)[[0, 1, 0, 0]]
    assert accuracy(reference, labels) == 1.0
    row = parity_row("quantize", candidate, reference, reference, labels)
    assert row.accuracy == 0.75
    assert row.delta_pts == pytest.approx(-25.0)
    assert row.vs_reference.agreement == 0.75


def test_gate_reports_stage_metric_threshold_value_and_knob():
    labels = np.array([0, 1, 1, 0])
    reference = np.eye(2)[[0, 1, 1, 0]]
    candidate = np.eye(2)[[0, 1, 0, 0]]
    row = parity_row("quantize", candidate, reference, reference, labels)
    violations = check_gate(Gate(max_drop_pts=1.0, min_agreement=0.97, knob="turn this"), row)
    assert [v.metric for v in violations] == ["accuracy drop vs reference (points)", "top-1 agreement with the stage's input"]
    message = violations[0].message()
    assert "quantize" in message and "25" in message and "threshold 1" in message and "turn this" in message
    assert check_gate(Gate(max_drop_pts=30.0, min_agreement=0.7), row) == []


def test_accuracy_budget_is_end_to_end_and_fidelity_is_vs_the_stage_input():
    labels = np.array([0, 1, 1, 0])
    reference = np.eye(2)[[0, 1, 1, 0]]
    compressed = np.eye(2)[[0, 1, 0, 0]]  # an earlier stage lost one sample
    row = parity_row("quantize", compressed, reference, previous=compressed, labels=labels)
    # it reproduces its input exactly, but the accuracy drop since the reference still counts
    assert [v.metric for v in check_gate(Gate(max_drop_pts=1.0, min_agreement=1.0), row)] == ["accuracy drop vs reference (points)"]
    assert check_gate(Gate(max_drop_pts=30.0, min_agreement=1.0, max_abs_error=0.0), row) == []


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        compare(np.zeros((2, 3)), np.zeros((3, 3)))


def outcomes(both: int, broken: int, fixed: int, neither: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(candidate logits, reference logits, labels) with the given paired right/wrong counts (2 classes, label 0)."""
    right, wrong = [1.0, 0.0], [0.0, 1.0]
    reference = [right] * both + [right] * broken + [wrong] * fixed + [wrong] * neither
    candidate = [right] * both + [wrong] * broken + [right] * fixed + [wrong] * neither
    return np.array(candidate), np.array(reference), np.zeros(len(reference), dtype=np.int64)


def test_wilson_interval_by_hand():
    # 7 of 10, z = 1.96: (2np + z^2 -+ z sqrt(z^2 + 4np(1-p))) / (2(n + z^2)) = (17.8415 -+ 6.1014) / 27.683
    assert wilson_interval(7, 10) == pytest.approx((0.396778, 0.892209), abs=1e-6)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_paired_interval_by_hand_without_correlation():
    # both 6, broken 2, fixed 1, neither 1 (n = 10): candidate 0.7, reference 0.8, difference -0.1.
    # Wilson: 7/10 -> [0.396778, 0.892209]; 8/10 -> [0.490162, 0.943318].
    # ad - bc = 6 - 2 = 4 > 0, continuity-corrected max(4 - n/2, 0) = 0, so phi = 0 and
    # lower = -0.1 - sqrt((0.7 - 0.396778)^2 + (0.943318 - 0.8)^2) = -0.435386
    # upper = -0.1 + sqrt((0.892209 - 0.7)^2 + (0.8 - 0.490162)^2) = +0.264614
    assert paired_difference_interval(6, 2, 1, 1) == pytest.approx((-0.435386, 0.264614), abs=1e-6)


def test_paired_interval_by_hand_with_correlation():
    # both 40, broken 3, fixed 1, neither 6 (n = 50): candidate 41/50, reference 43/50.
    # phi = (40*6 - 3*1 - 25) / sqrt(43*7*41*9) = 212 / 333.27 = 0.636121
    # Wilson 41/50 -> [0.692039, 0.902298]; 43/50 -> [0.738138, 0.930492]
    # lower = -0.04 - sqrt(0.127961^2 - 2 phi 0.127961 * 0.070492 + 0.070492^2) = -0.139334
    # upper = -0.04 + sqrt(0.082298^2 - 2 phi 0.082298 * 0.121862 + 0.121862^2) = +0.054149
    assert wilson_interval(41, 50) == pytest.approx((0.692039, 0.902298), abs=1e-6)
    assert paired_difference_interval(40, 3, 1, 6) == pytest.approx((-0.139334, 0.054149), abs=1e-6)


def test_row_counts_fixed_and_broken_and_carries_the_interval():
    candidate, reference, labels = outcomes(385, 22, 17, 50)  # the prune stage of issue 11 on 474 eval samples
    row = parity_row("prune", candidate, reference, reference, labels)
    assert (row.paired.samples, row.paired.fixed, row.paired.broken) == (474, 17, 22)
    assert row.delta_pts == pytest.approx(-100 * 5 / 474)
    low, high = row.paired.delta_ci_pts
    assert low < row.delta_pts < high
    # a seeded paired bootstrap of the same outcomes gives [-3.59, +1.48]: the closed form is a little wider, as it should be
    assert low == pytest.approx(-3.73, abs=0.01) and high == pytest.approx(1.60, abs=0.01)
    agree_low, agree_high = row.paired.agreement_ci
    assert agree_low < row.vs_reference.agreement < agree_high


def test_interval_does_not_collapse_when_no_answer_changed():
    candidate, reference, labels = outcomes(400, 0, 0, 74)
    low, high = parity_row("export", candidate, reference, reference, labels).paired.delta_ci_pts
    assert low < -0.1 and high > 0.1  # 0 discordant pairs in 474 do not prove the rate is 0


def test_confidence_gate_fails_where_the_point_gate_passes():
    candidate, reference, labels = outcomes(90, 1, 0, 9)  # a 1-point drop on 100 samples
    row = parity_row("prune", candidate, reference, reference, labels)
    assert check_gate(Gate(max_drop_pts=2.0), row) == []
    (violation,) = check_gate(Gate(max_drop_pts=2.0, mode="confidence", knob="more eval data"), row)
    assert violation.metric.startswith("upper 95% bound") and violation.value > 2.0
    assert "more eval data" in violation.message()
    candidate, reference, labels = outcomes(90_000, 1_000, 0, 9_000)
    big = parity_row("prune", candidate, reference, reference, labels)  # the same 1-point drop on 100,000 samples is resolved
    assert check_gate(Gate(max_drop_pts=2.0, mode="confidence"), big) == []


def test_an_unresolvable_budget_is_said_with_the_samples_it_needs():
    candidate, reference, labels = outcomes(385, 22, 17, 50)
    row = parity_row("prune", candidate, reference, reference, labels)
    line = unresolved_budget(Gate(max_drop_pts=1.0), row)
    assert "474 samples" in line and "1-point budget" in line
    needed = int(line.split("about ")[1].split(" samples")[0])
    assert needed == row.paired.samples_to_resolve(1.0) and needed > 474 * (row.paired.half_width_pts / 1.0) ** 2 - 1
    assert unresolved_budget(Gate(max_drop_pts=5.0), row) is None
    assert unresolved_budget(Gate(min_agreement=0.9), row) is None


def test_agreement_where_the_reference_is_sure_counts_only_those_samples():
    reference = np.array([[5.0, 0.0], [0.1, 0.0], [0.0, 5.0], [0.0, 0.2]])  # sure, unsure, sure, unsure
    candidate = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # agrees on sample 0 only
    row = parity_row("prune", candidate, reference, reference, np.array([0, 0, 1, 1]))
    assert row.paired.confident_samples == 2 and row.paired.confident_agreement == 0.5
    assert row.vs_reference.agreement == 0.25  # 1 of 4 overall, 1 of the 2 sure ones


def test_the_quantize_fallback_tunes_with_margin_above_the_eval_gate():
    from pipeline.stages.quantize import TUNING_AGREEMENT_MARGIN, tuning_gate

    gate = Gate(max_drop_pts=1.0, min_agreement=0.97, knob="k")
    tuned = tuning_gate(gate)
    assert tuned.min_agreement == pytest.approx(0.97 + TUNING_AGREEMENT_MARGIN) and tuned.max_drop_pts == 1.0 and tuned.knob == "k"
    assert tuning_gate(Gate(min_agreement=0.995)).min_agreement == 1.0
    assert tuning_gate(Gate(max_drop_pts=1.0)) == Gate(max_drop_pts=1.0)
    assert tuning_gate(Gate(max_drop_pts=1.0, mode="confidence")).mode == "point"  # calib alone could never resolve the interval
