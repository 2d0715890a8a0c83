"""Where Q/DQ go: the quantizable regions of a graph, and the rule that picks them.

A region is the unit the fallback returns to float: one node with the Q/DQ
on its inputs (and its weight). Which nodes become regions follows NVIDIA's
placement rule for explicit quantization:

    "quantize all inputs of weighted operations (Convolution, Transposed
    Convolution and GEMM) [...] quantize the residual input in residual
    connections" and leave the choice of the output to the consumer's input Q/DQ
    -- TensorRT Developer Guide, "Working with Quantized Types", Q/DQ Layer
    Placement Recommendations; TensorRT#3197 and Model-Optimizer#207 show the
    slowdown when Q/DQ sit elsewhere.

So: weighted ops (Conv, ConvTranspose, Gemm, MatMul with a constant weight),
and residual Adds (two same-shaped activations, one from a convolution; see
RESIDUAL_PRODUCERS for why transformer residual adds stay float).
Activation x activation MatMuls (attention scores) are not weighted ops and
stay float, as do LayerNormalization, Softmax, GELU/Erf and every other
numerically fragile op: TensorRT runs them in FP16 beside INT8 (TensorRT#2564,
#4723 report accuracy losses when they are quantized). The token embedding is
its own region: an INT8 table with one scale per row (embedding.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping

import numpy as np

from onnx import numpy_helper

from pipeline.onnx_graph import producers_and_consumers

PLACEMENT_RULE = ("TensorRT Developer Guide, Q/DQ Layer Placement Recommendations: quantize the inputs and weights "
                  "of weighted ops and both inputs of convolution residual adds; transformer residual adds and fragile "
                  "ops (LayerNorm, Softmax, GELU) stay float (TensorRT#2564, #4723; outlier features, LLM.int8())")
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FUSABLE_ACTIVATIONS = ("Relu", "Clip")
# Residual adds are quantized after convolutions (TensorRT fuses conv + residual add), not in transformer
# residual streams: their outlier dimensions make a per-tensor INT8 scale ruinous (measured on the default
# model: quantizing MiniLM's residual adds alone drops logit SQNR to 13 dB and top-1 agreement to 0.90;
# outlier features in transformer activations: Dettmers et al., LLM.int8(), 2022).
RESIDUAL_PRODUCERS = ("Conv", "ConvTranspose")
# For the same reason the CPU form leaves in float the Gemm/MatMul whose output is added to the residual
# stream: ONNX Runtime fuses a quantized Gemm only with a Q on its output (QGemm), and that Q puts INT8
# noise into the stream, while without it the weights are dequantized on every run (measured on the default
# model: 2.6x slower at batch 1 than FP32).
RESIDUAL_WRITERS = ("Gemm", "MatMul")
EMBEDDING_MIN_ELEMENTS = 1 << 20  # tables this large dominate the file; smaller ones (positions) stay float
_FLOAT = 1  # onnx.TensorProto.FLOAT
_PASS_THROUGH = ("BatchNormalization", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")  # value-preserving

RegionKind = Literal["weighted", "residual-add", "embedding"]


@dataclass(frozen=True)
class Region:
    """Nodes that are quantized, or returned to float, together."""

    name: str  # the ONNX node's name
    op_type: str
    kind: RegionKind
    activations: tuple[str, ...]  # activation tensors it quantizes (inputs; outputs are calibrated too)
    output: str  # the region's output: the weighted op's, or that of the activation fused into it
    fused: tuple[str, ...] = ()  # a Relu/Clip quantized with it (the CPU form folds it into the U8 range)
    # the fused activation's bounds: once it is folded into the Q range, the tensor named `output`
    # holds the unclipped values in the INT8 graph, so comparisons clip them first
    clip: tuple[float, float] | None = None
    outputs: tuple[str, ...] = ()  # every output tensor that may get Q/DQ (calibrated)

    @property
    def nodes(self) -> tuple[str, ...]:
        return (self.name, *self.fused)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "op_type": self.op_type, "kind": self.kind, "nodes": list(self.nodes)}


class GraphIndex:
    """Producers, consumers, constants and known shapes/types of an ONNX graph."""

    def __init__(self, model: Any):
        graph = model.graph
        self.constants: set[str] = {init.name for init in graph.initializer}
        self.initializers: Mapping[str, Any] = {init.name: init for init in graph.initializer}
        self.producer, self.consumers = producers_and_consumers(graph)
        for node in graph.node:
            if node.op_type == "Constant":
                self.constants.update(node.output)
        infos = [*graph.input, *graph.value_info, *graph.output]
        self.elem_type = {info.name: info.type.tensor_type.elem_type for info in infos}
        self.shape = {info.name: _shape(info) for info in infos if info.type.tensor_type.HasField("shape")}

    def is_float_activation(self, name: str) -> bool:
        return bool(name) and name not in self.constants and self.elem_type.get(name) == _FLOAT

    def constant_value(self, name: str) -> float | None:
        if name in self.initializers:
            return float(numpy_helper.to_array(self.initializers[name]).reshape(-1)[0])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return float(numpy_helper.to_array(node.attribute[0].t).reshape(-1)[0])
        return None

    def activation_bounds(self, node: Any) -> tuple[float, float]:
        """[low, high] a Relu or Clip limits its input to."""
        if node.op_type == "Relu":
            return (0.0, float("inf"))
        low = self.constant_value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        high = self.constant_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return (-float("inf") if low is None else low, float("inf") if high is None else high)

    def feeds_residual_add(self, name: str) -> bool:
        """Whether name reaches (through its bias Add or value-preserving ops) an Add of two same-shaped activations."""
        frontier = [name]
        for _ in range(4):
            following = []
            for tensor in frontier:
                for node in self.consumers.get(tensor, []):
                    others = [i for i in node.input if i != tensor]
                    if node.op_type == "Add" and others and all(self.is_float_activation(i) for i in others) \
                            and self.shape.get(others[0]) is not None and self.shape.get(others[0]) == self.shape.get(node.output[0]):
                        return True
                    if node.op_type in _PASS_THROUGH or (node.op_type == "Add" and any(i in self.constants for i in node.input)):
                        following.extend(node.output)
            frontier = following
        return False

    def weighted_producer(self, name: str) -> str | None:
        """The op type of the weighted op name comes from, through its bias Add or value-preserving ops."""
        node = self.producer.get(name)
        for _ in range(4):
            if node is None:
                return None
            if node.op_type in WEIGHTED_OPS:
                return node.op_type
            if node.op_type in _PASS_THROUGH or (node.op_type == "Add" and any(i in self.constants for i in node.input)):
                node = self.producer.get(next(i for i in node.input if i not in self.constants))
                continue
            return None
        return None


def _shape(info: Any) -> tuple:
    return tuple(d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim)


def _weighted_region(node: Any, index: GraphIndex, op_types: Iterable[str]) -> Region | None:
    if node.op_type not in WEIGHTED_OPS or node.op_type not in op_types or len(node.input) < 2:
        return None
    data, weight = node.input[0], node.input[1]
    if not index.is_float_activation(data) or weight not in index.initializers:
        return None  # activation x activation (attention) or an already-quantized weight
    return Region(node.name, node.op_type, "weighted", (data,), node.output[0], outputs=(node.output[0],))


def _with_fused_activation(region: Region, index: GraphIndex) -> Region:
    """The weighted region extended by a Relu/Clip that is its output's only consumer."""
    consumers = index.consumers.get(region.output, [])
    if len(consumers) != 1 or consumers[0].op_type not in FUSABLE_ACTIVATIONS:
        return region
    activation = consumers[0]
    return Region(region.name, region.op_type, region.kind, region.activations, activation.output[0],
                  fused=(activation.name,), outputs=(region.output, activation.output[0]),
                  clip=index.activation_bounds(activation))


def _residual_add_region(node: Any, index: GraphIndex) -> Region | None:
    if node.op_type != "Add" or len(node.input) != 2:
        return None
    left, right = node.input
    if not (index.is_float_activation(left) and index.is_float_activation(right)):
        return None
    shapes = index.shape.get(left), index.shape.get(right)
    if shapes[0] is None or shapes[0] != shapes[1]:
        return None  # a broadcast (the attention mask) is not a residual connection
    if not {index.weighted_producer(left), index.weighted_producer(right)} & set(RESIDUAL_PRODUCERS):
        return None  # transformer residual streams: see RESIDUAL_PRODUCERS
    return Region(node.name, node.op_type, "residual-add", (left, right), node.output[0], outputs=(node.output[0],))


def _embedding_region(node: Any, index: GraphIndex) -> Region | None:
    if node.op_type != "Gather" or node.input[0] not in index.initializers:
        return None
    table = index.initializers[node.input[0]]
    if table.data_type != _FLOAT or len(table.dims) != 2 or int(np.prod(table.dims)) < EMBEDDING_MIN_ELEMENTS:
        return None
    return Region(node.name, node.op_type, "embedding", (), node.output[0])


def find_regions(model: Any, op_types: Iterable[str], residual_adds: bool, embedding: bool,
                 fuse_activations: bool = False, float_residual_writers: bool = False) -> list[Region]:
    """The quantizable regions of model, in graph order.

    float_residual_writers: leave in float the Gemm/MatMul that write into a transformer's residual
    stream (attention output projection, second FFN layer); see RESIDUAL_WRITERS.
    """
    index = GraphIndex(model)
    op_types = tuple(op_types)
    found: list[Region] = []
    for node in model.graph.node:
        region = (_weighted_region(node, index, op_types)
                  or (_residual_add_region(node, index) if residual_adds else None)
                  or (_embedding_region(node, index) if embedding else None))
        if region is not None and float_residual_writers and region.op_type in RESIDUAL_WRITERS \
                and index.feeds_residual_add(region.output):
            continue
        if region is not None and fuse_activations and region.kind == "weighted":
            region = _with_fused_activation(region, index)
        if region is not None:
            found.append(region)
    return found


def name_unnamed_nodes(model: Any) -> None:
    """Give every node a unique name: regions are addressed by node name."""
    taken = {node.name for node in model.graph.node if node.name}
    for position, node in enumerate(model.graph.node):
        if node.name:
            continue
        candidate = f"{node.op_type}_{position}"
        while candidate in taken:
            candidate += "_"
        node.name = candidate
        taken.add(candidate)
