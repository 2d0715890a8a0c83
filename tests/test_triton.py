"""The bundle's Triton model repository: config.pbtxt parsed with Triton's own model_config protobuf."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto

from pipeline import triton
from pipeline.bundle import verify_bundle_checksums, write_bundle
from pipeline.errors import InputError
from pipeline.lint import lint_onnx
from pipeline.onnx_io import graph_io
from pipeline.targets import resolve_target

from test_bundle import golden_for, tiny_fused_model  # noqa: E402  (tests/ is on sys.path)

ONNX_TO_TRITON = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.INT64: "TYPE_INT64"}


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.int8.onnx"
    onnx.save(tiny_fused_model(), path)
    return path


def bundle_for(tmp_path, model_path, target_name):
    target = resolve_target(target_name)
    bundle = write_bundle(tmp_path / target_name, model_path, target, golden_for(model_path), target.gates.engine,
                          lint_onnx(model_path, target).to_json())
    return bundle, target


def parse_config(path):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                           reason="tritonclient is not installed (pip install -e '.[dev]')")
    text_format = pytest.importorskip("google.protobuf.text_format")
    config = model_config_pb2.ModelConfig()
    text_format.Parse(path.read_text(), config)  # raises on any field Triton's schema lacks
    return config, model_config_pb2


def onnx_graph_io(model_path):
    graph = onnx.load(str(model_path)).graph
    dims = lambda v: [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]  # noqa: E731
    inputs = [(v.name, v.type.tensor_type.elem_type, dims(v)) for v in graph.input]
    outputs = [(v.name, v.type.tensor_type.elem_type, dims(v)) for v in graph.output]
    return inputs, outputs


def check_tensors(entries, expected, pb2, batch_dim=None, int64_as=None):
    assert [e.name for e in entries] == [name for name, _, _ in expected]
    for entry, (name, elem_type, dims) in zip(entries, expected):
        wanted = ONNX_TO_TRITON[elem_type]
        if int64_as and wanted == "TYPE_INT64":
            wanted = int64_as
        assert pb2.DataType.Name(entry.data_type) == wanted, name
        assert list(entry.dims) == (dims[1:] if batch_dim is None else [batch_dim, *dims[1:]]), name


def test_tensorrt_target_config_matches_the_onnx_graph(tmp_path, model_path):
    bundle, target = bundle_for(tmp_path, model_path, "jetson")
    config, pb2 = parse_config(bundle / "triton" / "edgepipe" / "config.pbtxt")
    assert config.name == "edgepipe" and config.platform == "tensorrt_plan"
    assert config.default_model_filename == "model.plan"
    assert config.max_batch_size == target.builder.batch.max
    assert list(config.dynamic_batching.preferred_batch_size) == [target.builder.batch.opt]
    inputs, outputs = onnx_graph_io(model_path)
    check_tensors(config.input, inputs, pb2)
    check_tensors(config.output, outputs, pb2)
    assert [pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group] == ["KIND_GPU"]
    version_dir = bundle / "triton" / "edgepipe" / "1"
    assert [p.name for p in version_dir.iterdir()] == ["README.md"]
    assert "build_engine.sh" in (version_dir / "README.md").read_text()
    # the plan the device copies there is outside the checksums, like device/
    (version_dir / "model.plan").write_bytes(b"plan")
    verify_bundle_checksums(bundle)


def test_static_batch_dla_target_does_not_batch(tmp_path, model_path):
    bundle, target = bundle_for(tmp_path, model_path, "jetson-agx-orin")
    config, pb2 = parse_config(bundle / "triton" / "edgepipe" / "config.pbtxt")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    inputs, outputs = onnx_graph_io(model_path)
    check_tensors(config.input, inputs, pb2, batch_dim=target.builder.batch.max)
    check_tensors(config.output, outputs, pb2, batch_dim=target.builder.batch.max)


def test_tensorrt_8_binds_int64_inputs_as_int32(tmp_path, model_path):
    bundle, _ = bundle_for(tmp_path, model_path, "jetson-xavier-nx")
    config, pb2 = parse_config(bundle / "triton" / "edgepipe" / "config.pbtxt")
    inputs, _ = onnx_graph_io(model_path)
    check_tensors(config.input, inputs, pb2, int64_as="TYPE_INT32")


def test_onnx_runtime_target_ships_the_onnx_model(tmp_path, model_path):
    bundle, target = bundle_for(tmp_path, model_path, "cpu")
    assert target.software.runtime == "onnxruntime"
    config, pb2 = parse_config(bundle / "triton" / "edgepipe" / "config.pbtxt")
    assert config.platform == "onnxruntime_onnx" and config.default_model_filename == "model.onnx"
    assert config.max_batch_size == target.builder.batch.max
    inputs, outputs = onnx_graph_io(model_path)
    check_tensors(config.input, inputs, pb2)
    check_tensors(config.output, outputs, pb2)
    assert [pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group] == ["KIND_CPU"]
    assert (bundle / "triton" / "edgepipe" / "1" / "model.onnx").read_bytes() == model_path.read_bytes()
    assert not (bundle / "build_engine.sh").exists()
    listed = (bundle / "SHA256SUMS").read_text()
    assert "triton/edgepipe/1/model.onnx" in listed and "triton/edgepipe/config.pbtxt" in listed


def test_data_types_cover_the_graph_types():
    for elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT32, TensorProto.INT64, TensorProto.BOOL,
                      TensorProto.UINT8, TensorProto.INT8):
        assert elem_type in triton.TRITON_TYPES


def test_model_name_is_a_plain_directory_name(model_path):
    with pytest.raises(InputError, match="plain directory name"):
        triton.triton_model(graph_io(model_path), resolve_target("jetson"), name="../x")
