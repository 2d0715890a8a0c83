"""TensorRT readiness lint on small ONNX graphs built here with onnx.helper."""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline import device_commands
from pipeline.errors import InputError
from pipeline.lint import LintReport, dla_supported_ops, lint_model, lint_onnx, operator_table
from pipeline.targets import resolve_target

OPSET = 17


def tensor(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def make_model(nodes, inputs, outputs, initializers=(), opset=OPSET):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def float_input(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def qdq_linear_model(zero_point=np.int8(0), weight_zero=np.int8(0)):
    """x[N,4] -> Q/DQ -> MatMul(Q/DQ weight[4,3]) -> y: the placement TensorRT fuses."""
    weight = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="x_quant"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], name="x_dequant"),
        helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zero"], ["w_q"], name="w_quant"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], name="w_dequant"),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="matmul"),
    ]
    inits = [tensor("w", weight), tensor("x_scale", np.float32(0.05)), tensor("x_zero", zero_point),
             tensor("w_scale", np.float32(0.01)), tensor("w_zero", weight_zero)]
    return make_model(nodes, [float_input("x", ["N", 4])], [float_input("y", ["N", 3])], inits)


def rules(report: LintReport, severity: str | None = None) -> set[str]:
    return {f.rule for f in report.findings if severity is None or f.severity == severity}


def test_well_placed_qdq_model_is_clean():
    report = lint_model(qdq_linear_model(), resolve_target("jetson"))
    assert report.ok, report.format_text()
    assert rules(report, "warning") == set()
    assert "dynamic-batch" in rules(report, "info")


def test_unsupported_op_is_an_error_naming_the_node():
    nodes = [helper.make_node("Unique", ["x"], ["y"], name="dedupe")]
    model = make_model(nodes, [float_input("x", [4])], [float_input("y", [None])])
    report = lint_model(model, resolve_target("jetson"))
    (finding,) = [f for f in report.errors if f.rule == "unsupported-op"]
    assert (finding.node, finding.op) == ("dedupe", "Unique")
    assert "operators.md" in finding.source


def test_op_support_follows_the_targets_tensorrt_version():
    nodes = [helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y"], name="ln", axis=-1)]
    model = make_model(nodes, [float_input("x", [2, 4])], [float_input("y", [2, 4])],
                       [tensor("scale", np.ones(4, np.float32)), tensor("bias", np.zeros(4, np.float32))])
    assert "unsupported-op" in rules(lint_model(model, resolve_target("jetson-xavier-nx")), "error")  # TensorRT 8.5
    assert "unsupported-op" not in rules(lint_model(model, resolve_target("jetson")))  # TensorRT 10.3


def test_op_added_in_a_later_minor_release_is_flagged():
    table = operator_table("10.3")
    assert table.since["Attention"] == "10.14" and "Attention" in table.supported
    nodes = [helper.make_node("STFT", ["x", "step"], ["y"], name="stft")]
    model = make_model(nodes, [float_input("x", [1, 64, 1])], [float_input("y", None)],
                       [tensor("step", np.int64(8))])
    report = lint_model(model, resolve_target("jetson"))  # 10.3: STFT arrived in 10.5
    assert any(f.op == "STFT" and "10.5" in f.message for f in report.errors)


def test_custom_domain_op_needs_a_plugin():
    node = helper.make_node("FusedGelu", ["x"], ["y"], name="gelu", domain="com.microsoft")
    model = make_model([node], [float_input("x", [2])], [float_input("y", [2])])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    report = lint_model(model, resolve_target("jetson"))
    assert "custom-domain-op" in rules(report, "error")


def test_int64_initializer_warns_on_tensorrt_8_and_notes_on_10():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")]
    model = make_model(nodes, [float_input("x", [2, 3])], [float_input("y", [6])], [tensor("shape", np.array([6], np.int64))])
    old = lint_model(model, resolve_target("jetson-xavier-nx"))
    assert any(f.rule == "int64-initializer" and f.node == "shape" and f.severity == "warning" for f in old.findings)
    new = lint_model(model, resolve_target("jetson"))
    assert any(f.rule == "int64-initializer" and f.severity == "info" for f in new.findings)


def test_dynamic_non_batch_dim_without_profile_is_an_error():
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    model = make_model(nodes, [float_input("x", ["N", "seq"])], [float_input("y", ["N", "seq"])])
    report = lint_model(model, resolve_target("jetson"))
    (finding,) = [f for f in report.errors if f.rule == "dynamic-dim-without-profile"]
    assert finding.node == "x" and "axis 1" in finding.message and "'seq'" in finding.message


def test_dla_target_reports_layers_that_fall_back_to_the_gpu():
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
        helper.make_node("Relu", ["emb"], ["y"], name="relu"),
    ]
    model = make_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT32, [8, 5])],
                       [float_input("y", [8, 5, 4])], [tensor("table", np.ones((10, 4), np.float32))])
    report = lint_model(model, resolve_target("jetson-agx-orin"))
    dla = [f for f in report.findings if f.rule == "dla-unsupported-layer"]
    assert [(f.op, f.severity) for f in dla] == [("Gather", "warning")]
    assert "GPU fallback" in dla[0].message
    assert "Relu" in dla_supported_ops()
    assert not [f for f in lint_model(model, resolve_target("jetson")).findings if f.rule == "dla-unsupported-layer"]


def test_qdq_scale_must_be_a_constant():
    nodes = [
        helper.make_node("Abs", ["s"], ["scale"], name="runtime_scale"),
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], name="quant"),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dq"], name="dequant"),
        helper.make_node("Conv", ["dq", "w"], ["y"], name="conv"),
    ]
    model = make_model(nodes, [float_input("x", [1, 1, 4, 4]), float_input("s", [])], [float_input("y", None)],
                       [tensor("zero", np.int8(0)), tensor("w", np.ones((1, 1, 1, 1), np.float32))])
    report = lint_model(model, resolve_target("jetson"))
    assert {f.node for f in report.errors if f.rule == "qdq-scale-not-constant"} == {"quant", "dequant"}


def test_asymmetric_zero_point_is_an_error():
    report = lint_model(qdq_linear_model(zero_point=np.int8(3)), resolve_target("jetson"))
    assert "qdq-zero-point-nonzero" in rules(report, "error")


def test_uint8_zero_point_is_an_error():
    report = lint_model(qdq_linear_model(zero_point=np.uint8(0)), resolve_target("jetson"))
    assert "qdq-zero-point-type" in rules(report, "error")


def test_missing_zero_point_warns_about_uint8():
    model = qdq_linear_model()
    for node in model.graph.node:
        if node.name == "x_quant":
            del node.input[2]
    assert "qdq-zero-point-missing" in rules(lint_model(model, resolve_target("jetson")), "warning")


def test_dequantize_feeding_a_non_fusing_op_warns():
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], name="quant"),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dq"], name="dequant"),
        helper.make_node("Reshape", ["dq", "shape"], ["r"], name="reshape"),
        helper.make_node("Sigmoid", ["r"], ["y"], name="sigmoid"),
    ]
    model = make_model(nodes, [float_input("x", [2, 3])], [float_input("y", [6])],
                       [tensor("scale", np.float32(0.1)), tensor("zero", np.int8(0)), tensor("shape", np.array([6], np.int64))])
    report = lint_model(model, resolve_target("jetson"))
    (finding,) = [f for f in report.findings if f.rule == "dequantize-not-fused"]
    assert finding.node == "dequant" and "Sigmoid" in finding.message and finding.severity == "warning"


def test_weighted_op_with_one_quantized_input_warns():
    model = qdq_linear_model()
    for node in model.graph.node:
        if node.name == "matmul":
            node.input[0] = "x"  # activation bypasses its Q/DQ; only the weight stays quantized
    report = lint_model(model, resolve_target("jetson"))
    assert any(f.rule == "weighted-op-partially-quantized" and f.node == "matmul" for f in report.warnings)


def test_cpu_target_skips_tensorrt_rules():
    report = lint_model(qdq_linear_model(zero_point=np.int8(3)), resolve_target("cpu"))
    assert report.ok and rules(report) == {"not-a-tensorrt-target"}


def test_report_serializes_to_json(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(qdq_linear_model(zero_point=np.int8(3)), path)
    report = lint_onnx(path, resolve_target("jetson"))
    data = json.loads(json.dumps(report.to_json()))
    assert data["ok"] is False and data["counts"]["error"] >= 1
    assert {"severity", "rule", "node", "op", "message", "source"} <= set(data["findings"][0])


def test_operator_tables_are_consistent():
    for version in ("8.5", "10.3", "11.0"):
        table = operator_table(version)
        assert not table.supported & table.unsupported
        assert {"Conv", "MatMul", "QuantizeLinear", "DequantizeLinear"} <= table.supported
        assert all(op in table.supported for op in table.since)


def run_inspect(*argv):
    parser = argparse.ArgumentParser()
    device_commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["inspect", *argv])
    return args.func(args)


def test_inspect_exits_non_zero_on_errors_and_zero_when_clean(tmp_path, capsys):
    bad, good = tmp_path / "bad.onnx", tmp_path / "good.onnx"
    onnx.save(qdq_linear_model(zero_point=np.int8(3)), bad)
    onnx.save(qdq_linear_model(), good)
    assert run_inspect(str(bad), "--target", "jetson") == device_commands.LINT_FAILED_EXIT
    assert "qdq" in capsys.readouterr().out.lower()
    assert run_inspect(str(good), "--target", "jetson", "--json") == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_inspect_reports_a_missing_file(tmp_path, capsys):
    assert run_inspect(str(tmp_path / "none.onnx"), "--target", "jetson") == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["jetson", "jetson-xavier-nx", "jetson-agx-orin", "gpu-hopper", "jetson-thor"])
def test_every_tensorrt_target_can_be_linted(target):
    assert lint_model(qdq_linear_model(), resolve_target(target)).ok


def test_int32_bias_dequantize_is_an_error():
    """ONNX Runtime's quantize_static writes INT32 biases by default; TensorRT's parser rejects them."""
    nodes = [
        helper.make_node("DequantizeLinear", ["bias_q", "bias_scale", "bias_zero"], ["bias"], name="bias_dequant"),
        helper.make_node("Add", ["x", "bias"], ["y"], name="add_bias"),
    ]
    model = make_model(nodes, [float_input("x", [2, 3])], [float_input("y", [2, 3])],
                       [tensor("bias_q", np.array([5, -3, 2], np.int32)), tensor("bias_scale", np.float32(0.001)),
                        tensor("bias_zero", np.int32(0))])
    report = lint_model(model, resolve_target("jetson"))
    (finding,) = [f for f in report.errors if f.rule == "qdq-int32-bias"]
    assert finding.node == "bias_dequant" and "QuantizeBias=False" in finding.message


def test_prequantized_int8_weights_need_a_qdq_pair_on_tensorrt_8():
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "zero"], ["x_q"], name="x_quant"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "zero"], ["x_dq"], name="x_dequant"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "zero"], ["w_dq"], name="w_dequant"),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="matmul"),
    ]
    model = make_model(nodes, [float_input("x", [2, 4])], [float_input("y", [2, 3])],
                       [tensor("w_q", np.ones((4, 3), np.int8)), tensor("w_scale", np.float32(0.01)),
                        tensor("x_scale", np.float32(0.05)), tensor("zero", np.int8(0))])
    old = lint_model(model, resolve_target("jetson-xavier-nx"))  # TensorRT 8.5
    assert [f.node for f in old.errors if f.rule == "qdq-prequantized-weight"] == ["w_dequant"]
    assert lint_model(model, resolve_target("jetson")).ok  # TensorRT 10.3 takes INT8 weights


def test_raise_on_errors_lists_the_findings():
    report = lint_model(qdq_linear_model(zero_point=np.int8(3)), resolve_target("jetson"))
    with pytest.raises(InputError, match=r"(?s)not ready for TensorRT 10.3.*x_quant \[QuantizeLinear\] qdq-zero-point-nonzero"):
        report.raise_on_errors()
    lint_model(qdq_linear_model(), resolve_target("jetson")).raise_on_errors()


def int8_embedding_model(per_row=True):
    """An INT8 embedding table: DequantizeLinear (per-row scales, axis 0) -> Gather(ids) -> MatMul(Q/DQ weight)."""
    rows = 10
    scale = np.full(rows, 0.02, np.float32) if per_row else np.float32(0.02)
    zero = np.zeros(rows, np.int8) if per_row else np.int8(0)
    nodes = [
        helper.make_node("DequantizeLinear", ["table_q", "table_scale", "table_zero"], ["table"], name="table_dequant", axis=0),
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed", axis=0),
        helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zero"], ["w_q"], name="w_quant"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], name="w_dequant"),
        helper.make_node("MatMul", ["emb", "w_dq"], ["y"], name="head"),
    ]
    inits = [tensor("table_q", np.ones((rows, 4), np.int8)), tensor("table_scale", scale), tensor("table_zero", zero),
             tensor("w", np.ones((4, 3), np.float32)), tensor("w_scale", np.float32(0.01)), tensor("w_zero", np.int8(0))]
    return make_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT32, [8, 5])],
                      [float_input("y", [8, 5, 3])], inits)


def test_per_row_dequantize_does_not_commute_across_gather():
    report = lint_model(int8_embedding_model(per_row=True), resolve_target("jetson"))
    (finding,) = [f for f in report.findings if f.rule == "dequantize-per-axis-gather"]
    assert finding.node == "table_dequant" and finding.severity == "warning"
    assert "embed" in finding.message and "axis 0" in finding.message
    # the MatMul then gets a float activation and a quantized weight: partially quantized
    assert "weighted-op-partially-quantized" in rules(report, "warning")


def test_per_tensor_dequantize_still_commutes_across_gather():
    report = lint_model(int8_embedding_model(per_row=False), resolve_target("jetson"))
    assert "dequantize-per-axis-gather" not in rules(report)
    assert "weighted-op-partially-quantized" not in rules(report)


def test_qdq_model_on_dla_with_tensorrt_10_warns():
    report = lint_model(qdq_linear_model(), resolve_target("jetson-agx-orin"))  # TensorRT 10.3, use_dla
    (finding,) = [f for f in report.findings if f.rule == "dla-explicit-quantization"]
    assert finding.severity == "warning" and "10.3" in finding.message and "GPU" in finding.message
    assert "TensorRT#2222" in finding.source and "cuDLA-samples#19" in finding.source
    assert "dla-explicit-quantization" not in rules(lint_model(qdq_linear_model(), resolve_target("jetson")))
    plain = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [float_input("x", [8, 4])],
                       [float_input("y", [8, 4])])
    assert "dla-explicit-quantization" not in rules(lint_model(plain, resolve_target("jetson-agx-orin")))
