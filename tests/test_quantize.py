"""The quantize stage: Q/DQ form, calibration edge cases, accuracy-aware fallback, determinism.

Small hand-built ONNX graphs (milliseconds to run) and the fused-tiny model
exported once per session; no data set beyond random arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.artifacts import Artifact
from pipeline.data.encode import Encoded
from pipeline.parity import Gate, check_gate, parity_row
from pipeline.quantization.calibrate import TensorRange, calibrate, entropy_threshold, percentile_threshold
from pipeline.quantization.evaluate import evaluation_of, ort_logits
from pipeline.quantization.fallback import SPENT_UPSTREAM, accuracy_aware_fallback
from pipeline.runners import OrtRunner, run_batches
from pipeline.quantization.quantize import make_evaluator, quantize, quantize_settings
from pipeline.store import sha256_file
from pipeline.targets import Quantize, resolve_target

CLASSES = 4
FEATURES = 8
SAMPLES = 64


# ----------------------------------------------------------------- fixtures


def _save(graph: onnx.GraphProto, path: Path) -> Artifact:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Artifact(kind="onnx", path=path, sha256=sha256_file(path))


def _gemm(name: str, data: str, weight: np.ndarray, output: str) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    inits = [numpy_helper.from_array(weight.astype(np.float32), f"{name}.weight"),
             numpy_helper.from_array(np.zeros(weight.shape[1], np.float32), f"{name}.bias")]
    return helper.make_node("Gemm", [data, f"{name}.weight", f"{name}.bias"], [output], name=name), inits


def fragile_model(path: Path) -> Artifact:
    """x -> Gemm 'stem' -> Relu -> Gemm 'spread' -> Gemm 'fragile' -> Gemm 'head' -> logits.

    'spread' writes one huge channel (x 1e4) beside the useful ones; 'fragile' ignores
    that channel, but its input's per-tensor INT8 scale is set by it, so the useful
    channels round to zero: returning 'fragile' to float is the fix.
    """
    rng = np.random.default_rng(0)
    spread = np.eye(FEATURES) + 0.1 * rng.standard_normal((FEATURES, FEATURES))
    spread[:, 0] = 1e4 * np.abs(spread[:, 0])
    fragile = rng.standard_normal((FEATURES, FEATURES))
    fragile[0, :] = 0.0
    nodes, inits = [], []
    for name, data, weight, output in [
        ("stem", "x", rng.standard_normal((FEATURES, FEATURES)), "stem_out"),
        ("spread", "relu_out", spread, "spread_out"),
        ("fragile", "spread_out", fragile, "fragile_out"),
        ("head", "fragile_out", rng.standard_normal((FEATURES, CLASSES)), "logits"),
    ]:
        node, weights = _gemm(name, data, weight, output)
        nodes.append(node)
        inits.extend(weights)
    nodes.insert(1, helper.make_node("Relu", ["stem_out"], ["relu_out"], name="relu"))
    graph = helper.make_graph(nodes, "fragile", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])], inits)
    return _save(graph, path)


def constant_model(path: Path) -> Artifact:
    """A Gemm whose input is a constant (3.0 everywhere) and another whose input is all zeros."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Mul", ["x", "zero"], ["zeros"], name="times_zero"),
        helper.make_node("Add", ["zeros", "three"], ["threes"], name="plus_three"),
    ]
    inits = [numpy_helper.from_array(np.float32(0.0), "zero"), numpy_helper.from_array(np.float32(3.0), "three")]
    for name, data, output in [("on_zeros", "zeros", "a"), ("on_threes", "threes", "b")]:
        node, weights = _gemm(name, data, rng.standard_normal((FEATURES, CLASSES)), output)
        nodes.append(node)
        inits.extend(weights)
    nodes.append(helper.make_node("Add", ["a", "b"], ["logits"], name="sum"))
    graph = helper.make_graph(nodes, "constant", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])], inits)
    return _save(graph, path)


def features(seed: int = 0, samples: int = SAMPLES) -> Encoded:
    x = np.random.default_rng(seed).standard_normal((samples, FEATURES)).astype(np.float32)
    return Encoded(ids=tuple(f"s{i}" for i in range(samples)), inputs={"x": x}, labels=np.zeros(samples, dtype=np.int64))


def reference_logits(artifact: Artifact, data: Encoded) -> np.ndarray:
    return run_batches(OrtRunner(artifact.path), data.batches(16))


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory) -> tuple[Artifact, Encoded]:
    """fused-tiny exported to ONNX (untrained: parity, not accuracy, is under test) and 48 real samples."""
    import torch

    from pipeline.data import load_dataset
    from pipeline.data.encode import encode
    from pipeline.models import build_model, default_config
    from pipeline.export import export_onnx

    torch.manual_seed(0)
    config = default_config("fused-tiny", CLASSES)
    artifact = export_onnx(build_model(config, pretrained=False), config.input_spec(), tmp_path_factory.mktemp("tiny"))
    data = encode(load_dataset("emoji").split("calib")[:48], config.input_spec())
    return artifact, data


def int8_logits(artifact: Artifact, data: Encoded) -> np.ndarray:
    """As the target's runtime computes them (the TensorRT form: dequantize, then the float op)."""
    return ort_logits(artifact.path, data, session_config=artifact.meta.get("ort_session_config"))


@pytest.fixture(scope="module")
def tiny_tensorrt(tiny_fp32, tmp_path_factory) -> Artifact:
    fp32, data = tiny_fp32
    return quantize(fp32, data, Quantize(form="tensorrt", method="entropy"), tmp_path_factory.mktemp("trt"))


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


# ----------------------------------------------------------------- TensorRT form


def test_tensorrt_form_has_symmetric_zero_points_and_per_channel_weight_scales(tiny_tensorrt):
    out = tiny_tensorrt
    model = onnx.load(str(out.path))
    values = _initializers(model)
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dequantize, "no Q/DQ written"
    per_channel_weights = 0
    for node in [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]:
        zero = values[node.input[2]]
        assert zero.dtype == np.int8 and not zero.any(), f"{node.name}: zero point must be INT8 0"
        data_in = values.get(node.input[0])
        if data_in is not None and data_in.ndim == 2 and data_in.shape[0] > 1000:
            continue  # the embedding table: one scale per row, checked below
        if data_in is not None and data_in.dtype == np.int8 and data_in.ndim >= 2:
            assert values[node.input[1]].size > 1, f"{node.name}: weight scale is per-tensor"
            per_channel_weights += 1
    assert per_channel_weights >= 10
    assert out.meta["form"] == "tensorrt" and out.meta["quantized_regions"]["embedding"] == 1
    assert out.meta["quantized_regions"]["residual-add"] == 0, "transformer residual adds stay float"


def test_tensorrt_form_lints_without_errors_for_jetson_and_keeps_parity(tiny_fp32, tiny_tensorrt):
    from pipeline.lint import lint_onnx

    report = lint_onnx(tiny_tensorrt.path, resolve_target("jetson"))
    assert report.ok, report.format_text()
    fp32, data = tiny_fp32
    reference = reference_logits(fp32, data)
    row = parity_row("q", int8_logits(tiny_tensorrt, data), reference, reference, data.labels)
    assert row.vs_reference.cosine_mean > 0.99


def test_cpu_form_uses_u8_activations_and_shrinks_the_embedding(tiny_fp32, tmp_path):
    fp32, data = tiny_fp32
    out = quantize(fp32, data, Quantize(form="cpu", method="percentile"), tmp_path)
    model = onnx.load(str(out.path))
    values = _initializers(model)
    activation_zero_points = {values[n.input[2]].dtype for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert activation_zero_points == {np.dtype(np.uint8)}
    float_relus = sum(node.op_type == "Relu" for node in onnx.load(str(fp32.path)).graph.node)
    assert out.meta["ops"].get("Relu", 0) < float_relus, "ReLU after a conv folds into the U8 range in the CPU form"
    assert out.meta["size_bytes"] < 0.4 * fp32.path.stat().st_size
    logits = int8_logits(out, data)
    reference = reference_logits(fp32, data)
    assert parity_row("q", logits, reference, reference, data.labels).vs_reference.cosine_mean > 0.99


def test_a_form_variant_passed_to_quantize_writes_its_weight_type(tiny_fp32, tmp_path):
    import dataclasses

    from pipeline.quantization.qdq import FORMS

    fp32, data = tiny_fp32
    settings = Quantize(form="cpu", method="minmax")

    def weight_types(form) -> set:
        model = onnx.load(str(quantize(fp32, data, settings, tmp_path / str(form is None), form=form).path))
        values = _initializers(model)
        return {values[n.input[0]].dtype for n in model.graph.node
                if n.op_type == "DequantizeLinear" and n.input[0] in values and values[n.input[0]].ndim >= 2}

    assert weight_types(None) == {np.dtype(np.int8)}  # the shipped cpu form: S8 weights
    unsigned = dataclasses.replace(FORMS["cpu"], reduce_range=False, unsigned_weights=True)
    assert np.dtype(np.uint8) in weight_types(unsigned)


def test_placement_quantizes_conv_residual_adds_and_folds_relu_only_in_the_cpu_form():
    from pipeline.quantization.placement import find_regions

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], name="conv"),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("Conv", ["relu", "w"], ["project"], name="project"),
             helper.make_node("Add", ["project", "x"], ["y"], name="residual")]
    spec = ["batch", 4, 8, 8]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, spec)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, spec)], [weight],
                              value_info=[helper.make_tensor_value_info(n, TensorProto.FLOAT, spec) for n in ("conv", "relu", "project")])
    model = helper.make_model(graph)
    tensorrt = find_regions(model, ("Conv",), residual_adds=True, embedding=True)
    assert [(r.name, r.kind, r.fused) for r in tensorrt] == [
        ("conv", "weighted", ()), ("project", "weighted", ()), ("residual", "residual-add", ())]
    cpu = find_regions(model, ("Conv",), residual_adds=False, embedding=True, fuse_activations=True)
    assert [(r.name, r.fused, r.clip) for r in cpu] == [("conv", ("relu",), (0.0, float("inf"))), ("project", (), None)]


# ----------------------------------------------------------------- calibration


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_calibration_handles_constant_and_zero_tensors(tmp_path, method):
    fp32 = constant_model(tmp_path / "constant.onnx")
    ranges = calibrate(fp32.path, ["zeros", "threes", "x"], features(), method, symmetric=True, percentile=99.9)
    assert ranges["zeros"] == TensorRange(-1.0, 1.0, "zero")
    assert ranges["threes"].highest == pytest.approx(3.0) and ranges["threes"].method == "constant"
    assert 0 < ranges["x"].highest <= np.abs(features().inputs["x"]).max() + 1e-6
    out = quantize(fp32, features(), Quantize(form="tensorrt", method=method, op_types=("Gemm",)), tmp_path / "q")
    logits = int8_logits(out, features())
    np.testing.assert_allclose(logits, reference_logits(fp32, features()), rtol=0.05, atol=0.05)


def test_entropy_and_percentile_thresholds_on_a_long_tail():
    rng = np.random.default_rng(0)
    values = np.abs(np.concatenate([rng.standard_normal(100_000), [60.0]]))
    hist, _ = np.histogram(values, bins=2048, range=(0.0, values.max()))
    assert 3.0 < percentile_threshold(hist, values.max(), 99.99) < 6.0
    assert 2.0 < entropy_threshold(hist, values.max()) < 15.0


# ----------------------------------------------------------------- fallback


def test_fallback_reverts_the_fragile_region_first_and_stops_once_the_gate_holds(tmp_path):
    fp32 = fragile_model(tmp_path / "fragile.onnx")
    tuning = features(seed=1)
    gate = Gate(min_agreement=0.97)
    settings = Quantize(form="tensorrt", method="minmax", op_types=("Gemm",), max_fallback_steps=4)
    naive = quantize(fp32, features(), settings, tmp_path / "naive")
    reference = reference_logits(fp32, tuning)
    assert check_gate(gate, parity_row("q", int8_logits(naive, tuning), reference, reference, tuning.labels))
    out = quantize(fp32, features(), settings, tmp_path / "fallback", make_evaluator(tuning, reference, gate))
    assert [row["name"] for row in out.meta["float_regions"]] == ["fragile"]
    assert out.meta["fallback_steps"] == 1 and out.meta["fallback_stop"] == "gate holds"
    row = out.meta["float_regions"][0]
    assert row["after"]["agreement"] >= 0.97 > row["before"]["agreement"]
    assert row["score"] > 0


def test_the_tuning_gate_counts_the_accuracy_budget_from_the_source_model_as_the_eval_gate_does(tmp_path):
    fp32 = fragile_model(tmp_path / "fragile.onnx")
    tuning = features(seed=1)
    compressed = reference_logits(fp32, tuning)  # the stage's input: the candidate below answers exactly like it
    labels = tuning.labels
    start = 100.0 * float(np.mean(compressed.argmax(1) == labels))
    assert start < 99.0
    source = np.full_like(compressed, -1.0)
    source[np.arange(len(labels)), labels] = 1.0  # a source model right on every tuning sample
    gate = Gate(max_drop_pts=1.0, min_agreement=0.97)
    from_input = make_evaluator(tuning, compressed, gate)(fp32.path)
    from_source = make_evaluator(tuning, compressed, gate, source_logits=source)(fp32.path)
    assert from_input.passes and from_input.metrics["delta_pts"] == 0.0
    assert from_source.metrics["input_accuracy"] == pytest.approx(start / 100.0) and from_source.metrics["fidelity_passes"]
    assert not from_source.passes and from_source.metrics["delta_pts"] == pytest.approx(start - 100.0)
    assert from_source.metrics["violations"] == [check_gate(gate, parity_row("quantize", compressed, source, compressed, labels))[0].message()]
    # fidelity is the stage's own either way: vs its input, exactly
    assert from_input.metrics["agreement"] == from_source.metrics["agreement"] == 1.0
    assert not np.any(from_source.per_sample_error)


def _answers(labels: np.ndarray, wrong: int) -> np.ndarray:
    """Logits right on every sample but the first `wrong`, which they answer with the next class."""
    logits = np.zeros((len(labels), 3), dtype=np.float32)
    answers = labels.copy()
    answers[:wrong] = (labels[:wrong] + 1) % 3
    logits[np.arange(len(labels)), answers] = 4.0
    return logits


@pytest.mark.parametrize("input_wrong, int8_wrong, fidelity_gate, stop", [
    # the input misses the 1-point budget (5 of 100 wrong) and INT8 loses one sample more: no interval resolves that
    (5, 6, 0.97, SPENT_UPSTREAM),
    (5, 5, 0.97, SPENT_UPSTREAM),  # INT8 as accurate as its input
    (5, 15, 0.80, "every region tried"),  # INT8 itself lost 10 points: a loss the tuning set resolves, the fallback tries
    (0, 2, 0.97, "every region tried"),  # the input is within budget: INT8's own 2 samples fail the gate, a step can win them back
    (5, 6, 0.995, "every region tried"),  # the stage's own fidelity fails (agreement 0.99): the fallback tries
])
def test_the_fallback_takes_no_step_for_a_budget_spent_before_quantization(tmp_path, input_wrong, int8_wrong, fidelity_gate, stop):
    labels = np.arange(100) % 3
    source = _answers(labels, 0)
    failing = evaluation_of(_answers(labels, int8_wrong), _answers(labels, input_wrong), labels,
                            Gate(max_drop_pts=1.0, min_agreement=fidelity_gate), source)
    assert not failing.passes
    result = accuracy_aware_fallback(lambda floats: tmp_path / "all-int8.onnx", tmp_path / "fp32.onnx", [],
                                     lambda path: pytest.fail("nothing to evaluate"), 8, features(), measured=failing)
    assert result.stop_reason == stop and result.steps == () and result.float_regions == ()


def test_unmeetable_gate_spends_the_budget_reports_every_step_and_fails_the_gate(tmp_path):
    fp32 = fragile_model(tmp_path / "fragile.onnx")
    tuning = features(seed=1)
    reference = reference_logits(fp32, tuning)
    gate = Gate(max_abs_error=0.0, knob="quantize.max_fallback_steps")  # INT8 cannot be exact
    settings = Quantize(form="tensorrt", method="minmax", op_types=("Gemm",), max_fallback_steps=2)
    out = quantize(fp32, features(), settings, tmp_path / "q", make_evaluator(tuning, reference, gate))
    tried = out.meta["float_regions"] + out.meta["fallback_tried"]
    assert out.meta["fallback_steps"] == 2 == len(tried)
    assert out.meta["fallback_stop"] == "step budget spent" and not out.meta["tuning_after"]["passes"]
    assert out.meta["tuning_after"]["violations"]
    violations = check_gate(gate, parity_row("quantize", int8_logits(out, tuning), reference, reference, tuning.labels))
    # the gate names what failed and the knob to turn (the CLI's exit 3 for it: tests/test_cli.py)
    (violation,) = [v for v in violations if v.metric.startswith("max abs logit error")]
    assert violation.stage == "quantize" and violation.value > violation.threshold == 0.0
    assert "quantize.max_fallback_steps" in violation.message()


# ----------------------------------------------------------------- contract


def test_same_inputs_give_the_same_bytes(tmp_path):
    fp32 = fragile_model(tmp_path / "fragile.onnx")
    tuning = features(seed=1)
    evaluator = make_evaluator(tuning, reference_logits(fp32, tuning), Gate(min_agreement=0.97))
    settings = Quantize(form="cpu", method="entropy", op_types=("Gemm",))
    first = quantize(fp32, features(), settings, tmp_path / "a", evaluator)
    second = quantize(fp32, features(), settings, tmp_path / "b", evaluator)
    assert first.sha256 == second.sha256
    assert first.path == tmp_path / "a" / "model.int8.onnx"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model.int8.onnx"]


def test_settings_key_names_the_algorithm_and_every_setting():
    key = quantize_settings(Quantize())
    assert key["algorithm"] and key["method"] == "percentile" and key["form"] == "tensorrt"
    assert quantize_settings(Quantize(method="entropy")) != key


# ----------------------------------------------------------------- valid ONNX: node order
# The ONNX spec wants graph.node topologically sorted; ONNX Runtime sorts on load and hides a violation,
# onnx.checker (full_check), `polygraphy check lint` and tools that read nodes in file order do not.


def _full_check(path: Path) -> None:
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


@pytest.fixture(scope="module")
def tiny_cpu(tiny_fp32, tmp_path_factory) -> Artifact:
    fp32, data = tiny_fp32
    return quantize(fp32, data, Quantize(form="cpu", method="percentile"), tmp_path_factory.mktemp("cpu"))


@pytest.fixture
def checked_writes(monkeypatch) -> list[Path]:
    """Every INT8 file quantize() writes (the fallback's candidates too), full-checked as it is written."""
    import pipeline.quantization.quantize as stage

    written: list[Path] = []
    write = stage.write_qdq

    def write_and_check(*args, **kwargs) -> Path:
        path = write(*args, **kwargs)
        _full_check(path)
        written.append(path)
        return path

    monkeypatch.setattr(stage, "write_qdq", write_and_check)
    return written


@pytest.mark.parametrize("fallback", [False, True], ids=["no-fallback", "fallback"])
@pytest.mark.parametrize("form", ["tensorrt", "cpu"])
def test_int8_output_and_every_candidate_pass_the_full_onnx_check(tmp_path, checked_writes, form, fallback):
    fp32 = fragile_model(tmp_path / "fragile.onnx")
    tuning = features(seed=1)
    # an unmeetable gate: the fallback spends its budget, so several candidates are written
    evaluator = make_evaluator(tuning, reference_logits(fp32, tuning), Gate(max_abs_error=0.0)) if fallback else None
    settings = Quantize(form=form, method="minmax", op_types=("Gemm",), max_fallback_steps=2)
    out = quantize(fp32, features(), settings, tmp_path / "q", evaluator)
    _full_check(out.path)
    assert len(checked_writes) > (2 if fallback else 0)
    assert out.meta["fallback_steps"] == (2 if fallback else 0)


def test_every_onnx_file_the_pipeline_writes_passes_the_full_onnx_check(tiny_fp32, tiny_tensorrt, tiny_cpu):
    """The fused-tiny FP32 export and its INT8 model in both forms (the TensorRT one is the bundle's)."""
    fp32, _ = tiny_fp32
    for artifact in (fp32, tiny_tensorrt, tiny_cpu):
        _full_check(artifact.path)
        nodes = onnx.load(str(artifact.path)).graph.node
        assert len(nodes) > 50, artifact.path  # the real graph (98 nodes in FP32), embedding and Q/DQ included
    assert tiny_tensorrt.meta["quantized_regions"]["embedding"] == tiny_cpu.meta["quantized_regions"]["embedding"] == 1


def _polygraphy() -> str | None:
    import importlib.util
    import shutil
    import sys

    if importlib.util.find_spec("polygraphy") is None or importlib.util.find_spec("onnx_graphsurgeon") is None:
        return None
    beside = Path(sys.executable).parent / "polygraphy"
    return str(beside) if beside.exists() else shutil.which("polygraphy")


@pytest.mark.skipif(_polygraphy() is None, reason="polygraphy (with onnx_graphsurgeon, which its lint needs) is not installed")
@pytest.mark.parametrize("form", ["tensorrt", "cpu"])
def test_polygraphy_lint_passes_on_the_int8_model(request, tmp_path, form):
    import json
    import subprocess

    artifact = request.getfixturevalue(f"tiny_{form}")
    report = tmp_path / "lint.json"
    run = subprocess.run([_polygraphy(), "check", "lint", str(artifact.path), "-o", str(report)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    entries = json.loads(report.read_text())["lint_entries"]
    assert not [e for e in entries if e.get("level") == "exception"], entries


def _node_multiset(model: onnx.ModelProto) -> list[bytes]:
    return sorted(node.SerializeToString(deterministic=True) for node in model.graph.node)


@pytest.mark.parametrize("form", ["tensorrt", "cpu"])
def test_sorting_moves_nodes_only_and_keeps_the_logits_bit_identical(tmp_path, monkeypatch, form):
    """The output as written before the sort (nodes in the quantizer's order) against the sorted one."""
    import pipeline.quantization.qdq as qdq

    fp32 = fragile_model(tmp_path / "fragile.onnx")
    settings = Quantize(form=form, method="minmax", op_types=("Gemm",))
    sorted_out = quantize(fp32, features(), settings, tmp_path / "sorted")
    monkeypatch.setattr(qdq, "sort_nodes_topologically", lambda graph: False)
    unsorted_out = quantize(fp32, features(), settings, tmp_path / "unsorted")
    before, after = onnx.load(str(unsorted_out.path)), onnx.load(str(sorted_out.path))
    assert [n.name for n in before.graph.node] != [n.name for n in after.graph.node], "the quantizer's order was sorted"
    assert _node_multiset(before) == _node_multiset(after)
    for field in ("input", "output", "initializer", "value_info"):
        assert [x.SerializeToString(deterministic=True) for x in getattr(before.graph, field)] == \
               [x.SerializeToString(deterministic=True) for x in getattr(after.graph, field)], field
    data = features(seed=2)
    assert np.array_equal(int8_logits(unsorted_out, data), int8_logits(sorted_out, data))


def test_topological_sort_is_stable_and_handles_inputs_initializers_and_empty_optional_inputs():
    from pipeline.quantization.topology import sort_nodes_topologically

    spec = ["batch", FEATURES]
    nodes = [
        helper.make_node("Constant", [], ["low"], name="low", value=numpy_helper.from_array(np.float32(-1.0))),
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Clip", ["r", "", "high"], ["c"], name="clip_max_only"),  # "" : the optional min left out
        helper.make_node("Clip", ["c", "low", ""], ["d"], name="clip_min_only"),
        helper.make_node("Add", ["d", "x"], ["y"], name="add"),
    ]
    graph = helper.make_graph(nodes, "order", [helper.make_tensor_value_info("x", TensorProto.FLOAT, spec)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, spec)],
                              [numpy_helper.from_array(np.float32(2.0), "high")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    sorted_bytes = model.SerializeToString(deterministic=True)
    assert sort_nodes_topologically(model.graph) is False
    assert model.SerializeToString(deterministic=True) == sorted_bytes, "a sorted graph keeps its order exactly"

    for order in ([4, 3, 2, 1, 0], [1, 4, 0, 3, 2]):
        shuffled = onnx.ModelProto()
        shuffled.CopyFrom(model)
        shuffled.graph.ClearField("node")
        shuffled.graph.node.extend([nodes[i] for i in order])
        assert sort_nodes_topologically(shuffled.graph) is True
        onnx.checker.check_model(shuffled, full_check=True)
        assert _node_multiset(shuffled) == _node_multiset(model)
        names = [n.name for n in shuffled.graph.node]
        assert names.index("relu") < names.index("clip_max_only") < names.index("clip_min_only") < names.index("add")
        assert names.index("low") < names.index("clip_min_only")
    # nodes already in place stay put: only the one out of order moves (before its first consumer)
    late = onnx.ModelProto()
    late.CopyFrom(model)
    late.graph.ClearField("node")
    late.graph.node.extend([nodes[i] for i in (1, 2, 3, 4, 0)])
    sort_nodes_topologically(late.graph)
    assert [n.name for n in late.graph.node] == ["relu", "clip_max_only", "low", "clip_min_only", "add"]


def test_topological_sort_counts_subgraph_reads_and_rejects_cycles():
    from pipeline.quantization.topology import sort_nodes_topologically

    scalar = []
    branch = lambda name: helper.make_graph(  # noqa: E731
        [helper.make_node("Identity", ["outer"], [f"{name}_out"], name=f"{name}_identity")], name, [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, scalar)])
    nodes = [
        helper.make_node("If", ["flag"], ["y"], name="if", then_branch=branch("then"), else_branch=branch("else")),
        helper.make_node("Neg", ["x"], ["outer"], name="produces_outer"),  # read only inside the branches
    ]
    graph = helper.make_graph(nodes, "scoped", [helper.make_tensor_value_info("flag", TensorProto.BOOL, scalar),
                                                helper.make_tensor_value_info("x", TensorProto.FLOAT, scalar)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, scalar)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert sort_nodes_topologically(model.graph) is True
    assert [n.name for n in model.graph.node] == ["produces_outer", "if"]
    onnx.checker.check_model(model, full_check=True)

    cycle = helper.make_graph([helper.make_node("Neg", ["b"], ["a"], name="first"),
                               helper.make_node("Neg", ["a"], ["b"], name="second")], "cycle", [],
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, scalar)])
    with pytest.raises(ValueError, match="cycle"):
        sort_nodes_topologically(cycle)
