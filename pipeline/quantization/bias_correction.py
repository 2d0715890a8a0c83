"""Bias correction: each INT8 convolution's bias takes back the mean its rounded weights add.

Rounding a convolution's weights to INT8 (7 bits in the `cpu` form) changes its output by conv(x, Ŵ - W). Over
real inputs that error is not zero-mean: per output channel it has a mean, which acts as a wrong bias and
passes through every later layer. EfficientNet's depthwise convolutions, with 9 or 25 weights per channel,
are where it is largest. Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction" (ICCV 2019), section 4.2, subtract that mean from the bias; this is their empirical form, with the
calibration samples standing in for the data:

    shift[o] = sum over i, k of (Ŵ - W)[o, i, k] x T[i, k]      (T[i, k]: the mean of what tap k reads of channel i)
    bias'    = bias - shift

T is averaged over the calibration samples and the output positions, zero padding included, so the shift is
exactly the mean over samples and positions of conv(x, Ŵ - W), the error a constant bias can take back. Ŵ is read
from the Q/DQ model as ONNX Runtime's quantizer wrote it (DequantizeLinear of the INT8 initializer), so the
correction follows whatever rounding and range the form uses. The bias stays float in every form here
(Form.quantize_bias is False), so the corrected value is what the runtime adds. Only convolutions whose
weights are INT8 are corrected: one the fallback keeps in float keeps its bias. The correction is exact for the
FP32 model's inputs, not a promise of better answers: the quantize stage keeps it only where the all-INT8 model
then agrees more with the reference on the tuning split (quantize.py).

Left alone: 3-D convolutions, auto_pad SAME_*, and Gemm and MatMul (their bias, where there is one, is a separate Add after a MatMul); on the
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
from pipeline.quantization.weight_form import dequantized_weight

__all__ = ["BIAS_CORRECTION_RULE", "ConvInputMeans", "conv_input_means", "correct_biases"]

BIAS_CORRECTION_RULE = ("each INT8 convolution's bias minus the mean its rounded weights add on the calibration "
                        "samples (Nagel et al. 2019, Data-Free Quantization, section 4.2, empirical)")


@dataclass(frozen=True)
class ConvInputMeans:
    """Per convolution with a constant weight: the mean, over the calibration samples and the output positions, of the
    input value each kernel tap reads (zero padding included), shape (input channels, *kernel). Small whatever the
    image size: a tap's mean is all the shift needs, so no input map is kept."""

    taps: Mapping[str, np.ndarray]  # conv node name -> float64 array (C_in, *kernel)
    samples: int


def _correctable_convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """2-D and 1-D Conv nodes whose weight is an initializer and whose padding is explicit (auto_pad SAME_* would need the shapes)."""
    initializers = {init.name: init for init in model.graph.initializer}
    convs = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        if _attributes(node).get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET", b"VALID", "VALID") and len(initializers[node.input[1]].dims) in (3, 4):
            convs.append(node)
    return convs


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def tap_means(node: onnx.NodeProto, inputs: np.ndarray, kernel: tuple[int, ...]) -> np.ndarray:
    """For a batch of node's inputs (N, C, *spatial): per channel and kernel tap, the sum over samples of the mean over
    output positions of the value that tap reads, with node's padding, stride and dilation: shape (C, *kernel)."""
    import torch  # torch's unfold; the quantize stage otherwise runs on ONNX Runtime alone
    import torch.nn.functional as F

    spatial = len(kernel)
    attributes = _attributes(node)
    valid = attributes.get("auto_pad", b"NOTSET") in (b"VALID", "VALID")
    pads = [0] * 2 * spatial if valid else list(attributes.get("pads", [0] * 2 * spatial))
    strides, dilations = attributes.get("strides", [1] * spatial), attributes.get("dilations", [1] * spatial)
    x = torch.from_numpy(np.asarray(inputs, dtype=np.float64)).sum(dim=0, keepdim=True)
    if spatial == 1:  # as a 2-D input of height 1
        x, kernel, pads, strides, dilations = x[:, :, None], (1, *kernel), [0, pads[0], 0, pads[1]], [1, *strides], [1, *dilations]
    # ONNX pads are (begin_1, begin_2, end_1, end_2); F.pad wants (begin_2, end_2, begin_1, end_1)
    x = F.pad(x, [pads[1], pads[3], pads[0], pads[2]])
    columns = F.unfold(x, kernel_size=tuple(kernel), dilation=tuple(dilations), stride=tuple(strides))  # (1, C x taps, positions)
    taps = columns.mean(dim=2)[0].reshape(x.shape[1], *kernel).numpy()
    return taps[:, 0] if spatial == 1 else taps


def conv_input_means(prepared: Path, data: Encoded) -> ConvInputMeans:
    """One pass of data through the FP32 model, summing what each correctable convolution's kernel taps read."""
    model = onnx.load(str(prepared), load_external_data=False)
    kernels = {init.name: tuple(init.dims[2:]) for init in model.graph.initializer}
    convs = _correctable_convs(model)
    sums: dict[str, np.ndarray] = {}
    samples = 0
    if convs:
        tensors = sorted({node.input[0] for node in convs})
        for values in run_with_intermediates(prepared, tensors, data.batches(CALIBRATION_BATCH)):
            for node in convs:
                taps = tap_means(node, values[node.input[0]], kernels[node.input[1]])
                sums[node.name] = taps if node.name not in sums else sums[node.name] + taps
            samples += len(next(iter(values.values())))
    return ConvInputMeans({name: total / max(samples, 1) for name, total in sums.items()}, samples)


def weight_rounding_shift(taps: np.ndarray, weight_error: np.ndarray, group: int = 1) -> np.ndarray:
    """Per output channel o: the sum over its group's input channels i and the taps k of weight_error[o, i, k] x taps[i, k]."""
    outputs, per_group = weight_error.shape[0], weight_error.shape[1]
    group_taps = taps.reshape(group, per_group, *taps.shape[1:])  # input channels, by group
    of_output = np.repeat(group_taps, outputs // group, axis=0)  # (outputs, per_group, *kernel): the taps each output reads
    return (weight_error * of_output).reshape(outputs, -1).sum(axis=1)


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
        quantized_node, taps = by_name.get(node.name), means.taps.get(node.name)
        if quantized_node is None or taps is None or not _float_bias(quantized_node, initializers):
            continue
        dequantize = producers.get(quantized_node.input[1])
        weight = dequantized_weight(dequantize, initializers) if dequantize is not None else None
        if weight is None:  # kept in float
            continue
        error = weight.astype(np.float64) - numpy_helper.to_array(float_weights[node.input[1]]).astype(np.float64)
        shift = weight_rounding_shift(taps, error, _attributes(node).get("group", 1))
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
