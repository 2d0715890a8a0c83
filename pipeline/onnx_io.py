"""The graph inputs and outputs of an ONNX model: names, element types and shapes.

What the device-side files of the bundle (trtexec script, Triton config,
Polygraphy golden files) are written from, so they name the tensors exactly as
the graph does. A dimension without a fixed size (a `dim_param` such as
"batch", or none at all) is -1, as TensorRT and Triton write dynamic axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from pipeline.errors import InputError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    elem_type: int  # onnx.TensorProto.DataType (FLOAT = 1, INT64 = 7, ...)
    dims: tuple[int, ...]  # -1 for a dynamic axis

    @property
    def type_name(self) -> str:
        return onnx.TensorProto.DataType.Name(self.elem_type)


@dataclass(frozen=True)
class GraphIO:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def _spec(value: onnx.ValueInfoProto, where: str) -> TensorSpec:
    if not value.type.HasField("tensor_type"):
        raise InputError(f"{where}: graph {value.name!r} is not a tensor; the bundle's device files need tensor I/O")
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        raise InputError(f"{where}: graph tensor {value.name!r} has no shape (rank unknown)")
    dims = tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    return TensorSpec(name=value.name, elem_type=int(tensor.elem_type), dims=dims)


def graph_io(onnx_path: Path) -> GraphIO:
    """The model's real inputs (initializers listed as inputs excluded) and outputs, in graph order."""
    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    inputs = tuple(_spec(v, f"{onnx_path} input") for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v, f"{onnx_path} output") for v in model.graph.output)
    if not inputs or not outputs:
        raise InputError(f"{onnx_path}: the graph needs at least one input and one output")
    return GraphIO(inputs=inputs, outputs=outputs)
