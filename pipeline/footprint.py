"""What an artifact costs: parameters, MACs, ONNX size and ONNX Runtime CPU latency (the ledger's cost columns).

A torch artifact is counted as a model (params and MACs per branch) and
exported to a temporary ONNX file (the export stage's own exporter and
simplifier) to be sized and timed, so every row of the ledger is timed the
same way: ONNX Runtime, CPU, 2 threads, batch 1 and 16, median of repeated
runs. An ONNX artifact carries the params and MACs of the torch model it came
from. Latency is measured with ONNX Runtime's default session (on the CPU,
Q/DQ pairs run as its int8 kernels), whatever session config parity used.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.encode import InputSpec
from pipeline.compression.measure import macs_by_branch, onnx_cpu_latency_ms, params_by_branch
from pipeline.models.checkpoint import load_torch_artifact
from pipeline.export import example_inputs, export_onnx

LATENCY_THREADS = 2
LATENCY_BATCHES = (1, 16)


@dataclass(frozen=True)
class Footprint:
    params: dict[str, int] = field(default_factory=dict)  # per branch and "total"
    macs: dict[str, int] = field(default_factory=dict)  # per sample, per branch and "total"
    onnx_bytes: int | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)  # "batch1_ms", "batch16_ms"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> "Footprint":
        return Footprint(**data)


def onnx_latency(path: Path, spec: InputSpec, repeats: int = 20) -> dict[str, float]:
    return {k: round(v, 3) for k, v in onnx_cpu_latency_ms(path, spec, LATENCY_BATCHES, LATENCY_THREADS, repeats).items()}


def torch_footprint(directory: Path, spec: InputSpec, simplifier: str, latency: bool = True) -> Footprint:
    model = load_torch_artifact(directory)
    counts = {"params": params_by_branch(model), "macs": macs_by_branch(model, example_inputs(spec))}
    if not latency:
        return Footprint(**counts)
    with tempfile.TemporaryDirectory(prefix="edgepipe-footprint-") as tmp:
        onnx = export_onnx(model, spec, Path(tmp), simplifier)
        return Footprint(**counts, onnx_bytes=onnx.path.stat().st_size, latency_ms=onnx_latency(onnx.path, spec))


def onnx_footprint(path: Path, spec: InputSpec, counted_from: Footprint | None, latency: bool = True) -> Footprint:
    """counted_from: the footprint of the model this file came from; None for a user's ONNX (--onnx): its params are its
    float initializers' elements (MACs need a model to trace: not counted)."""
    counts = {"params": dict(counted_from.params), "macs": dict(counted_from.macs)} if counted_from else {"params": onnx_params(path)}
    return Footprint(**counts, onnx_bytes=path.stat().st_size, latency_ms=onnx_latency(path, spec) if latency else {})


def onnx_params(path: Path) -> dict[str, int]:
    """{"total": elements of the graph's floating-point initializers}: the weights an ONNX file holds."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_type in floats:
            count = 1
            for dim in tensor.dims:
                count *= dim
            total += count
    return {"total": total}
