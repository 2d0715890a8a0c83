"""Bias correction: each INT8 convolution's bias takes back the mean its rounded weights add.

Rounding a convolution's weights to INT8 (7 bits in the `cpu` form) changes its output by conv(x, Ŵ - W). Over
real inputs that error is not zero-mean: per output channel it has a mean, which acts as a wrong bias and
passes through every later layer. EfficientNet's depthwise convolutions, with 9 or 25 weights per channel,
are where it is largest. Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction" (ICCV 2019), section 4.2, subtract that mean from the bias; this is their empirical form, with the
calibration samples standing in for the data:

    shift[o] = mean over output positions of conv(E[x], Ŵ - W)[o]      (E[x]: per channel and position)
    bias'    = bias - shift

Convolution is linear in x, so conv(E[x], ...) is E[conv(x, ...)] exactly, zero padding included. Ŵ is read
from the Q/DQ model as ONNX Runtime's quantizer wrote it (DequantizeLinear of the INT8 initializer), so the
correction follows whatever rounding and range the form uses. The bias stays float in every form here
(Form.quantize_bias is False), so the corrected value is what the runtime adds. Only convolutions whose
weights are INT8 are corrected: one the fallback keeps in float keeps its bias.

Left alone: Gemm and MatMul (their bias, where there is one, is a separate Add after a MatMul); on the
default model the loss was in the image branch's convolutions (BENCHMARKS.md, "The `cpu` target's INT8
agreement").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pipeline.data.encode import Encoded
from pipeline.quantization.calibrate import CALIBRATION_BATCH, run_with_intermediates

__all__ = ["BIAS_CORRECTION_RULE", "ConvInputMeans", "conv_input_means", "correct_biases"]

BIAS_CORRECTION_RULE = ("each INT8 convolution's bias minus the mean its rounded weights add on the calibration "
                        "samples (Nagel et al. 2019, Data-Free Quantization, section 4.2, empirical)")
_DEFAULT_AXIS = 1  # ONNX DequantizeLinear's axis default


@dataclass(frozen=True)
class ConvInputMeans:
    """The mean input (per channel and position) of each convolution with a constant weight, over the calibration samples."""

    means: Mapping[str, np.ndarray]  # conv input tensor name -> float64 array of the input's shape without the batch axis
    samples: int


def _correctable_convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Conv nodes whose weight is an initializer and whose padding is explicit (auto_pad SAME_* would need the shapes)."""
    initializers = {init.name for init in model.graph.initializer}
    convs = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        auto_pad = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "auto_pad"), b"NOTSET")
        if auto_pad in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            convs.append(node)
    return convs


def conv_input_means(prepared: Path, data: Encoded) -> ConvInputMeans:
    """One pass of data through the FP32 model, keeping the running sum of every correctable convolution's input."""
    model = onnx.load(str(prepared), load_external_data=False)
    tensors = sorted({node.input[0] for node in _correctable_convs(model)})
    sums: dict[str, np.ndarray] = {}
    samples = 0
    if tensors:
        for values in run_with_intermediates(prepared, tensors, data.batches(CALIBRATION_BATCH)):
            for name, value in values.items():
                total = np.asarray(value, dtype=np.float64).sum(axis=0)
                sums[name] = total if name not in sums else sums[name] + total
            samples += len(next(iter(values.values())))
    return ConvInputMeans({name: total / max(samples, 1) for name, total in sums.items()}, samples)


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _dequantized_weight(node: onnx.NodeProto, producers: Mapping[str, onnx.NodeProto],
                        initializers: Mapping[str, onnx.TensorProto]) -> np.ndarray | None:
    """Ŵ as the Q/DQ model computes it: DequantizeLinear of an INT8 initializer; None if the weight is not quantized."""
    dequantize = producers.get(node.input[1])
    if dequantize is None or dequantize.op_type != "DequantizeLinear" or dequantize.input[0] not in initializers:
        return None
    quantized = numpy_helper.to_array(initializers[dequantize.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(initializers[dequantize.input[1]]).astype(np.float64)
    zero = (numpy_helper.to_array(initializers[dequantize.input[2]]).astype(np.float64)
            if len(dequantize.input) > 2 and dequantize.input[2] else np.zeros_like(scale))
    if scale.ndim == 1:  # per channel, along the DequantizeLinear's axis
        axis = _attributes(dequantize).get("axis", _DEFAULT_AXIS) % quantized.ndim
        shape = [1] * quantized.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (quantized - zero) * scale


def weight_rounding_shift(node: onnx.NodeProto, mean_input: np.ndarray, weight_error: np.ndarray) -> np.ndarray:
    """Per output channel: the mean over output positions of conv(mean_input, weight_error) with node's geometry."""
    import torch
    import torch.nn.functional as F

    spatial = weight_error.ndim - 2
    attributes = _attributes(node)
    valid = attributes.get("auto_pad", b"NOTSET") in (b"VALID", "VALID")
    pads = [0] * 2 * spatial if valid else list(attributes.get("pads", [0] * 2 * spatial))
    # ONNX pads are (begin_1 .. begin_n, end_1 .. end_n); F.pad wants the last axis first, (begin, end) per axis
    torch_pads = [p for axis in reversed(range(spatial)) for p in (pads[axis], pads[axis + spatial])]
    x = F.pad(torch.from_numpy(np.asarray(mean_input, dtype=np.float64))[None], torch_pads)
    convolve = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    y = convolve(x, torch.from_numpy(weight_error), stride=attributes.get("strides", [1] * spatial),
                 dilation=attributes.get("dilations", [1] * spatial), groups=attributes.get("group", 1))
    return y.mean(dim=tuple(range(2, 2 + spatial)))[0].numpy()


def correct_biases(model: onnx.ModelProto, original: onnx.ModelProto, means: ConvInputMeans) -> int:
    """In place on the Q/DQ model: each convolution with INT8 weights gets bias - shift (a bias added where it had none).

    original: the FP32 model the Q/DQ model was written from (its float weights W). Returns how many were corrected."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    float_weights = {init.name: init for init in original.graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    by_name = {node.name: node for node in graph.node}
    corrected = 0
    for node in _correctable_convs(original):
        quantized_node, mean_input = by_name.get(node.name), means.means.get(node.input[0])
        if quantized_node is None or mean_input is None or not _float_bias(quantized_node, initializers):
            continue
        weight = _dequantized_weight(quantized_node, producers, initializers)
        if weight is None:  # kept in float
            continue
        error = weight - numpy_helper.to_array(float_weights[node.input[1]]).astype(np.float64)
        shift = weight_rounding_shift(node, mean_input, error)
        _set_bias(graph, quantized_node, initializers, shift)
        corrected += 1
    return corrected


def _float_bias(node: onnx.NodeProto, initializers: Mapping[str, onnx.TensorProto]) -> bool:
    """Whether node has no bias or a float initializer as its bias (an INT32 bias, Form.quantize_bias, is not rewritten)."""
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    return bias is None or (bias in initializers and initializers[bias].data_type == onnx.TensorProto.FLOAT)


def _set_bias(graph: onnx.GraphProto, node: onnx.NodeProto, initializers: Mapping[str, onnx.TensorProto], shift: np.ndarray) -> None:
    """node's bias input becomes a new initializer, bias - shift; the old one is removed when nothing else reads it."""
    old = node.input[2] if len(node.input) > 2 and node.input[2] else None
    bias = numpy_helper.to_array(initializers[old]).astype(np.float64) if old is not None else np.zeros_like(shift)
    name = f"{node.name}_corrected_bias"
    graph.initializer.append(numpy_helper.from_array((bias - shift).astype(np.float32), name))
    if old is None:
        node.input.append(name)
        return
    node.input[2] = name
    if not any(old in other.input for other in graph.node):
        graph.initializer.remove(initializers[old])
