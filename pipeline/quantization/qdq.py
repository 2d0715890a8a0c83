"""Writing the Q/DQ model for a chosen set of regions, in a target's form.

onnxruntime.quantization's QDQQuantizer does the graph surgery (per-channel
weight quantization, axis handling for Gemm/MatMul, shared Q/DQ for tensors
with several consumers); this module decides what it quantizes and how, from
our own calibration ranges, and adds the INT8 embedding it has no form for.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping, Sequence

from onnxruntime.quantization import QuantType
from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
import onnx

from pipeline.quantization.bias_correction import ConvInputMeans, correct_biases
from pipeline.quantization.embedding import EmbeddingForm, quantize_embedding
from pipeline.quantization.placement import Region
from pipeline.quantization.topology import sort_nodes_topologically
from pipeline.quantization.weight_form import FLOAT_QDQ, WeightForm, requantize_from_float


@dataclass(frozen=True)
class Form:
    """How a target's runtime wants INT8 written."""

    name: str
    signed_activations: bool  # S8 (TensorRT) or U8 (ONNX Runtime CPU: u8s8 kernels)
    symmetric_activations: bool  # TensorRT supports zero point 0 only
    # ops whose outputs get Q/DQ too: ONNX Runtime's CPU EP fuses DQ-op-Q groups into QLinearConv,
    # QGemm, QLinearMatMul; without the output Q the weights are dequantized on every run
    output_quantized_ops: tuple[str, ...]
    residual_adds: bool  # TensorRT fuses the residual Add into the conv when its inputs are quantized
    fuse_activations: bool  # quantize a Relu/Clip after a weighted op with it: the U8 range does the clipping
    float_residual_writers: bool  # Gemm/MatMul writing into a transformer residual stream stay float
    quantize_bias: bool  # INT32 bias: TensorRT's parser rejects it (onnx-tensorrt#850)
    reduce_range: bool  # 7-bit weights: x86 u8s8 kernels without VNNI cannot saturate their 16-bit pair sums
    embedding_form: EmbeddingForm
    rule: str  # why this form
    # ONNX Runtime session entries that make its CPU run compute what the deploy runtime computes
    ort_session_config: Mapping[str, str] = field(default_factory=dict)
    # U8 weights (zero point 128) instead of S8: ONNX Runtime's x86 u8u8 kernels widen to 16 bits and never saturate,
    # so all 8 bits are usable, but its u8u8 QLinearConv is several times slower (benchmarks/cpu_weights.py); no form ships it
    unsigned_weights: bool = False


FORMS: dict[str, Form] = {
    "tensorrt": Form(
        name="tensorrt", signed_activations=True, symmetric_activations=True, output_quantized_ops=(),
        residual_adds=True, fuse_activations=False, float_residual_writers=False, quantize_bias=False, reduce_range=False, embedding_form="dequantize-first",
        rule="symmetric S8 activations and weights, per-channel weight scales, Q/DQ on inputs only "
             "(TensorRT Developer Guide, explicit quantization; onnx-tensorrt docs: zero point must be 0)",
        # ONNX Runtime's x86 INT8 kernels without VNNI saturate S8 x S8 sums (VPMADDUBSW, 16-bit pairs),
        # which TensorRT's do not: parity of the TensorRT form is measured as TensorRT computes it,
        # dequantize then float op (ONNX Runtime docs, "Quantize ONNX models": reduce_range / saturation).
        ort_session_config={"session.disable_quant_qdq": "1"}),
    "cpu": Form(
        name="cpu", signed_activations=False, symmetric_activations=False, output_quantized_ops=("Conv", "Gemm", "MatMul", "Relu", "Clip"),
        residual_adds=False, fuse_activations=True, float_residual_writers=True, quantize_bias=False, reduce_range=True, embedding_form="gather-first",
        rule="U8 asymmetric activations, S8 symmetric per-channel weights (ONNX Runtime's u8s8 CPU kernels); "
             "Q/DQ on weighted ops' inputs and outputs so DQ-op-Q groups fuse into QLinearConv/QGemm; "
             "Gemms writing into the transformer residual stream stay float"),
}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence onnxruntime.quantization's prints and root-logger warnings, restoring the level after."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _extra_options(form: Form, op_types: Sequence[str]) -> dict[str, Any]:
    return {
        "QuantizeBias": form.quantize_bias,
        "WeightSymmetric": True,
        "ActivationSymmetric": form.symmetric_activations,
        "OpTypesToExcludeOutputQuantization": [op for op in op_types if op not in form.output_quantized_ops],
    }


def _quantize_ops(model: Any, regions: Sequence[Region], ranges: Any, form: Form) -> Any:
    nodes = {node.name: node.op_type for node in model.graph.node}
    names = [name for region in regions for name in region.nodes]
    op_types = sorted({nodes[name] for name in names})
    activation = QuantType.QInt8 if form.signed_activations else QuantType.QUInt8
    weight = QuantType.QUInt8 if form.unsigned_weights else QuantType.QInt8
    quantizer = QDQQuantizer(model, True, form.reduce_range, weight, activation, ranges,
                             names, [], op_types, _extra_options(form, op_types))
    with quiet():
        quantizer.quantize_model()
    return quantizer.model.model


def write_qdq(prepared: Path, regions: Sequence[Region], quantized: Collection[str], ranges: Any, form: Form,
              output: Path, weights: WeightForm | None = None, conv_means: ConvInputMeans | None = None) -> Path:
    """The prepared model with the regions named in `quantized` in INT8 (the rest float), saved to output.

    weights: None keeps the weights INT8 initializers; FLOAT_QDQ writes them float -> QuantizeLinear ->
    DequantizeLinear (TensorRT 8.x, weight_form.py), the same numbers.
    conv_means: with them, every INT8 convolution's bias is corrected for its weights' rounding (bias_correction.py)."""

    model = onnx.load(str(prepared))
    chosen = [region for region in regions if region.name in quantized]
    operator_regions = [region for region in chosen if region.kind != "embedding"]
    if operator_regions:  # an empty node list means "everything" to QDQQuantizer
        model = _quantize_ops(model, operator_regions, ranges, form)
        if conv_means is not None:
            correct_biases(model, onnx.load(str(prepared)), conv_means)
    for region in chosen:
        if region.kind == "embedding":
            quantize_embedding(model, region.name, form.embedding_form)
    model.producer_name, model.producer_version = "edgepipe", ""
    if weights == FLOAT_QDQ:
        requantize_from_float(model)  # TensorRT 8.x reads no INT8 constants: float -> Q -> DQ, the same numbers
    # QDQQuantizer appends its Q/DQ nodes to the end of graph.node; its own save (quantize_static's) would sort
    # them, ours must: the ONNX spec, onnx.checker (full_check) and TensorRT-side tools read nodes in file order
    sort_nodes_topologically(model.graph)
    onnx.save(model, str(output))
    return output
