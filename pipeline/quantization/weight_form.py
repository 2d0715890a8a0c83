"""How the INT8 weights are stored: INT8 initializers read by DequantizeLinear, or float -> Q -> DQ for TensorRT 8.x.

onnxruntime.quantization's QDQQuantizer (and the INT8 embedding, embedding.py) write each weight pre-quantized:

    w_int8 (initializer) -> DequantizeLinear(scale, zero_point, axis) -> op

TensorRT 8.x's builder refuses an INT8 constant as a DequantizeLinear's input (onnxruntime#14229, TensorRT 8.5:
"..._DequantizeLinear: only activation types allowed as input to this layer"; onnxruntime#11535, Sparsebit#16:
"invalid weights type of Int8"); it takes the QAT form pytorch-quantization exports, float weights quantized by
the graph, and quantizes them itself at build time (TensorRT developer guide, Explicit Quantization):

    w_float (initializer) -> QuantizeLinear(scale, zero_point, axis) -> DequantizeLinear(scale, zero_point, axis) -> op

with w_float = (w_int8 - zero_point) * scale, so that QuantizeLinear(w_float) gives w_int8 back exactly and the
model computes what it computed before. Which TensorRT needs it is the lint's fact
(pipeline.lint.takes_prequantized_weights), so the lint and this rewrite cannot disagree. The ONNX file gets
the float weights' size back; the engine TensorRT builds from it stores them in INT8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.lint import takes_prequantized_weights
from pipeline.quantization.topology import sort_nodes_topologically
from pipeline.targets import Target

__all__ = ["WeightForm", "FLOAT_QDQ", "WEIGHT_FORM_RULE", "weight_form_for", "requantize_from_float", "dequantized_weight"]

WeightForm = Literal["float-qdq"]
FLOAT_QDQ: WeightForm = "float-qdq"
WEIGHT_FORM_RULE = ("float weights -> QuantizeLinear -> DequantizeLinear (TensorRT < 9 refuses INT8 constants into "
                    "DequantizeLinear: onnxruntime#14229, #11535; pipeline/lint.py PREQUANTIZED_WEIGHTS_SINCE)")

_QUANTIZED_WEIGHT_TYPES = (TensorProto.INT8, TensorProto.UINT8)
# ONNX's QuantizeLinear/DequantizeLinear: axis defaults to 1 (Operators.md, DequantizeLinear-13 and later).
_DEFAULT_AXIS = 1


def weight_form_for(target: Target) -> WeightForm | None:
    """FLOAT_QDQ for a TensorRT target whose DequantizeLinear cannot read INT8 constants; None keeps the weights INT8."""
    tensorrt = target.software.tensorrt if target.software.runtime == "tensorrt" else None
    if tensorrt is None or takes_prequantized_weights(tensorrt):
        return None
    return FLOAT_QDQ


@dataclass(frozen=True)
class _QuantizedWeight:
    """One DequantizeLinear's INT8 (or UINT8) initializer with the parameters that dequantize it."""

    data: str
    scale: str
    zero_point: str | None
    axis: int | None  # None: the attribute is absent (its default applies)

    @property
    def key(self) -> tuple[str, str, str | None, int | None]:
        return (self.data, self.scale, self.zero_point, self.axis)


def requantize_from_float(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every DequantizeLinear reading an INT8/UINT8 initializer to read QuantizeLinear(float weight).

    The float weight is (q - zero_point) * scale in the scale's type; the QuantizeLinear takes the
    DequantizeLinear's own scale, zero point and axis (a zero point is added to both where the DequantizeLinear
    had none, so that the QuantizeLinear's output keeps q's type). DequantizeLinears sharing one weight and its
    parameters share one QuantizeLinear. INT8 initializers nothing reads any more are removed, and the nodes
    re-sorted (the ONNX spec requires topological order). Raises ValueError where QuantizeLinear would not give
    q back exactly. Returns the number of DequantizeLinear nodes rewritten.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    requantized: dict[tuple, onnx.NodeProto] = {}  # _QuantizedWeight.key -> the QuantizeLinear standing for it
    ordered: list[onnx.NodeProto] = []  # the nodes, each new QuantizeLinear just before its first DequantizeLinear
    rewritten = 0
    for node in graph.node:
        weight = _quantized_weight(node, initializers)
        if weight is not None:
            if weight.key not in requantized:
                requantized[weight.key] = _quantize_node(graph, node, weight, initializers)
                ordered.append(requantized[weight.key])
            node.input[0] = requantized[weight.key].output[0]
            if weight.zero_point is None:  # Q's output is UINT8 without a zero point: give DQ the one Q got
                _set_input(node, 2, _zero_point_name(weight))
            rewritten += 1
        ordered.append(node)
    if rewritten:
        graph.ClearField("node")
        graph.node.extend(ordered)
        _remove_unread_initializers(graph, {key[0] for key in requantized})
        sort_nodes_topologically(graph)
    return rewritten


def dequantized_weight(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """What a DequantizeLinear reading an INT8/UINT8 initializer computes, (q - zero_point) * scale; None for other nodes."""
    weight = _quantized_weight(node, initializers)
    if weight is None:
        return None
    q, scale = numpy_helper.to_array(initializers[weight.data]), numpy_helper.to_array(initializers[weight.scale])
    zero_point = numpy_helper.to_array(initializers[weight.zero_point]) if weight.zero_point else np.zeros(scale.shape, q.dtype)
    return _dequantized(q, scale, zero_point, weight.axis)


def _quantized_weight(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> _QuantizedWeight | None:
    if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    data = initializers.get(node.input[0])
    if data is None or data.data_type not in _QUANTIZED_WEIGHT_TYPES:
        return None
    zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
    for name in (node.input[1], zero_point):
        if name is not None and name not in initializers:
            raise ValueError(f"DequantizeLinear '{node.name}': '{name}' is not an initializer; its weight cannot be "
                             "written as float -> QuantizeLinear")
    axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), None)
    return _QuantizedWeight(node.input[0], node.input[1], zero_point, axis)


def _quantize_node(graph: onnx.GraphProto, dequantize: onnx.NodeProto, weight: _QuantizedWeight,
                   initializers: dict[str, onnx.TensorProto]) -> onnx.NodeProto:
    """Add the float weight (and a zero point where there was none); the QuantizeLinear that reads them."""
    q = numpy_helper.to_array(initializers[weight.data])
    scale = numpy_helper.to_array(initializers[weight.scale])
    if weight.zero_point is not None:
        zero_point_name = weight.zero_point
        zero_point = numpy_helper.to_array(initializers[weight.zero_point])
    else:
        zero_point_name = _zero_point_name(weight)
        zero_point = np.zeros(scale.shape, dtype=q.dtype)
        _add_initializer(graph, initializers, numpy_helper.from_array(zero_point, zero_point_name))
    float_weight = _dequantized(q, scale, zero_point, weight.axis)
    _refuse_inexact(dequantize, q, float_weight, scale, zero_point, weight.axis)
    float_name = _unique(f"{weight.data}.float", initializers)
    _add_initializer(graph, initializers, numpy_helper.from_array(float_weight, float_name))
    output = f"{float_name}.quantized"
    attributes = {} if weight.axis is None else {"axis": weight.axis}
    return helper.make_node("QuantizeLinear", [float_name, weight.scale, zero_point_name], [output],
                            name=f"{dequantize.name or float_name}.weight_quantize", **attributes)


def _broadcast(values: np.ndarray, rank: int, axis: int | None) -> np.ndarray:
    """A per-tensor parameter as is; a per-axis one (1-D, one value per slice) shaped to broadcast along axis."""
    if values.size == 1:
        return values.reshape(())
    shape = [1] * rank
    shape[(_DEFAULT_AXIS if axis is None else axis) % rank] = values.size
    return values.reshape(shape)


def _dequantized(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None) -> np.ndarray:
    """(q - zero_point) * scale, as DequantizeLinear defines it, in the scale's float type."""
    shifted = q.astype(np.int32) - _broadcast(zero_point, q.ndim, axis).astype(np.int32)
    return (shifted.astype(scale.dtype) * _broadcast(scale, q.ndim, axis)).astype(scale.dtype)


def _refuse_inexact(node: onnx.NodeProto, q: np.ndarray, float_weight: np.ndarray, scale: np.ndarray,
                    zero_point: np.ndarray, axis: int | None) -> None:
    """QuantizeLinear (round half to even, saturate: Operators.md) of the float weight must give q back exactly."""
    info = np.iinfo(q.dtype)
    rounded = np.rint(float_weight / _broadcast(scale, q.ndim, axis)) + _broadcast(zero_point, q.ndim, axis).astype(np.float64)
    if not np.array_equal(np.clip(rounded, info.min, info.max).astype(q.dtype), q):
        raise ValueError(f"DequantizeLinear '{node.name}': the float weight does not quantize back to '{node.input[0]}'")


def _zero_point_name(weight: _QuantizedWeight) -> str:
    return f"{weight.data}.float.zero_point"


def _unique(name: str, taken: dict[str, Any]) -> str:
    candidate, suffix = name, 1
    while candidate in taken:
        candidate, suffix = f"{name}.{suffix}", suffix + 1
    return candidate


def _add_initializer(graph: onnx.GraphProto, initializers: dict[str, onnx.TensorProto], tensor: onnx.TensorProto) -> None:
    graph.initializer.append(tensor)
    initializers[tensor.name] = graph.initializer[-1]


def _set_input(node: onnx.NodeProto, index: int, name: str) -> None:
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = name


def _read_names(graph: onnx.GraphProto) -> set[str]:
    """Every name a node reads, in this graph or in its subgraphs (If/Loop/Scan bodies may read outer initializers)."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            for subgraph in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)):
                names |= _read_names(subgraph)
    return names


def _remove_unread_initializers(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Drop the INT8 initializers nothing reads now (and a graph input or value_info naming one)."""
    unread = candidates - _read_names(graph) - {output.name for output in graph.output}
    if not unread:
        return
    for field in (graph.initializer, graph.input, graph.value_info):
        for entry in [entry for entry in field if entry.name in unread]:
            field.remove(entry)
