"""Bias correction of INT8 convolutions: the shift by hand, the output mean restored, float regions untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.artifacts import Artifact
from pipeline.data.encode import Encoded
from pipeline.parity import Gate
from pipeline.quantization.bias_correction import conv_input_means, tap_means, weight_rounding_shift
from pipeline.quantization.calibrate import calibrate, to_tensors_data
from pipeline.quantization.evaluate import make_evaluator, ort_logits
from pipeline.quantization.placement import find_regions
from pipeline.quantization.qdq import FORMS, write_qdq
from pipeline.quantization.quantize import quantize
from pipeline.store import sha256_file
from pipeline.targets import Quantize


def _save(nodes, inits, shape_in, shape_out, path: Path) -> Artifact:
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *shape_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", *shape_out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Artifact(kind="onnx", path=path, sha256=sha256_file(path))


def _data(x: np.ndarray) -> Encoded:
    return Encoded(ids=tuple(f"s{i}" for i in range(len(x))), inputs={"x": x.astype(np.float32)},
                   labels=np.zeros(len(x), dtype=np.int64))


def _biases(path: Path) -> dict[str, np.ndarray]:
    """Each Conv node's bias, by node name."""
    model = onnx.load(str(path))
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    return {node.name: values[node.input[2]] for node in model.graph.node if node.op_type == "Conv"}


def test_a_rounded_weight_moves_the_bias_by_the_hand_computed_shift(tmp_path):
    # y = 1.0 x0 + 0.3 x1 + 0.5. Symmetric 8-bit weights (the tensorrt form): scale = 1.0 / 127, so 0.3 is stored
    # as round(38.1) = 38, i.e. 38/127, off by 38/127 - 0.3. Channel 1 is 10 everywhere: the rounding adds
    # 10 x (38/127 - 0.3) to every output, and the bias must take it back; channel 0 is rounded exactly.
    weight = np.array([1.0, 0.3], np.float32).reshape(1, 2, 1, 1)
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array([0.5], np.float32), "b")]
    fp32 = _save([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")], inits, (2, 4, 4), (1, 4, 4), tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((16, 2, 4, 4))
    x[:, 1] = 10.0
    settings = Quantize(form="tensorrt", method="minmax")
    corrected = quantize(fp32, _data(x), settings, tmp_path / "on")
    plain = quantize(fp32, _data(x), settings, tmp_path / "off", bias_correction=False)
    expected = 0.5 - 10.0 * (38 / 127 - 0.3)
    assert _biases(corrected.path)["conv"] == pytest.approx([expected], rel=1e-6)
    assert _biases(plain.path)["conv"] == pytest.approx([0.5], rel=1e-7)
    assert corrected.meta["bias_correction"] and plain.meta["bias_correction"] is None


def test_a_taps_mean_counts_only_the_positions_it_reaches_inside_the_padding():
    # A 3x3 kernel, padding 1, on a 3x3 input of ones: the centre tap reads a one at all 9 output positions, a corner
    # tap at 4 (zeros of the padding elsewhere); with stride 2 the corner tap reads one at 1 of the 4 outputs
    ones = np.ones((2, 1, 3, 3))  # two samples: taps are summed over the batch
    taps = tap_means(helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]), ones, (3, 3))
    assert taps[0, 1, 1] == pytest.approx(2.0) and taps[0, 0, 0] == pytest.approx(2 * 4 / 9)
    strided = tap_means(helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2]), ones, (3, 3))
    assert strided[0, 0, 0] == pytest.approx(2 * 1 / 4)
    one_d = tap_means(helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1]), np.ones((1, 1, 3)), (3,))  # a user's Conv1d
    assert one_d[0] == pytest.approx([2 / 3, 1.0, 2 / 3])
    # the shift weighs each tap's mean by that tap's weight error; a depthwise output reads its own channel only
    error = np.zeros((2, 1, 3, 3))
    error[0, 0, 0, 0], error[1, 0, 1, 1] = 0.9, 0.5
    two_channels = np.stack([taps[0], 3 * taps[0]])
    assert weight_rounding_shift(two_channels, error, group=2) == pytest.approx([0.9 * 2 * 4 / 9, 0.5 * 3 * 2])


def _depthwise_then_pointwise(path: Path, channels: int = 8, pooled: bool = False) -> Artifact:
    """x -> depthwise 3x3 conv -> Relu -> pointwise conv -> y (pooled: averaged over positions, logits of 4 classes)."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((channels, 1, 3, 3)).astype(np.float32), "dw.w"),
             numpy_helper.from_array(np.zeros(channels, np.float32), "dw.b"),
             numpy_helper.from_array(rng.standard_normal((4, channels, 1, 1)).astype(np.float32), "pw.w"),
             numpy_helper.from_array(np.zeros(4, np.float32), "pw.b")]
    nodes = [helper.make_node("Conv", ["x", "dw.w", "dw.b"], ["h"], group=channels, pads=[1, 1, 1, 1], name="dw"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "pw.w", "pw.b"], ["p" if pooled else "y"], name="pw")]
    if pooled:
        nodes += [helper.make_node("GlobalAveragePool", ["p"], ["g"], name="pool"), helper.make_node("Flatten", ["g"], ["y"], name="flat")]
    return _save(nodes, inits, (channels, 6, 6), (4,) if pooled else (4, 6, 6), path)


@pytest.mark.parametrize("form", ["cpu", "tensorrt"])
def test_corrected_biases_bring_the_int8_output_mean_back_to_the_float_models_on_unseen_inputs(tmp_path, form):
    fp32 = _depthwise_then_pointwise(tmp_path / "m.onnx")
    rng = np.random.default_rng(4)
    offsets = rng.uniform(0.5, 3.0, (1, 8, 1, 1))  # inputs with a mean of their own, as post-ReLU activations have
    calibration, unseen = (_data(offsets + rng.standard_normal((n, 8, 6, 6))) for n in (64, 64))
    reference = ort_logits(fp32.path, unseen).mean(axis=(0, 2, 3))
    errors = {}
    for corrected in (True, False):
        int8 = quantize(fp32, calibration, Quantize(form=form, method="minmax"), tmp_path / str(corrected), bias_correction=corrected)
        output = ort_logits(int8.path, unseen, session_config=int8.meta["ort_session_config"]).mean(axis=(0, 2, 3))
        errors[corrected] = np.abs(output - reference).max()
    assert errors[True] < 0.25 * errors[False], errors


def test_only_the_convolutions_with_int8_weights_are_corrected(tmp_path):
    fp32 = _depthwise_then_pointwise(tmp_path / "m.onnx")
    rng = np.random.default_rng(5)
    data = _data(rng.uniform(0.5, 3.0, (1, 8, 1, 1)) + rng.standard_normal((32, 8, 6, 6)))
    int8 = quantize(fp32, data, Quantize(form="cpu", method="minmax", op_types=("Conv",)), tmp_path / "all")
    regions = find_regions(onnx.load(str(fp32.path)), ("Conv",), residual_adds=False, embedding=False, fuse_activations=True,
                           float_residual_writers=True)
    tensors = sorted({t for region in regions for t in (*region.activations, *region.outputs)})
    ranges = to_tensors_data(calibrate(fp32.path, tensors, data, "minmax", symmetric=False, percentile=100.0), "minmax")
    partial = write_qdq(fp32.path, regions, {"dw"}, ranges, FORMS["cpu"], tmp_path / "partial.onnx",
                        conv_means=conv_input_means(fp32.path, data))
    assert not np.allclose(_biases(int8.path)["pw"], 0.0) and not np.allclose(_biases(int8.path)["dw"], 0.0)
    assert np.array_equal(_biases(partial)["pw"], np.zeros(4, np.float32))  # kept in float: its bias as exported
    assert np.array_equal(_biases(partial)["dw"], _biases(int8.path)["dw"])


def test_the_tuning_set_decides_whether_the_correction_is_kept(tmp_path):
    fp32 = _depthwise_then_pointwise(tmp_path / "m.onnx", pooled=True)
    rng = np.random.default_rng(6)
    data = _data(rng.uniform(0.5, 3.0, (1, 8, 1, 1)) + rng.standard_normal((64, 8, 6, 6)))
    settings, gate = Quantize(form="cpu", method="minmax", op_types=("Conv",), max_fallback_steps=0), Gate(max_drop_pts=None)
    # judged against the float model, the corrected biases answer more like it and are kept
    towards_float = quantize(fp32, data, settings, tmp_path / "float", evaluator=make_evaluator(data, ort_logits(fp32.path, data), gate))
    assert towards_float.meta["bias_correction_choice"]["kept"] and towards_float.meta["bias_correction"]
    # judged against the uncorrected INT8 model itself, the plain one agrees exactly and wins: the biases stay as exported
    plain = quantize(fp32, data, settings, tmp_path / "plain", bias_correction=False)
    towards_plain = quantize(fp32, data, settings, tmp_path / "towards-plain", evaluator=make_evaluator(data, ort_logits(plain.path, data), gate))
    assert not towards_plain.meta["bias_correction_choice"]["kept"] and towards_plain.meta["bias_correction"] is None
    assert np.array_equal(_biases(towards_plain.path)["pw"], np.zeros(4, np.float32))
