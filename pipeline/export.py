"""Export stage: torch artifact -> simplified FP32 ONNX with a dynamic batch axis.

torch.onnx.export's dynamo exporter specializes any axis whose example size is
1, so the example batch has 2 samples and the batch axis is declared dynamic.
Simplification is pluggable (onnxsim by default, or none).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from torch import nn

from pipeline.artifacts import Artifact
from pipeline.data.encode import InputSpec
from pipeline.errors import PipelineError
from pipeline.onnx_compat import Lowering, lower
from pipeline.store import sha256_file

OPSET = 18
EXAMPLE_BATCH = 2


def example_inputs(spec: InputSpec, batch: int = EXAMPLE_BATCH) -> tuple[torch.Tensor, ...]:
    """The model's inputs (spec.roles, in its forward's order); every role is drawn, so each keeps the same values."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 3, spec.image_size, spec.image_size, generator=generator)
    input_ids = torch.randint(*spec.example_token_range(), (batch, spec.max_tokens), generator=generator)
    attention_mask = torch.ones(batch, spec.max_tokens, dtype=torch.int64)
    attention_mask[:, spec.max_tokens // 2:] = 0
    by_role = {"image": image, "input_ids": input_ids, "attention_mask": attention_mask}
    return tuple(by_role[role] for role in spec.roles)


def simplify_onnxsim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise PipelineError("onnxsim could not validate the simplified model; rerun with --simplifier none")
    return simplified


SIMPLIFIERS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "onnxsim": simplify_onnxsim,
    "none": lambda model: model,
}


def _export_dynamo(model: nn.Module, spec: InputSpec, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic_shapes = {name: {0: batch} for name in spec.input_names}  # keyed by the forward's argument names
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(
            model.eval(),
            example_inputs(spec),
            str(path),
            input_names=list(spec.input_names),
            output_names=["logits"],
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def _strip_nondeterminism(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop fields that vary between identical exports (producer strings, doc strings with paths)."""
    model.producer_name = "edgepipe"
    model.producer_version = ""
    model.doc_string = ""
    del model.metadata_props[:]
    for node in model.graph.node:
        node.doc_string = ""
    return model


def export_onnx(model: nn.Module, spec: InputSpec, workdir: Path, simplifier: str = "onnxsim",
                lowering: Lowering | None = None) -> Artifact:
    """lowering: the rewrite an older parser needs (pipeline/onnx_compat.py); None keeps the opset-18 export as it is."""
    raw = workdir / "raw.onnx"
    _export_dynamo(model, spec, raw)
    graph = onnx.load(str(raw))
    raw.unlink()
    graph = _strip_nondeterminism(SIMPLIFIERS[simplifier](graph))
    if lowering is not None:
        graph = lower(graph, lowering)
    onnx.checker.check_model(graph)
    path = workdir / "model.fp32.onnx"
    onnx.save(graph, str(path))
    return Artifact(kind="onnx", path=path, sha256=sha256_file(path), meta=onnx_facts(path))


def onnx_facts(path: Path) -> dict:
    """Input/output names and shapes, op histogram, parameter count and file size."""
    graph = onnx.load(str(path), load_external_data=False)

    def shape(value: onnx.ValueInfoProto) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    ops: dict[str, int] = {}
    for node in graph.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    params = int(sum(np.prod(t.dims) for t in graph.graph.initializer))
    return {
        "inputs": {i.name: shape(i) for i in graph.graph.input},
        "outputs": {o.name: shape(o) for o in graph.graph.output},
        "ops": dict(sorted(ops.items())),
        "initializer_elements": params,
        "size_bytes": path.stat().st_size,
        "opset": next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None),
    }
