"""The one ONNX Runtime session factory and the one timing routine (tiny hand-built ONNX models, no training)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pipeline.compression.measure import onnx_cpu_latency_ms
from pipeline.data.encode import InputSpec
from pipeline.runners import OrtRunner, ort_session
from pipeline.side_by_side import Latency, Timing, time_side_by_side
from pipeline.timing import Measurement, WarmUp, time_call, time_interleaved, warm_up

ROOT = Path(__file__).resolve().parents[1]


def _add_one(path: Path) -> Path:
    """y = x + 1 over float32 [batch, 4]."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "add_one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [one])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _fused_shaped(path: Path) -> Path:
    """The exported model's inputs (image, input_ids, attention_mask); logits: the image's channel means."""
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8]),
              helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 16]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", 16])]
    node = helper.make_node("ReduceMean", ["image"], ["logits"], axes=[2, 3], keepdims=0)
    graph = helper.make_graph([node], "fused_shaped", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_session_factory_applies_threads_logging_and_config_entries(tmp_path):
    session = ort_session(_add_one(tmp_path / "add.onnx"), threads=3, session_config={"session.disable_quant_qdq": "1"})
    options = session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level) == (3, 1, 3)
    assert options.get_session_config_entry("session.disable_quant_qdq") == "1"
    assert session.get_providers() == ["CPUExecutionProvider"]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x + 1)


def test_session_factory_takes_a_serialized_model_and_can_profile(tmp_path):
    model = _add_one(tmp_path / "add.onnx").read_bytes()
    session = ort_session(model, threads=1, profile_prefix=tmp_path / "profile")
    assert session.get_session_options().enable_profiling
    session.run(None, {"x": np.zeros((1, 4), np.float32)})
    profile = Path(session.end_profiling())
    assert profile.name.startswith("profile") and profile.stat().st_size > 0


def test_ort_runner_opens_its_session_through_the_factory(tmp_path):
    runner = OrtRunner(_add_one(tmp_path / "add.onnx"), threads=1, session_config={"session.disable_quant_qdq": "1"})
    assert runner.session.get_session_options().get_session_config_entry("session.disable_quant_qdq") == "1"
    assert runner.predict({"x": np.ones((3, 4), np.float32)}).tolist() == [[2.0] * 4] * 3


def test_timing_warms_up_then_makes_exactly_the_runs_asked_for():
    calls = []
    measured = time_call(lambda: calls.append(1), runs=7, warmup=WarmUp(runs=3, seconds=0.0))
    assert isinstance(measured, Measurement) and measured.runs == 7
    assert len(calls) == 3 + 7
    assert 0 <= measured.median_ms <= measured.p90_ms


def test_warm_up_lasts_at_least_its_seconds_and_its_runs():
    start = time.perf_counter()
    runs = warm_up(lambda: time.sleep(0.005), WarmUp(runs=1, seconds=0.05))
    assert time.perf_counter() - start >= 0.05 and runs >= 5
    assert warm_up(lambda: None, WarmUp(runs=4, seconds=0.0)) == 4


def test_interleaved_calls_take_turns_each_turn_warmed_up():
    order: list[str] = []
    measured = time_interleaved([lambda: order.append("a"), lambda: order.append("b")], runs=2, rounds=2,
                                warmup=WarmUp(runs=1, seconds=0.0))
    assert "".join(order) == "aaabbbaaabbb"  # per round: a's warm-up and 2 runs, then b's
    assert [m.runs for m in measured] == [4, 4]


def test_a_sleeping_call_times_near_its_sleep():
    measured = time_call(lambda: time.sleep(0.01), runs=5, warmup=WarmUp(runs=1, seconds=0.0))
    assert 9.5 <= measured.median_ms < 40 and measured.p90_ms >= measured.median_ms


def test_latency_sites_time_a_model_through_the_shared_routine(tmp_path):
    model = _fused_shaped(tmp_path / "fused.onnx")
    spec = InputSpec(image_size=8)
    figures = onnx_cpu_latency_ms(model, spec, batches=(1, 16), threads=1, repeats=3, warmup=1)
    assert set(figures) == {"batch1_ms", "batch16_ms"} and all(v > 0 for v in figures.values())
    (latency,) = time_side_by_side([model], spec, Timing(rounds=2, runs=2, warmup_s=0.0, threads=1))
    assert isinstance(latency, Latency) and set(latency.median_ms) == {1, 16} and latency.size_bytes == model.stat().st_size


@pytest.mark.parametrize("folder", ["pipeline", "benchmarks"])
def test_only_the_factory_opens_an_inference_session(folder):
    opened = sorted(str(path.relative_to(ROOT)) for path in (ROOT / folder).rglob("*.py")
                    if re.search(r"InferenceSession\(", path.read_text(encoding="utf-8")))
    assert opened == (["pipeline/runners.py"] if folder == "pipeline" else [])
