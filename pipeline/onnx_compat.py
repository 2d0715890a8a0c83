"""An export an older TensorRT can parse: decompose the ops its ONNX parser lacks, lower the opset it does not document.

The exporter writes opset 18 (pipeline/export.py). TensorRT 8.5 (JetPack 5.1,
the last JetPack for Xavier) documents opsets up to 17 and has no
LayerNormalization importer (onnx-tensorrt docs/operators.md at 8.5: "TensorRT
8.5 supports operators up to Opset 17"; CHANGELOG, 8.6 EA: "Added support for
GroupNormalization, LayerNormalization, IsInf"). What a target's parser takes
comes from the lint's operator table (pipeline/trt_onnx_ops.toml), or from the
target's own `[export] max_opset`. Targets whose parser takes the export as it
is get no lowering at all (lowering_for returns None): their export pass, its
config and its bytes stay what they were.

An op the parser lacks and this module cannot decompose refuses the build with
an InputError naming the TensorRT version and the op, at export time rather
than at the engine stage's lint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, version_converter

from pipeline.errors import InputError
from pipeline.lint import OperatorTable, operator_table
from pipeline.targets import Target

SOURCE_OPSET = 18  # what pipeline/export.py writes (kept equal to export.OPSET by tests/test_export_compat.py)
_DEFAULT_DOMAINS = ("", "ai.onnx")
# ReduceMean takes its axes as an input from opset 18 and as an attribute before (ONNX Operators.md, ReduceMean-18).
_REDUCE_AXES_AS_INPUT_SINCE = 18


@dataclass(frozen=True)
class Lowering:
    """How the export is rewritten for a parser (part of the export pass's config, hence of its cache key)."""

    opset: int  # the default-domain opset the model is converted to
    decompose: tuple[str, ...]  # ops rewritten into primitives (sorted)
    tensorrt: str | None  # the parser whose operator table the converted model is checked against; None: not a TensorRT target


# ------------------------------------------------------------------ deciding


def lowering_for(target: Target) -> Lowering | None:
    """The rewrite target's parser needs, or None where it takes the opset-18 export as it is."""
    tensorrt = target.software.tensorrt if target.software.runtime == "tensorrt" else None
    table = operator_table(tensorrt) if tensorrt else None
    limit = target.export.max_opset or (table.max_opset if table else None)
    opset = min(SOURCE_OPSET, limit) if limit else SOURCE_OPSET
    if table is not None and table.min_opset is not None and opset < table.min_opset:
        raise InputError(f"target '{target.name}': export.max_opset = {opset} is below opset {table.min_opset}, "
                         f"the oldest TensorRT {tensorrt}'s ONNX parser documents")
    decompose = tuple(sorted(op for op in DECOMPOSITIONS if not _kept(op, opset, table, tensorrt)))
    if opset == SOURCE_OPSET and not decompose:
        return None
    return Lowering(opset=opset, decompose=decompose, tensorrt=tensorrt)


def _kept(op: str, opset: int, table: OperatorTable | None, tensorrt: str | None) -> bool:
    """Whether op may stay: it exists at opset and the target's parser imports it."""
    return _in_opset(op, opset) and (table is None or table.parses(op, tensorrt))


def _in_opset(op: str, opset: int) -> bool:
    try:
        onnx.defs.get_schema(op, opset)
    except onnx.defs.SchemaError:
        return False
    return True


# ------------------------------------------------------------------ rewriting


def lower(model: onnx.ModelProto, lowering: Lowering) -> onnx.ModelProto:
    """model rewritten as lowering says, checked (onnx full check) and refused where its parser still lacks an op."""
    model = _decompose(model, lowering.decompose)
    if lowering.opset < _default_opset(model):
        model = _convert_opset(model, lowering.opset)
    # The IR version of the onnx release that introduced the opset (8 for opset 17: onnx 1.12, which
    # onnx-tensorrt bundles from TensorRT 8.4.2 on, CHANGELOG "22.08: Updated ONNX submodule version to 1.12").
    model.ir_version = helper.find_min_ir_version_for(model.opset_import)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as error:
        raise InputError(f"the export converted to opset {lowering.opset} is not a valid ONNX model: {error}")
    if lowering.tensorrt:
        refuse_unparsed_ops(model, lowering.tensorrt)
    return model


def _default_opset(model: onnx.ModelProto) -> int:
    return next(entry.version for entry in model.opset_import if entry.domain in _DEFAULT_DOMAINS)


def _decompose(model: onnx.ModelProto, ops: tuple[str, ...]) -> onnx.ModelProto:
    if not any(node.op_type in ops for node in model.graph.node):
        return model
    graph = gs.import_onnx(model)
    opset = graph.opset
    for node in [n for n in graph.nodes if n.op in ops and (n.domain or "") in _DEFAULT_DOMAINS]:
        DECOMPOSITIONS[node.op](graph, node, opset)
        node.inputs.clear()
        node.outputs.clear()  # its outputs are now written by the decomposition; cleanup drops the node
    graph.cleanup().toposort()
    lowered = gs.export_onnx(graph)
    lowered.producer_name, lowered.producer_version = model.producer_name, model.producer_version
    return lowered


def _convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    try:
        converted = version_converter.convert_version(model, opset)
    except Exception as error:  # the converter raises RuntimeError/ConvertError with the op it has no adapter for
        raise InputError(f"the export cannot be converted from opset {_default_opset(model)} to {opset}: {error}")
    _drop_attributes_unknown_at(converted, opset)
    return converted


def _drop_attributes_unknown_at(model: onnx.ModelProto, opset: int) -> None:
    """Remove attributes the older schema lacks where they hold the newer schema's default (they changed nothing).

    onnx.version_converter (1.23) turns ReduceMean-18's axes input into ReduceMean-13's attribute but keeps
    noop_with_empty_axes, which ReduceMean-13 does not have: onnx's checker and ONNX Runtime reject the node.
    """
    for node in model.graph.node:
        if node.domain not in _DEFAULT_DOMAINS:
            continue
        known = onnx.defs.get_schema(node.op_type, opset).attributes
        newer = onnx.defs.get_schema(node.op_type, SOURCE_OPSET).attributes
        for attribute in [a for a in node.attribute if a.name not in known]:
            default = newer.get(attribute.name)
            if default is None or helper.get_attribute_value(attribute) != helper.get_attribute_value(default.default_value):
                raise InputError(f"node '{node.name}' [{node.op_type}]: attribute {attribute.name} has no equivalent at opset {opset}")
            node.attribute.remove(attribute)


def refuse_unparsed_ops(model: onnx.ModelProto, tensorrt: str) -> None:
    """InputError naming the first op TensorRT's parser does not import (custom domains are the lint's: plugins)."""
    table = operator_table(tensorrt)
    for node in model.graph.node:
        if node.domain in _DEFAULT_DOMAINS and not table.parses(node.op_type, tensorrt):
            raise InputError(f"TensorRT {tensorrt}'s ONNX parser cannot import {node.op_type} (node '{node.name}', "
                             f"{table.doc}) and edgepipe has no decomposition of it into ops that parser has")


# ------------------------------------------------------------------ decompositions


def _decompose_layer_normalization(graph: gs.Graph, node: gs.Node, opset: int) -> None:
    """LayerNormalization -> (x - mean) / sqrt(var + eps) * scale + bias, over axes [axis, rank).

    The computation ONNX Operators.md (LayerNormalization-17) defines the op by, in ops every TensorRT 8.x parser
    imports. The square is Mul(d, d), not the Pow(d, 2) torch.onnx writes below opset 17: ONNX Runtime's
    LayerNormFusion (onnxruntime/core/optimizer/layer_norm_fusion.cc: ReduceMean -> Sub -> Pow -> ReduceMean ->
    Add -> Sqrt -> Div -> Mul -> Add), which the quantize stage's quant_pre_process runs, matches the Pow chain
    and would put a LayerNormalization back into the INT8 model. Same value: d * d is what Pow(d, 2) computes.
    The optional Mean and InvStdDev outputs are written when present.
    """
    x, scale = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if x.dtype is not None and np.dtype(x.dtype) != np.float32:
        raise InputError(f"node '{node.name}' [LayerNormalization]: only float32 inputs are decomposed (got {x.dtype})")
    prefix = node.name or node.outputs[0].name
    axes = _trailing_axes(node.attrs.get("axis", -1), x, node.name)
    epsilon = np.float32(node.attrs.get("epsilon", 1e-5))
    outputs = list(node.outputs) + [None] * (3 - len(node.outputs))
    y, mean_out, inv_std_out = (t if t is not None and t.name else None for t in outputs)

    def step(op: str, inputs: list, name: str, out: gs.Variable | None = None, **attrs: Any) -> gs.Variable:
        target = out if out is not None else gs.Variable(f"{prefix}/{name}", dtype=np.float32)
        graph.layer(op=op, name=f"{prefix}/{name}", inputs=inputs, outputs=[target], attrs=attrs)
        return target

    def constant(name: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(f"{prefix}/{name}", np.asarray(value))

    def reduce_mean(value: gs.Variable, name: str, out: gs.Variable | None = None) -> gs.Variable:
        if opset >= _REDUCE_AXES_AS_INPUT_SINCE:
            return step("ReduceMean", [value, constant(f"{name}_axes", np.array(axes, dtype=np.int64))], name, out, keepdims=1)
        return step("ReduceMean", [value], name, out, axes=list(axes), keepdims=1)

    mean = reduce_mean(x, "mean", mean_out)
    centered = step("Sub", [x, mean], "centered")
    variance = reduce_mean(step("Mul", [centered, centered], "squared"), "variance")
    std = step("Sqrt", [step("Add", [variance, constant("epsilon", epsilon)], "variance_eps")], "std")
    normalized = step("Div", [centered, std], "normalized")
    scaled = step("Mul", [normalized, scale], "scaled", None if bias is not None else y)
    if bias is not None:
        step("Add", [scaled, bias], "shifted", y)
    if inv_std_out is not None:
        step("Reciprocal", [std], "inv_std", inv_std_out)


def _trailing_axes(axis: int, x: gs.Tensor, name: str) -> tuple[int, ...]:
    """The axes [axis, rank) as negative indices, which ReduceMean takes at any rank."""
    if axis < 0:
        return tuple(range(axis, 0))
    if x.shape is None:
        raise InputError(f"node '{name}' [LayerNormalization]: axis = {axis} needs the input's rank, which the graph does not record")
    return tuple(range(axis - len(x.shape), 0))


DECOMPOSITIONS: dict[str, Callable[[gs.Graph, gs.Node, int], None]] = {
    "LayerNormalization": _decompose_layer_normalization,
}
