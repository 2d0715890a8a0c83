"""A Triton Inference Server model repository for the bundle: triton/<model>/config.pbtxt + triton/<model>/1/.

TensorRT targets: `platform: "tensorrt_plan"`, `default_model_filename:
"model.plan"`; the plan is built on the device, so `1/` ships only a README
and build_engine.sh copies the plan there (the bundle's checksums leave
`triton/<model>/1/model.plan` out, as they do device/).
ONNX Runtime targets (target.software.runtime = "onnxruntime"): `platform:
"onnxruntime_onnx"` with the INT8 ONNX as `1/model.onnx`.

Names, data types and dims come from the ONNX graph (pipeline.onnx_io). When
every input and output has a dynamic first axis and the target's batch
profile is dynamic, the first axis is Triton's batch axis: `max_batch_size`
is builder.batch.max, dims leave it out, and `dynamic_batching` prefers
builder.batch.opt. With a static batch (min = max, e.g. DLA) Triton cannot
batch a TensorRT plan (it needs the first dim -1), so the config has
`max_batch_size: 0` and full dims, the batch axis fixed at the profile's size.
TensorRT 8.x has no INT64 tensors: its ONNX parser makes INT64 graph inputs
INT32 bindings, so those are TYPE_INT32 in a plan's config for 8.x.

Written as plain text (the protobuf text format of Triton's model_config.proto);
tests/test_triton.py parses it with tritonclient's model_config_pb2.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import onnx

from pipeline.errors import InputError
from pipeline.onnx_io import GraphIO, TensorSpec
from pipeline.targets import Target, version_tuple
from pipeline.trt.engine import PLAN_NAME

TRITON_DIR = "triton"
CONFIG_FILE = "config.pbtxt"
VERSION = "1"
ONNX_MODEL_FILE = "model.onnx"
DEFAULT_MODEL_NAME = "edgepipe"

_P = onnx.TensorProto
# model_config.proto DataType by ONNX element type
TRITON_TYPES = {
    _P.FLOAT: "TYPE_FP32", _P.FLOAT16: "TYPE_FP16", _P.BFLOAT16: "TYPE_BF16", _P.DOUBLE: "TYPE_FP64",
    _P.INT8: "TYPE_INT8", _P.INT16: "TYPE_INT16", _P.INT32: "TYPE_INT32", _P.INT64: "TYPE_INT64",
    _P.UINT8: "TYPE_UINT8", _P.UINT16: "TYPE_UINT16", _P.UINT32: "TYPE_UINT32", _P.UINT64: "TYPE_UINT64",
    _P.BOOL: "TYPE_BOOL", _P.STRING: "TYPE_STRING",
}


@dataclass(frozen=True)
class TritonModel:
    name: str
    platform: str  # "tensorrt_plan" or "onnxruntime_onnx"
    model_file: str  # the file in 1/
    config: str  # config.pbtxt text
    max_batch_size: int  # 0: Triton does not batch

    @property
    def version_dir(self) -> str:
        return f"{TRITON_DIR}/{self.name}/{VERSION}"

    @property
    def model_path(self) -> str:
        return f"{self.version_dir}/{self.model_file}"


def uses_tensorrt(target: Target) -> bool:
    return target.software.runtime == "tensorrt"


def _data_type(spec: TensorSpec, target: Target) -> str:
    if spec.elem_type not in TRITON_TYPES:
        raise InputError(f"tensor '{spec.name}' has ONNX type {spec.type_name}, which Triton has no data type for")
    if uses_tensorrt(target) and spec.elem_type == _P.INT64 and version_tuple(target.software.tensorrt or "0")[0] < 10:
        return "TYPE_INT32"  # no INT64 bindings before TensorRT 10 (DataType::kINT64 is new in 10.0)
    return TRITON_TYPES[spec.elem_type]


def batches(io_spec: GraphIO, target: Target) -> bool:
    """Whether Triton may batch: a dynamic first axis everywhere and, for a plan, a dynamic profile."""
    tensors = io_spec.inputs + io_spec.outputs
    dynamic_first = all(spec.dims and spec.dims[0] < 0 for spec in tensors)
    batch = target.builder.batch
    return dynamic_first and not (uses_tensorrt(target) and batch.min == batch.max)


def _dims(spec: TensorSpec, target: Target, batching: bool) -> list[int]:
    if batching:
        return list(spec.dims[1:])
    dims = list(spec.dims)
    if uses_tensorrt(target) and dims and dims[0] < 0:
        dims[0] = target.builder.batch.max  # the static profile's batch
    return dims


def _tensor_block(spec: TensorSpec, target: Target, batching: bool) -> str:
    dims = _dims(spec, target, batching)
    # A tensor with no dims left (a [N] tensor under batching) is [1] to Triton, with reshape to [].
    reshape = "\n    reshape: { shape: [ ] }" if not dims else ""
    return (f"  {{\n    name: {json.dumps(spec.name)}\n    data_type: {_data_type(spec, target)}\n"
            f"    dims: [ {', '.join(str(d) for d in (dims or [1]))} ]{reshape}\n  }}")


def _tensor_list(kind: str, specs: Sequence[TensorSpec], target: Target, batching: bool) -> str:
    return f"{kind} [\n" + ",\n".join(_tensor_block(spec, target, batching) for spec in specs) + "\n]\n"


def triton_model(io_spec: GraphIO, target: Target, name: str = DEFAULT_MODEL_NAME) -> TritonModel:
    if not name or "/" in name or name.startswith("."):
        raise InputError(f"Triton model name {name!r} must be a plain directory name")
    tensorrt = uses_tensorrt(target)
    platform = "tensorrt_plan" if tensorrt else "onnxruntime_onnx"
    model_file = PLAN_NAME if tensorrt else ONNX_MODEL_FILE
    batching = batches(io_spec, target)
    batch = target.builder.batch
    lines = [f"# Triton model configuration for edgepipe target '{target.name}' ({target.device.name}).",
             f"name: {json.dumps(name)}", f"platform: {json.dumps(platform)}",
             f"default_model_filename: {json.dumps(model_file)}",
             f"max_batch_size: {batch.max if batching else 0}"]
    text = "\n".join(lines) + "\n"
    text += _tensor_list("input", io_spec.inputs, target, batching)
    text += _tensor_list("output", io_spec.outputs, target, batching)
    kind = "KIND_GPU" if tensorrt else "KIND_CPU"
    text += f"instance_group [\n  {{\n    kind: {kind}\n    count: 1\n  }}\n]\n"
    if batching:
        text += f"dynamic_batching {{\n  preferred_batch_size: [ {batch.opt} ]\n}}\n"
    return TritonModel(name=name, platform=platform, model_file=model_file, config=text,
                       max_batch_size=batch.max if batching else 0)


def version_readme(model: TritonModel, target: Target) -> str:
    """1/README.md of a TensorRT model: where the plan comes from."""
    return (f"# {model.version_dir}/\n\n"
            f"Triton loads `{model.model_file}` from here. The plan is built on the device ({target.device.name}): "
            f"`./build_engine.sh` (trtexec) writes `device/{PLAN_NAME}` and copies it here; after "
            f"`python -m pipeline engine --bundle .` copy `device/{PLAN_NAME}` here yourself.\n")


def write_triton_repository(bundle_dir: Path, io_spec: GraphIO, target: Target, onnx_model: Path,
                            name: str = DEFAULT_MODEL_NAME) -> TritonModel:
    """Write triton/<name>/config.pbtxt and triton/<name>/1/ (README, or the ONNX model) under bundle_dir."""
    model = triton_model(io_spec, target, name)
    version_dir = Path(bundle_dir) / model.version_dir
    version_dir.mkdir(parents=True, exist_ok=True)
    (version_dir.parent / CONFIG_FILE).write_text(model.config, encoding="utf-8")
    if uses_tensorrt(target):
        (version_dir / "README.md").write_text(version_readme(model, target), encoding="utf-8")
    else:
        shutil.copyfile(onnx_model, version_dir / ONNX_MODEL_FILE)
    return model
