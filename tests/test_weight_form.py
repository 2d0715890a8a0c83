"""INT8 weights for TensorRT 8.x (pipeline/quantization/weight_form.py): float -> QuantizeLinear -> DequantizeLinear.

A small Q/DQ graph built here (a per-axis and a per-tensor INT8 weight, an asymmetric UINT8 weight, one without a
zero point, a weight two DequantizeLinears share, and an INT8 embedding table dequantized per row into a Gather)
checks the rewrite: QuantizeLinear (ONNX Runtime's) gives each INT8 weight back exactly, ONNX Runtime's outputs do
not change, the model passes onnx's full check and no INT8 initializer feeds a DequantizeLinear afterwards. Which
targets get it comes from the lint's version fact; every other target keeps its quantize config (and key). One
small real build (fused-tiny, one epoch, no compression, 4 emoji per class) for the shipped Xavier target runs
through the CLI in-process and must exit 0 with a bundle whose lint has no errors.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import write_emoji_folder, write_target
from pipeline.artifacts import Artifact
from pipeline.cli import main
from pipeline.lint import PREQUANTIZED_WEIGHTS_SINCE, lint_model, lint_onnx, takes_prequantized_weights
from pipeline.parity import Gate
from pipeline.quantization.topology import sort_nodes_topologically
from pipeline.quantization.weight_form import FLOAT_QDQ, requantize_from_float, weight_form_for
from pipeline.stages import quantize as quantize_stage
from pipeline.store import cache_key
from pipeline.targets import available_targets, load_target_file, resolve_target

XAVIER = "jetson-xavier-nx"
OPSET = 17  # what the Xavier export is lowered to (pipeline/onnx_compat.py)
TOLERANCE = 1e-7  # max abs difference of ONNX Runtime's outputs after the rewrite (the same arithmetic: expect 0)
QDQ_IN_FLOAT = {"session.disable_quant_qdq": "1"}  # how parity measures the TensorRT form (qdq.py FORMS["tensorrt"])
INTEGER_TYPES = (TensorProto.INT8, TensorProto.UINT8)


# ------------------------------------------------------------------ a small Q/DQ model


def tensor(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def dequantize(data: str, scale: str, zero_point: str | None, output: str, **attrs) -> onnx.NodeProto:
    inputs = [data, scale] + ([zero_point] if zero_point else [])
    return helper.make_node("DequantizeLinear", inputs, [output], name=f"{output}_dequantize", **attrs)


def qdq_model() -> onnx.ModelProto:
    """x[N,4] -> Q/DQ -> MatMul(per-axis w1) -> MatMul(per-tensor w2) -> MatMul(UINT8 w3, zero point 128)
    -> MatMul(w4, no zero point) -> y[N,2]; ids[N,2] -> Gather(per-row INT8 table) -> rows[N,2,4]; w2 is
    dequantized twice (a second MatMul reads it too: y2b)."""
    rng = np.random.default_rng(0)
    int8 = lambda shape: rng.integers(-127, 128, shape).astype(np.int8)
    inits = [
        tensor("x_scale", np.float32(0.02)), tensor("zero", np.int8(0)),
        tensor("w1_q", int8((4, 3))), tensor("w1_scale", rng.uniform(0.001, 0.05, 3).astype(np.float32)),
        tensor("w1_zero", np.zeros(3, np.int8)),
        tensor("w2_q", int8((3, 3))), tensor("w2_scale", np.float32(0.0137)),
        tensor("w3_q", rng.integers(0, 256, (3, 2)).astype(np.uint8)), tensor("w3_scale", np.float32(0.011)),
        tensor("w3_zero", np.uint8(128)),
        tensor("w4_q", int8((2, 2))), tensor("w4_scale", np.float32(0.0291)),
        tensor("table_q", int8((10, 4))), tensor("table_scale", rng.uniform(0.001, 0.1, 10).astype(np.float32)),
        tensor("table_zero", np.zeros(10, np.int8)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "zero"], ["x_q"], name="x_quantize"),
        dequantize("x_q", "x_scale", "zero", "x_dq"),
        dequantize("w1_q", "w1_scale", "w1_zero", "w1", axis=1),  # per output column of a MatMul weight
        helper.make_node("MatMul", ["x_dq", "w1"], ["y1"], name="matmul1"),
        dequantize("w2_q", "w2_scale", "zero", "w2"),
        helper.make_node("MatMul", ["y1", "w2"], ["y2"], name="matmul2"),
        dequantize("w2_q", "w2_scale", "zero", "w2b"),  # the same weight and parameters again: shares one Q
        helper.make_node("MatMul", ["y1", "w2b"], ["y2b"], name="matmul2b"),
        dequantize("w3_q", "w3_scale", "w3_zero", "w3"),
        helper.make_node("MatMul", ["y2", "w3"], ["y3"], name="matmul3"),
        dequantize("w4_q", "w4_scale", None, "w4"),
        helper.make_node("MatMul", ["y3", "w4"], ["y"], name="matmul4"),
        dequantize("table_q", "table_scale", "table_zero", "table", axis=0),  # the INT8 embedding (embedding.py)
        helper.make_node("Gather", ["table", "ids"], ["rows"], name="embedding", axis=0),
    ]
    graph = helper.make_graph(
        nodes, "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]), helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2]), helper.make_tensor_value_info("y2b", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["N", 2, 4])],
        initializer=inits)
    opsets = [helper.make_opsetid("", OPSET)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    onnx.checker.check_model(model, full_check=True)
    return model


def rewritten(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    model = copy.deepcopy(model)
    return model, requantize_from_float(model)


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def session(model: onnx.ModelProto, config: dict[str, str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def ort_quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None) -> np.ndarray:
    """ONNX Runtime's QuantizeLinear of x, as one node."""
    attrs = {} if axis is None else {"axis": axis}
    node = helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], **attrs)
    graph = helper.make_graph([node], "q", [], [helper.make_tensor_value_info("q", helper.np_dtype_to_tensor_dtype(zero_point.dtype), None)],
                              initializer=[tensor("x", x), tensor("scale", scale), tensor("zero", zero_point)])
    opsets = [helper.make_opsetid("", OPSET)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    return session(model, {}).run(None, {})[0]


def integer_weights_into_dequantize(model: onnx.ModelProto) -> list[str]:
    types = {init.name: init.data_type for init in model.graph.initializer}
    return [node.name for node in model.graph.node if node.op_type == "DequantizeLinear" and types.get(node.input[0]) in INTEGER_TYPES]


# ------------------------------------------------------------------ the rewrite on a small graph


def test_every_integer_weight_now_reaches_its_dequantize_through_a_quantize_of_floats():
    original = qdq_model()
    model, count = rewritten(original)
    assert integer_weights_into_dequantize(original) and count == len(integer_weights_into_dequantize(original)) == 6
    assert integer_weights_into_dequantize(model) == []
    onnx.checker.check_model(model, full_check=True)
    assert not sort_nodes_topologically(copy.deepcopy(model).graph)  # already in topological order
    producers = {out: node for node in model.graph.node for out in node.output}
    values = initializers(model)
    for node in (n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.name != "x_dq_dequantize"):
        quantize = producers[node.input[0]]
        assert quantize.op_type == "QuantizeLinear" and values[quantize.input[0]].dtype == np.float32
        assert list(quantize.input[1:]) == list(node.input[1:])  # the DQ's own scale and zero point
        assert [(a.name, a.i) for a in quantize.attribute] == [(a.name, a.i) for a in node.attribute]  # and axis
    assert producers["w2"].input[0] == producers["w2b"].input[0]  # one Q for the weight both read
    assert not {"w1_q", "w2_q", "w3_q", "w4_q", "table_q"} & set(values)  # the INT8 copies are gone


def test_quantizing_the_float_weight_gives_the_int8_weight_back_exactly():
    original = initializers(qdq_model())
    model, _ = rewritten(qdq_model())
    values = initializers(model)
    checked = set()
    for node in (n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.name != "x_quantize"):
        source = node.input[0].removesuffix(".float")  # weight_form.py names the float weight "<int8 name>.float"
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        recovered = ort_quantize(values[node.input[0]], values[node.input[1]], values[node.input[2]], axis)
        assert recovered.dtype == original[source].dtype and np.array_equal(recovered, original[source]), source
        checked.add(source)
    assert checked == {"w1_q", "w2_q", "w3_q", "w4_q", "table_q"}  # per-axis, per-tensor, UINT8, no zero point, Gather


@pytest.mark.parametrize("config", [QDQ_IN_FLOAT, {}], ids=["qdq-in-float", "ort-int8-kernels"])
def test_onnx_runtime_computes_the_same_outputs_before_and_after(config):
    original = qdq_model()
    model, _ = rewritten(original)
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((8, 4)).astype(np.float32), "ids": rng.integers(0, 10, (8, 2)).astype(np.int64)}
    for want, got in zip(session(original, config).run(None, feeds), session(model, config).run(None, feeds)):
        assert want.shape == got.shape and np.abs(want - got).max() <= TOLERANCE


def test_the_lint_errors_the_rewrite_removes():
    original = qdq_model()
    model, _ = rewritten(original)
    rule = "qdq-prequantized-weight"
    before = [f.node for f in lint_model(original, resolve_target(XAVIER)).errors if f.rule == rule]
    assert len(before) == 6
    assert [f for f in lint_model(model, resolve_target(XAVIER)).errors if f.rule == rule] == []


def test_a_model_without_integer_weights_is_left_as_it_is():
    model, count = rewritten(qdq_model())
    again, second = rewritten(model)
    assert second == 0 and again.SerializeToString() == model.SerializeToString()


# ------------------------------------------------------------------ which targets get it


def test_the_weight_form_follows_the_lints_tensorrt_version_fact(tmp_path):
    assert PREQUANTIZED_WEIGHTS_SINCE == (9, 0)
    for version, form in (("8.5", FLOAT_QDQ), ("8.6.2", FLOAT_QDQ), ("10.3", None), ("10.16", None)):
        target = load_target_file(write_target(tmp_path / f"trt-{version}.toml", software={"tensorrt": version}))
        assert takes_prequantized_weights(version) == (form is None)
        assert weight_form_for(target) == form, version
    # not the target's name: a Xavier file that says TensorRT 10.3 keeps INT8 weights
    xavier_on_10 = load_target_file(write_target(tmp_path / "xavier-10.toml", base=XAVIER, software={"tensorrt": "10.3"}))
    assert weight_form_for(xavier_on_10) is None


def quantize_ctx(target) -> SimpleNamespace:
    return SimpleNamespace(target=target, calibration=SimpleNamespace(name="calib-set", sha256="c" * 64),
                           splits=SimpleNamespace(fingerprint=lambda split: f"fingerprint-of-{split}"))


def test_only_tensorrt_8_targets_get_a_new_quantize_config_field():
    torch_model, source = Artifact("torch", Path("model.pt"), "t" * 64, {}), Artifact("torch", Path("source.pt"), "s" * 64, {})
    gate = Gate(min_agreement=0.97)
    for name, target in available_targets().items():
        ctx = quantize_ctx(target)
        config = quantize_stage.quantize_config(ctx, gate, torch_model, source)
        # what the pass declared before weight forms existed
        before = quantize_stage.QuantizeConfig(target.quantize, quantize_stage.ALGORITHM, ("calib-set", "c" * 64),
                                               "fingerprint-of-calib", gate, "t" * 64, "s" * 64)
        settings, old = dataclasses.asdict(config), dataclasses.asdict(before)
        if name == XAVIER:
            assert type(config) is quantize_stage.FloatWeightQuantizeConfig and settings == {**old, "weights": FLOAT_QDQ}
            assert cache_key("quantize", settings, "x", {}) != cache_key("quantize", old, "x", {})
        else:
            assert type(config) is quantize_stage.QuantizeConfig and config == before, name
            assert cache_key("quantize", settings, "x", {}) == cache_key("quantize", old, "x", {}), name


def test_the_default_jetson_target_keeps_int8_weight_initializers():
    assert weight_form_for(resolve_target("jetson")) is None
    assert weight_form_for(resolve_target("jetson-orin-nano")) is None


# ------------------------------------------------------------------ a real build for the Xavier target


@pytest.fixture(scope="module")
def xavier_build(tmp_path_factory) -> tuple[int, Path]:
    """fused-tiny, one epoch, no compression, 4 emoji per class, for the shipped jetson-xavier-nx target, in-process."""
    work = tmp_path_factory.mktemp("xavier-weights")
    data = write_emoji_folder(work / "data", per_class=4)
    out = work / "out"
    code = main(["build", "--model", "fused-tiny", "--data", str(data), "--target", XAVIER, "--epochs", "1",
                 "--no-compression", "--out", str(out), "--quiet"])
    return code, out


def stage(manifest: dict, name: str) -> dict:
    return next(s for s in manifest["stages"] if s["name"] == name)


def test_the_xavier_build_passes_end_to_end_with_a_bundle(xavier_build):
    code, out = xavier_build
    manifest = json.loads((out / "manifest.json").read_text())
    assert code == 0, manifest.get("failure")
    assert (out / "bundle" / "model.int8.onnx").is_file()
    quantize = stage(manifest, "quantize")
    assert quantize["settings"]["weights"] == FLOAT_QDQ and quantize["facts"]["weight_form"] == FLOAT_QDQ
    # the file that ships is the one the quantize gate measured
    assert (out / "bundle" / "model.int8.onnx").read_bytes() == (out / quantize["artifact"]["path"]).read_bytes()


def test_the_shipped_xavier_model_lints_without_errors(xavier_build):
    _, out = xavier_build
    shipped = out / "bundle" / "model.int8.onnx"
    report = lint_onnx(shipped, resolve_target(XAVIER))
    assert report.errors == (), report.format_text()
    assert json.loads((out / "bundle" / "lint.json").read_text())["ok"] is True
    model = onnx.load(str(shipped))
    onnx.checker.check_model(model, full_check=True)
    assert integer_weights_into_dequantize(model) == []
    weighted = {node.input[1] for node in model.graph.node if node.op_type in ("MatMul", "Gemm", "Conv")}
    producers = {out: node for node in model.graph.node for out in node.output}
    through_q = [name for name in weighted if name in producers and producers[name].op_type == "DequantizeLinear"
                 and producers.get(producers[name].input[0]) is not None
                 and producers[producers[name].input[0]].op_type == "QuantizeLinear"]
    assert len(through_q) >= 10  # the weighted ops' weights are float -> Q -> DQ
