import math

import numpy as np
import pytest

from pipeline.parity import Gate, accuracy, check_gate, compare, parity_row


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
