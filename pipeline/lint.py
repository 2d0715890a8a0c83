"""TensorRT readiness lint: what in an ONNX model the target's TensorRT will reject or run badly.

Run by `python -m pipeline inspect MODEL.onnx --target T`, before the engine
stage, and written into the device bundle (lint.json). Every rule names its
source; the supported-operator lists are data (trt_onnx_ops.toml, transcribed
from onnx-tensorrt's docs/operators.md). Error findings mean the parser or
builder will fail (or silently compute something else); warnings mean it will
build but not as intended (float where INT8 was meant, GPU where DLA was).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import numpy as np

import onnx
from onnx import TensorProto, numpy_helper

from pipeline.errors import InputError
from pipeline.onnx_graph import producers_and_consumers
from pipeline.targets import Target, version_tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

OPS_FILE = Path(__file__).resolve().parent / "trt_onnx_ops.toml"
Severity = Literal["error", "warning", "info"]

SOURCE_OPS = "onnx-tensorrt docs/operators.md (support matrix)"
SOURCE_QDQ_ZERO_POINT = "onnx-tensorrt docs/operators.md: QuantizeLinear y_zero_point / DequantizeLinear x_zero_point must be 0"
SOURCE_QDQ_TYPES = "onnx-tensorrt docs/operators.md: INT8 is a quantized type; UINT8 only as network input/output"
SOURCE_QDQ_SCALE = "TensorRT developer guide, Explicit Quantization: Q/DQ scales must be positive build-time constants"
SOURCE_QDQ_PLACEMENT = "TensorRT developer guide, Q/DQ layer-placement recommendations (quantize all inputs of weighted ops and residual adds); TensorRT#3197"
SOURCE_INT64 = "onnx-tensorrt docs/operators.md (8.5): INT64 is cast down to INT32, clamped; CHANGELOG 9.0: INT64 supported natively"
SOURCE_DOUBLE = "onnx-tensorrt docs/operators.md: DOUBLE is cast down to FLOAT, clamped to +-FLT_MAX"
SOURCE_QDQ_BIAS = "onnx-tensorrt#850, onnxruntime#17738: ONNX Runtime's INT32 bias DequantizeLinear fails TensorRT's parser"
SOURCE_QDQ_8X_WEIGHTS = ("onnx-tensorrt#850 (maintainer: DequantizeLinear inputs must be floating-point 'activation' types "
                         "in TensorRT 8.x), onnxruntime#14229 (TensorRT 8.5: '..._DequantizeLinear: only activation types allowed "
                         "as input to this layer' for an INT8 initializer), onnxruntime#11535 and Sparsebit#16 (8.0/8.2: "
                         "'invalid weights type of Int8'); pre-quantized weights into DequantizeLinear are documented by TensorRT "
                         "10's developer guide (Explicit Quantization, 'Quantized Weights')")
# The first TensorRT whose builder takes INT8 constants as a DequantizeLinear's input. 8.x (8.5 on JetPack 5.1,
# 8.6.2 on JetPack 6.0) refuses them (SOURCE_QDQ_8X_WEIGHTS); 10.x documents them. 9.x (data-centre only, never on
# a JetPack) is UNCONFIRMED either way and counted with 10, as this rule always did. Shared with the quantize stage
# (pipeline/quantization/weight_form.py), which writes float weights -> QuantizeLinear -> DequantizeLinear below it.
PREQUANTIZED_WEIGHTS_SINCE = (9, 0)
# The integer weight types a DequantizeLinear of TensorRT < PREQUANTIZED_WEIGHTS_SINCE cannot read from a constant.
_PREQUANTIZED_WEIGHT_TYPES = (np.int8, np.uint8)
SOURCE_PROFILE = "TensorRT optimization profiles: every dynamic input dimension needs min/opt/max; the target gives only the batch"
SOURCE_DLA = "NVIDIA TensorRT 'DLA Supported Layers and Restrictions'"
SOURCE_DLA_QDQ = ("TensorRT#2222 (maintainers: DLA does not support QAT/explicit quantization; convert to implicit), "
                  "cuDLA-samples#19 (Q/DQ constants 'not supported on DLA'), Model-Optimizer#1661 (2026: 'DLA still only "
                  "supports IQ'; Q/DQ Translator -> calib.cache); TensorRT 11.4.1 'Strongly Typed Networks for DLA'")
SOURCE_QDQ_GATHER = ("TensorRT developer guide, Explicit Quantization: a DQ moves forward only across layers that commute "
                     "with it; onnx-tensorrt imports a per-axis DQ into Gather (INT8 embedding) but whether TensorRT 10.3 "
                     "keeps the table INT8 is undocumented (shared/TENSORRT.md: UNCONFIRMED)")
# Explicit quantization (Q/DQ) on DLA: 8.x and 10.x DLA take implicit (calibrated) INT8 only; the first
# release whose DLA builds take Q/DQ is 11.4.1 (DLA back, strongly typed only, on AGX Orin with JetPack 7.2.2).
_DLA_QDQ_SINCE = (11, 4, 1)

# ops through which TensorRT moves a DequantizeLinear forward to the op it
# fuses into (data movement only: the values are unchanged).
# Relu too: with a zero point of 0 and a positive scale, relu(s*q) = s*relu(q).
_COMMUTING_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "MaxPool",
                            "Slice", "Gather", "Concat", "Split", "Expand", "Relu"})
# ...but only a per-tensor DQ (one scale) moves across these: a per-axis DQ's scales are
# indexed along an axis these pick rows from (a Gather of an INT8 embedding table gives
# each row its own scale), so one Q/DQ pair cannot stand for the result.
_PER_TENSOR_ONLY_OPS = frozenset({"Gather"})
# ops a DequantizeLinear fuses into: weighted ops, the residual add, INT8 pooling.
_DQ_FUSING_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "AveragePool", "GlobalAveragePool",
                            "QuantizeLinear"})
_WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Finding:
    severity: Severity
    rule: str
    node: str
    op: str
    message: str
    source: str = ""


@dataclass(frozen=True)
class LintReport:
    model: str
    target: str
    tensorrt: str | None
    findings: tuple[Finding, ...]

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "error")

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "warning")

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_on_errors(self) -> None:
        """InputError listing the error findings (the engine stage's precondition)."""
        if self.errors:
            shown = "\n  ".join(f"{f.node} [{f.op}] {f.rule}: {f.message}" for f in self.errors[:10])
            more = f"\n  ... and {len(self.errors) - 10} more" if len(self.errors) > 10 else ""
            raise InputError(f"{self.model} is not ready for TensorRT {self.tensorrt} (target '{self.target}'):\n  "
                             f"{shown}{more}\nsee `python -m pipeline inspect {self.model} --target {self.target}`")

    def to_json(self) -> dict[str, Any]:
        counts = {level: sum(f.severity == level for f in self.findings) for level in ("error", "warning", "info")}
        return {"model": self.model, "target": self.target, "tensorrt": self.tensorrt, "ok": self.ok,
                "counts": counts, "findings": [asdict(f) for f in self.findings]}

    def format_text(self) -> str:
        head = f"TensorRT readiness of {self.model} for target '{self.target}' (TensorRT {self.tensorrt or '-'}):"
        if not self.findings:
            return head + "\n  no findings"
        lines = [head]
        for f in self.findings:
            where = f" {f.node}" if f.node else ""
            op = f" [{f.op}]" if f.op else ""
            lines.append(f"  {f.severity.upper():7}{where}{op} {f.rule}: {f.message}")
        counts = self.to_json()["counts"]
        lines.append(f"  {counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} note(s)")
        return "\n".join(lines)


# ------------------------------------------------------------------- data


@dataclass(frozen=True)
class OperatorTable:
    major: int
    doc: str
    supported: frozenset[str]
    unsupported: frozenset[str]
    since: Mapping[str, str]
    max_opset: int | None
    min_opset: int | None = None

    def parses(self, op: str, tensorrt: str) -> bool:
        """Whether this TensorRT's parser imports op (a default-domain op; `since` checked by minor version)."""
        since = self.since.get(op)
        return op in self.supported and not (since and version_tuple(tensorrt) < version_tuple(since))


@lru_cache(maxsize=1)
def _ops_data() -> Mapping[str, Any]:
    return tomllib.loads(OPS_FILE.read_text(encoding="utf-8"))


def operator_table(tensorrt_version: str) -> OperatorTable:
    """The parser's operator list for a TensorRT version (by major; `since` by minor)."""
    version = version_tuple(tensorrt_version)
    tables = _ops_data()["tensorrt"]
    key = str(version[0])
    if key not in tables:
        raise InputError(f"no ONNX operator list for TensorRT {tensorrt_version} in {OPS_FILE} (have {', '.join(sorted(tables))})")
    entry = tables[key]
    data = tables[entry["same_as"]] if "same_as" in entry else entry
    limits = [(v, opset) for v, opset in data.get("max_opset", {}).items() if version_tuple(v) <= version]
    max_opset = max(limits, key=lambda item: version_tuple(item[0]))[1] if limits else None
    return OperatorTable(major=version[0], doc=entry["doc"], supported=frozenset(data["supported"]),
                         unsupported=frozenset(data["unsupported"]), since=dict(data.get("since", {})),
                         max_opset=max_opset, min_opset=data.get("min_opset"))


def dla_supported_ops() -> frozenset[str]:
    return frozenset(_ops_data()["dla"]["supported"])


# ------------------------------------------------------------------ graph


class _Graph:
    """Lookups over one ONNX graph: constants, producers and consumers of each tensor."""

    def __init__(self, graph: Any):
        self.graph = graph
        # None: a constant whose bytes live in an external data file (not loaded).
        self.constants: dict[str, np.ndarray | None] = {init.name: _initializer_value(init) for init in graph.initializer}
        self.producer, self.consumers = producers_and_consumers(graph)
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                value = _constant_node_value(node)
                if value is not None:
                    self.constants[node.output[0]] = value

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def fused_consumers(self, tensor: str, seen: frozenset[str] = frozenset(), per_axis: bool = False) -> Iterator[Any]:
        """The ops tensor's value reaches through commuting (data-movement) ops.

        per_axis: the value comes from a per-axis DequantizeLinear, which does not
        commute across _PER_TENSOR_ONLY_OPS (those are then yielded as consumers)."""
        for node in self.consumers.get(tensor, []):
            commutes = node.op_type in _COMMUTING_OPS and not (per_axis and node.op_type in _PER_TENSOR_ONLY_OPS)
            if commutes and node.name not in seen:
                for output in node.output:
                    yield from self.fused_consumers(output, seen | {node.name}, per_axis)
            else:
                yield node

    def comes_from_dequantize(self, tensor: str) -> bool:
        node = self.producer.get(tensor)
        crossed: set[str] = set()
        while node is not None and node.op_type in _COMMUTING_OPS and node.input:
            crossed.add(node.op_type)
            node = self.producer.get(node.input[0])
        if node is None or node.op_type != "DequantizeLinear":
            return False
        return not (crossed & _PER_TENSOR_ONLY_OPS and self.is_per_axis(node))

    def is_per_axis(self, node: Any) -> bool:
        """A Q/DQ with more than one scale (per-channel / per-row)."""
        scale = self.constants.get(node.input[1]) if len(node.input) > 1 else None
        return scale is not None and scale.size > 1


def _initializer_value(init: Any) -> np.ndarray | None:
    if init.data_location == TensorProto.EXTERNAL:
        return None
    return numpy_helper.to_array(init)


def _constant_node_value(node: Any) -> np.ndarray | None:
    for attribute in node.attribute:
        if attribute.name == "value" and attribute.HasField("t"):
            return numpy_helper.to_array(attribute.t)
    return None


def _label(node: Any) -> str:
    return node.name or f"<unnamed {node.op_type}>"


def _all_nodes(graph: Any) -> Iterator[Any]:
    """Every node, those inside If/Loop/Scan bodies included."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _all_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_nodes(subgraph)


# ------------------------------------------------------------------ rules


def _check_operators(model: Any, table: OperatorTable, tensorrt: str) -> Iterator[Finding]:
    version = version_tuple(tensorrt)
    for node in _all_nodes(model.graph):
        if node.domain not in _DEFAULT_DOMAINS:
            yield Finding("error", "custom-domain-op", _label(node), node.op_type,
                          f"op from domain '{node.domain}' has no TensorRT importer; it needs a TensorRT plugin", SOURCE_OPS)
            continue
        op = node.op_type
        if op in table.supported:
            since = table.since.get(op)
            if since and version < version_tuple(since):
                yield Finding("error", "unsupported-op", _label(node), op,
                              f"{op} is supported by TensorRT's ONNX parser only from {since}; target ships {tensorrt}", SOURCE_OPS)
            continue
        reason = "listed as unsupported" if op in table.unsupported else "not in the support matrix"
        yield Finding("error", "unsupported-op", _label(node), op,
                      f"{op} is {reason} for TensorRT {tensorrt}'s ONNX parser ({table.doc})", SOURCE_OPS)


def _check_opset(model: Any, table: OperatorTable, tensorrt: str) -> Iterator[Finding]:
    opset = next((entry.version for entry in model.opset_import if entry.domain in _DEFAULT_DOMAINS), None)
    if opset is not None and table.max_opset is not None and opset > table.max_opset:
        yield Finding("warning", "opset-too-new", "", "",
                      f"model uses opset {opset}; TensorRT {tensorrt}'s parser documents opsets up to {table.max_opset}",
                      SOURCE_OPS)


def _check_initializer_types(model: Any, major: int) -> Iterator[Finding]:
    for init in model.graph.initializer:
        if init.data_type == TensorProto.INT64:
            if major < 9:
                yield Finding("warning", "int64-initializer", init.name, "",
                              "INT64 initializer: TensorRT 8.x casts it down to INT32, clamping values beyond +-2^31", SOURCE_INT64)
            else:
                yield Finding("info", "int64-initializer", init.name, "",
                              "INT64 initializer: supported natively since TensorRT 9, but costs twice the memory of INT32", SOURCE_INT64)
        elif init.data_type == TensorProto.DOUBLE:
            yield Finding("warning", "double-initializer", init.name, "",
                          "DOUBLE initializer: TensorRT casts it down to FLOAT", SOURCE_DOUBLE)


def _check_dynamic_dims(model: Any, target: Target) -> Iterator[Finding]:
    initializers = {init.name for init in model.graph.initializer}
    for graph_input in model.graph.input:
        if graph_input.name in initializers:
            continue
        dims = graph_input.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            label = dim.dim_param or "?"
            if axis == 0:
                batch = target.builder.batch
                yield Finding("info", "dynamic-batch", graph_input.name, "",
                              f"dynamic batch axis '{label}': profile min/opt/max = {batch.min}/{batch.opt}/{batch.max}"
                              + (" (static, as DLA requires)" if target.builder.use_dla else ""), SOURCE_PROFILE)
            else:
                yield Finding("error", "dynamic-dim-without-profile", graph_input.name, "",
                              f"axis {axis} ('{label}') is dynamic but the target profiles only the batch axis: "
                              "export with a fixed size for it", SOURCE_PROFILE)


def _check_dla(model: Any, target: Target) -> Iterator[Finding]:
    if not target.builder.use_dla:
        return
    supported = dla_supported_ops()
    unsupported: dict[str, list[str]] = {}
    for node in _all_nodes(model.graph):
        if node.op_type not in supported:
            unsupported.setdefault(node.op_type, []).append(_label(node))
    severity: Severity = "warning" if target.builder.gpu_fallback else "error"
    outcome = "will run on the GPU (GPU fallback)" if target.builder.gpu_fallback else "cannot be built: GPU fallback is off"
    for op, names in sorted(unsupported.items()):
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        yield Finding(severity, "dla-unsupported-layer", names[0] + more, op,
                      f"{len(names)} {op} node(s) have no DLA layer and {outcome}", SOURCE_DLA)


def _check_dla_qdq(model: Any, target: Target) -> Iterator[Finding]:
    """Explicit quantization on DLA before TensorRT 11.4.1: the Q/DQ run on the GPU, the DLA graph splits."""
    if not target.builder.use_dla or not target.software.tensorrt:
        return
    if version_tuple(target.software.tensorrt) >= _DLA_QDQ_SINCE:
        return
    qdq = [node for node in _all_nodes(model.graph) if node.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq:
        return
    yield Finding("warning", "dla-explicit-quantization", _label(qdq[0]) + (f" and {len(qdq) - 1} more" if len(qdq) > 1 else ""),
                  qdq[0].op_type,
                  f"{len(qdq)} Q/DQ node(s) on a DLA target with TensorRT {target.software.tensorrt}: DLA in TensorRT 8.x/10.x "
                  "takes implicit (calibrated) INT8 only, so the Q/DQ layers run on the GPU and the DLA graph splits into "
                  "islands around them (at most 16 loadables per DLA core; the rest falls back to the GPU or the build "
                  "fails). Deploy the float model with a calibration cache translated from the Q/DQ scales (NVIDIA "
                  "Q/DQ Translator, Deep-Learning-Accelerator-SW/tools/qdq-translator), or target the GPU; Q/DQ on DLA "
                  "arrives with TensorRT 11.4.1 (strongly typed)", SOURCE_DLA_QDQ)


def _quantized_int32(graph: _Graph, node: Any) -> bool:
    """A DequantizeLinear of INT32 data: a quantized bias, as ONNX Runtime's quantizer writes by default."""
    data = graph.constants.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
    zero = graph.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return any(value is not None and value.dtype == np.int32 for value in (data, zero))


def _check_quantize_params(graph: _Graph, node: Any) -> Iterator[Finding]:
    """Scale and zero point of one QuantizeLinear/DequantizeLinear."""
    label, op = _label(node), node.op_type
    if _quantized_int32(graph, node):
        yield Finding("error", "qdq-int32-bias", label, op,
                      "dequantizes INT32 data (a quantized bias): TensorRT's DequantizeLinear takes INT8 (FP8/INT4/FP4) "
                      "only; keep biases in float (ONNX Runtime quantize_static: extra_options QuantizeBias=False)",
                      SOURCE_QDQ_BIAS)
        return
    scale_name = node.input[1] if len(node.input) > 1 else ""
    if not graph.is_constant(scale_name):
        yield Finding("error", "qdq-scale-not-constant", label, op,
                      f"scale '{scale_name}' is computed at run time; TensorRT needs a constant (initializer)", SOURCE_QDQ_SCALE)
    elif (scale := graph.constants[scale_name]) is not None:
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            yield Finding("error", "qdq-scale-not-positive", label, op,
                          f"scale '{scale_name}' has values <= 0 or not finite", SOURCE_QDQ_SCALE)
    zero_name = node.input[2] if len(node.input) > 2 else ""
    if not zero_name:
        if op == "QuantizeLinear":
            yield Finding("warning", "qdq-zero-point-missing", label, op,
                          "no zero point: ONNX then quantizes to UINT8 while TensorRT quantizes to INT8, so ONNX Runtime and "
                          "TensorRT compute different values; add an INT8 zero point of 0", SOURCE_QDQ_TYPES)
        return
    if not graph.is_constant(zero_name):
        yield Finding("error", "qdq-zero-point-not-constant", label, op,
                      f"zero point '{zero_name}' is not a constant; TensorRT needs a constant 0", SOURCE_QDQ_ZERO_POINT)
        return
    zero = graph.constants[zero_name]
    if zero is None:
        return
    if zero.dtype != np.int8:
        yield Finding("error", "qdq-zero-point-type", label, op,
                      f"zero point '{zero_name}' is {zero.dtype}; TensorRT's quantized type is signed INT8 (symmetric)",
                      SOURCE_QDQ_TYPES)
    if np.any(zero != 0):
        yield Finding("error", "qdq-zero-point-nonzero", label, op,
                      f"zero point '{zero_name}' is not 0 (asymmetric); TensorRT supports symmetric quantization only",
                      SOURCE_QDQ_ZERO_POINT)


def _check_qdq_placement(graph: _Graph, node: Any) -> Iterator[Finding]:
    label, op = _label(node), node.op_type
    if op == "QuantizeLinear":
        others = [c for c in graph.consumers.get(node.output[0], []) if c.op_type != "DequantizeLinear"]
        if others:
            yield Finding("warning", "quantize-without-dequantize", label, op,
                          f"INT8 output feeds {others[0].op_type} '{_label(others[0])}' directly; TensorRT expects each "
                          "QuantizeLinear to be followed by a DequantizeLinear", SOURCE_QDQ_PLACEMENT)
        return
    per_axis = graph.is_per_axis(node)
    targets = list(graph.fused_consumers(node.output[0], per_axis=per_axis))
    for gather in (c for c in targets if per_axis and c.op_type in _PER_TENSOR_ONLY_OPS):
        axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1)
        yield Finding("warning", "dequantize-per-axis-gather", label, op,
                      f"per-axis DequantizeLinear (axis {axis}, {graph.constants[node.input[1]].size} scales) feeds "
                      f"{gather.op_type} '{_label(gather)}': one Q/DQ cannot move across it (each gathered row keeps its "
                      f"own scale), so '{_label(gather)}' and what follows get float values; TensorRT may keep the table "
                      "INT8 or fold it to float (not documented for 10.3). If the consumer should run INT8, "
                      "quantize the Gather's output with its own QuantizeLinear/DequantizeLinear", SOURCE_QDQ_GATHER)
        return
    if targets and not any(c.op_type in _DQ_FUSING_OPS for c in targets):
        kinds = ", ".join(sorted({c.op_type for c in targets}))
        yield Finding("warning", "dequantize-not-fused", label, op,
                      f"feeds only {kinds}: not a weighted op or residual add, so TensorRT runs it as a standalone "
                      "dequantize and the consumer in float", SOURCE_QDQ_PLACEMENT)


def _check_weighted_ops(graph: _Graph) -> Iterator[Finding]:
    for node in graph.graph.node:
        if node.op_type not in _WEIGHTED_OPS:
            continue
        data_inputs = [name for name in node.input[:2] if name]
        quantized = [graph.comes_from_dequantize(name) for name in data_inputs]
        if any(quantized) and not all(quantized):
            plain = [name for name, q in zip(data_inputs, quantized) if not q]
            yield Finding("warning", "weighted-op-partially-quantized", _label(node), node.op_type,
                          f"input(s) {plain} are not quantized while the other is: TensorRT runs it in float",
                          SOURCE_QDQ_PLACEMENT)


def takes_prequantized_weights(tensorrt: str) -> bool:
    """Whether this TensorRT's DequantizeLinear may read INT8 constants (else: float weights -> Q -> DQ)."""
    return version_tuple(tensorrt) >= PREQUANTIZED_WEIGHTS_SINCE


def _check_prequantized_weights(graph: _Graph, node: Any, tensorrt: str) -> Iterator[Finding]:
    """TensorRT 8.x: a DequantizeLinear must dequantize a QuantizeLinear's output, not INT8 (or UINT8) constants."""
    data = graph.constants.get(node.input[0])
    if (node.op_type == "DequantizeLinear" and data is not None and data.dtype in _PREQUANTIZED_WEIGHT_TYPES
            and not takes_prequantized_weights(tensorrt)):
        yield Finding("error", "qdq-prequantized-weight", _label(node), node.op_type,
                      f"dequantizes the {data.dtype.name.upper()} constant '{node.input[0]}'; TensorRT {tensorrt} takes float "
                      "weights followed by QuantizeLinear -> DequantizeLinear (ONNX Runtime quantize_static: extra_options "
                      "AddQDQPairToWeight=True; edgepipe's quantize stage writes this form for such targets)",
                      SOURCE_QDQ_8X_WEIGHTS)


def _check_qdq(model: Any, tensorrt: str) -> Iterator[Finding]:
    graph = _Graph(model.graph)
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            yield from _check_quantize_params(graph, node)
            yield from _check_prequantized_weights(graph, node, tensorrt)
            yield from _check_qdq_placement(graph, node)
    yield from _check_weighted_ops(graph)


# ------------------------------------------------------------------ entry


def lint_model(model: Any, target: Target, model_name: str = "model.onnx") -> LintReport:
    """Lint an in-memory onnx.ModelProto for target."""
    if target.software.runtime != "tensorrt" or not target.software.tensorrt:
        note = Finding("info", "not-a-tensorrt-target", "", "",
                       f"target '{target.name}' deploys with {target.software.runtime}; TensorRT rules do not apply")
        return LintReport(model=model_name, target=target.name, tensorrt=None, findings=(note,))
    tensorrt = target.software.tensorrt
    table = operator_table(tensorrt)
    findings = [
        *_check_operators(model, table, tensorrt),
        *_check_opset(model, table, tensorrt),
        *_check_initializer_types(model, table.major),
        *_check_dynamic_dims(model, target),
        *_check_dla(model, target),
        *_check_dla_qdq(model, target),
        *_check_qdq(model, tensorrt),
    ]
    order = {"error": 0, "warning": 1, "info": 2}
    findings.sort(key=lambda f: order[f.severity])
    return LintReport(model=model_name, target=target.name, tensorrt=tensorrt, findings=tuple(findings))


def lint_onnx(path: Path, target: Target) -> LintReport:
    """Lint an ONNX file for target; InputError when it is missing or not ONNX."""

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: ONNX model not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError and others
        raise InputError(f"{path}: not a readable ONNX model ({error})")
    return lint_model(model, target, model_name=str(path))
