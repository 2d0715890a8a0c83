"""The export an older TensorRT parses (pipeline/onnx_compat.py): TensorRT 8.5 gets opset 17 without LayerNormalization.

Small ONNX graphs built here check the rewrite numerically with ONNX Runtime; one small real build
(fused-tiny, one epoch, no compression, 4 emoji per class) checks that the quantize stage keeps what the
export made and that the lint no longer finds LayerNormalization or a too-new opset for the Xavier target;
targets whose TensorRT parses opset 18 keep their export config (and so their bytes) as before.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import write_emoji_folder, write_target
from pipeline import export as export_module
from pipeline.artifacts import Artifact
from pipeline.errors import InputError
from pipeline.lint import lint_onnx
from pipeline.onnx_compat import SOURCE_OPSET, Lowering, lower, lowering_for
from pipeline.stages import export as export_stage
from pipeline.store import cache_key
from pipeline.targets import available_targets, load_target_file, resolve_target

REPO = Path(__file__).resolve().parent.parent
XAVIER = "jetson-xavier-nx"
FOR_TENSORRT_85 = Lowering(opset=17, decompose=("LayerNormalization",), tensorrt="8.5")
TOLERANCE = 1e-5  # max abs difference of the lowered model's outputs from the original's (ONNX Runtime, float32)


def float_info(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def layer_norm_model(axis: int = -1, with_bias: bool = True) -> onnx.ModelProto:
    """x[N,5,8] -> LayerNormalization(axis) -> y, and y -> ReduceMean over axis 1 (opset 18: axes as an input) -> z."""
    rng = np.random.default_rng(0)
    normalized_shape = [5, 8][axis:] if axis < 0 else [5, 8][axis - 1:]
    inits = [numpy_helper.from_array(rng.uniform(0.5, 2.0, normalized_shape).astype(np.float32), "scale"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "mean_axes")]
    ln_inputs = ["x", "scale"]
    if with_bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 1, normalized_shape).astype(np.float32), "bias"))
        ln_inputs.append("bias")
    nodes = [
        helper.make_node("LayerNormalization", ln_inputs, ["y"], name="ln", axis=axis, epsilon=1e-5),
        # what the exporter writes for a mean over tokens; onnx's 18 -> 17 converter mishandles its attribute
        helper.make_node("ReduceMean", ["y", "mean_axes"], ["z"], name="pool", keepdims=0, noop_with_empty_axes=0),
    ]
    graph = helper.make_graph(nodes, "g", [float_info("x", ["N", 5, 8])], [float_info("y", ["N", 5, 8]), float_info("z", ["N", 8])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", SOURCE_OPSET)], ir_version=10)


def run_ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def ops(model: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in model.graph.node}


def default_opset(model: onnx.ModelProto) -> int:
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


# ------------------------------------------------------------------ the rewrite on small graphs


@pytest.mark.parametrize("axis, with_bias", [(-1, True), (1, False), (-2, True)])
@pytest.mark.parametrize("lowering", [FOR_TENSORRT_85, Lowering(opset=16, decompose=("LayerNormalization",), tensorrt=None)],
                         ids=["tensorrt-8.5", "opset-16"])
def test_layer_norm_is_decomposed_and_the_opset_lowered_with_the_same_outputs(axis, with_bias, lowering):
    original = layer_norm_model(axis, with_bias)
    lowered = lower(original, lowering)

    assert "LayerNormalization" not in ops(lowered)
    assert default_opset(lowered) == lowering.opset
    assert lowered.ir_version == helper.find_min_ir_version_for(lowered.opset_import)
    onnx.checker.check_model(lowered, full_check=True)
    for node in (n for n in lowered.graph.node if n.op_type == "ReduceMean"):  # opset <= 17: axes are an attribute
        assert len(node.input) == 1 and {a.name for a in node.attribute} == {"axes", "keepdims"}
    x = (3.0 * np.random.default_rng(1).standard_normal((4, 5, 8)) + 5.0).astype(np.float32)  # a mean far from 0
    for want, got in zip(run_ort(original, {"x": x}), run_ort(lowered, {"x": x})):
        assert want.shape == got.shape
        assert np.abs(want - got).max() <= TOLERANCE


def test_the_rewrite_is_deterministic():
    assert lower(layer_norm_model(), FOR_TENSORRT_85).SerializeToString() == lower(layer_norm_model(), FOR_TENSORRT_85).SerializeToString()


def isinf_model() -> onnx.ModelProto:
    """An op TensorRT's parser imports only from 8.6 (onnx-tensorrt CHANGELOG 8.6 EA) and that has no decomposition here."""
    nodes = [helper.make_node("IsInf", ["x"], ["inf"], name="check"), helper.make_node("Cast", ["inf"], ["y"], name="cast", to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [float_info("x", ["N", 4])], [float_info("y", ["N", 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", SOURCE_OPSET)], ir_version=10)


def test_an_op_the_parser_lacks_without_a_decomposition_is_refused():
    with pytest.raises(InputError, match=r"TensorRT 8\.5's ONNX parser cannot import IsInf"):
        lower(isinf_model(), FOR_TENSORRT_85)


def test_the_export_pass_refuses_such_a_model_naming_the_target(monkeypatch, tmp_path):
    monkeypatch.setattr(export_stage, "load_torch_artifact", lambda path: None)
    monkeypatch.setattr(export_module, "_export_dynamo", lambda model, spec, path: onnx.save(isinf_model(), str(path)))
    ctx = SimpleNamespace(target=resolve_target(XAVIER), simplifier="none", spec=None)
    declared = export_stage.declare(ctx, {"source": Artifact("torch", tmp_path / "model.pt", "0" * 64, {})})
    with pytest.raises(InputError) as refused:
        declared.run(tmp_path)
    assert all(part in str(refused.value) for part in (f"target '{XAVIER}'", "TensorRT 8.5", "IsInf"))


# ------------------------------------------------------------------ which targets get it


def test_only_the_tensorrt_85_target_is_lowered():
    lowered = {name: lowering_for(target) for name, target in available_targets().items()}
    assert lowered.pop(XAVIER) == FOR_TENSORRT_85
    assert lowered and all(value is None for value in lowered.values()), lowered  # TensorRT 10.x and ONNX Runtime: as exported


def test_a_target_may_ask_for_an_older_opset(tmp_path):
    target = load_target_file(write_target(tmp_path / "old-opset.toml", export={"max_opset": 16}))
    assert lowering_for(target) == Lowering(opset=16, decompose=("LayerNormalization",), tensorrt="10.3")  # not in opset 16


def test_an_opset_below_what_the_parser_documents_is_refused_up_front(tmp_path):
    target = load_target_file(write_target(tmp_path / "ancient.toml", export={"max_opset": 8}))
    with pytest.raises(InputError, match=r"export.max_opset = 8 is below opset 9.*TensorRT 10\.3"):
        lowering_for(target)


def test_exporter_and_rewrite_agree_on_the_source_opset():
    assert export_module.OPSET == SOURCE_OPSET


# ------------------------------------------------------------------ targets that parse opset 18 are untouched


def tiny_model_and_spec():
    import torch

    from pipeline.models import build_model, default_config

    torch.manual_seed(0)
    config = default_config("fused-tiny", 9)
    return build_model(config, pretrained=False), config.input_spec()


def test_targets_that_parse_opset_18_keep_their_export_config():
    _, spec = tiny_model_and_spec()
    for name, target in available_targets().items():
        config = export_stage.export_config(SimpleNamespace(target=target, simplifier="onnxsim", spec=spec))
        before = export_stage.ExportConfig("onnxsim", 18, spec)  # what the pass declared before the rewrite existed
        if name == XAVIER:
            assert dataclasses.asdict(config) == {**dataclasses.asdict(before), "lowering": dataclasses.asdict(FOR_TENSORRT_85)}
            assert cache_key("export", dataclasses.asdict(config), "x", {}) != cache_key("export", dataclasses.asdict(before), "x", {})
        else:
            assert type(config) is export_stage.ExportConfig and config == before, name


def test_a_jetson_export_is_byte_identical_to_the_plain_export(monkeypatch, tmp_path):
    model, spec = tiny_model_and_spec()
    monkeypatch.setattr(export_stage, "load_torch_artifact", lambda path: model)
    ctx = SimpleNamespace(target=resolve_target("jetson-orin-nano"), simplifier="onnxsim", spec=spec)
    declared = export_stage.declare(ctx, {"source": Artifact("torch", tmp_path / "model.pt", "0" * 64, {})})
    (tmp_path / "pass").mkdir(), (tmp_path / "plain").mkdir()
    through_the_pass = declared.run(tmp_path / "pass")
    plain = export_module.export_onnx(model, spec, tmp_path / "plain", "onnxsim")  # the call the pass made before
    assert through_the_pass.sha256 == plain.sha256
    assert through_the_pass.meta["opset"] == 18 and "LayerNormalization" in through_the_pass.meta["ops"]


# ------------------------------------------------------------------ a real build for the Xavier target


@pytest.fixture(scope="module")
def xavier_build(tmp_path_factory) -> Path:
    """fused-tiny, one epoch, no compression, 4 emoji per class, for the shipped jetson-xavier-nx target and its gates."""
    work = tmp_path_factory.mktemp("xavier")
    data = write_emoji_folder(work / "data", per_class=4)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = ["build", "--model", "fused-tiny", "--data", str(data), "--target", XAVIER, "--epochs", "1", "--no-compression",
            "--out", str(work / "out"), "--quiet"]
    subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    return work / "out"


def stage(manifest: dict, name: str) -> dict:
    return next(s for s in manifest["stages"] if s["name"] == name)


def test_the_xavier_build_exports_opset_17_and_quantizes_it_past_its_gate(xavier_build):
    manifest = json.loads((xavier_build / "manifest.json").read_text())
    assert manifest["status"] != "failed", manifest.get("failure")  # no gate failed: export and quantize held
    export = stage(manifest, "export")
    assert export["settings"]["lowering"] == {"opset": 17, "decompose": ["LayerNormalization"], "tensorrt": "8.5"}
    assert export["facts"]["opset"] == 17 and "LayerNormalization" not in export["facts"]["ops"]
    int8 = onnx.load(str(xavier_build / stage(manifest, "quantize")["artifact"]["path"]))
    assert default_opset(int8) == 17 and "LayerNormalization" not in ops(int8)
    # Q/DQ placement still found the weighted ops: a DequantizeLinear feeds MatMul/Gemm/Conv weights
    dequantized = {out for node in int8.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    weighted = [n for n in int8.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and any(i in dequantized for i in n.input)]
    assert len(weighted) >= 10


def test_the_lint_finds_no_layer_norm_or_opset_problem_for_xavier(xavier_build):
    manifest = json.loads((xavier_build / "manifest.json").read_text())
    report = lint_onnx(xavier_build / stage(manifest, "quantize")["artifact"]["path"], resolve_target(XAVIER))
    about_ops = [f for f in report.findings if f.rule in ("unsupported-op", "opset-too-new", "custom-domain-op")
                 or "LayerNormalization" in f.message]
    assert about_ops == [], report.format_text()
