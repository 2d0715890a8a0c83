"""Device bundle round trip: write it here, verify it with ONNX Runtime, catch tampering."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline import bundle as bundle_module
from pipeline import device_commands
from pipeline.bundle import CHECKSUMS_FILE, Golden, load_bundle, verify_bundle_checksums, write_bundle
from pipeline.errors import InputError
from pipeline.lint import lint_onnx
from pipeline.parity import Gate
from pipeline.runners import OrtRunner
from pipeline.trt.engine import tensorrt_status
from pipeline.targets import resolve_target

SAMPLES, CLASSES, SEQ = 12, 3, 5


def tiny_fused_model() -> onnx.ModelProto:
    """image[N,3,4,4] + input_ids/attention_mask[N,5] -> logits[N,3], the image branch in Q/DQ INT8."""
    rng = np.random.default_rng(0)
    init = lambda name, array: numpy_helper.from_array(np.asarray(array), name)  # noqa: E731
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], name="flatten", axis=1),
        helper.make_node("QuantizeLinear", ["flat", "a_scale", "zero"], ["flat_q"], name="image_quant"),
        helper.make_node("DequantizeLinear", ["flat_q", "a_scale", "zero"], ["flat_dq"], name="image_dequant"),
        helper.make_node("QuantizeLinear", ["w_image", "w_scale", "zero"], ["w_q"], name="weight_quant"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "zero"], ["w_dq"], name="weight_dequant"),
        helper.make_node("MatMul", ["flat_dq", "w_dq"], ["image_logits"], name="image_head"),
        helper.make_node("Cast", ["input_ids"], ["ids_f"], name="ids_cast", to=TensorProto.FLOAT),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], name="mask_cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["ids_f", "mask_f"], ["masked"], name="mask"),
        helper.make_node("MatMul", ["masked", "w_text"], ["text_logits"], name="text_head"),
        helper.make_node("Add", ["image_logits", "text_logits"], ["logits"], name="fuse"),
    ]
    inits = [
        init("a_scale", np.float32(4.0 / 127)), init("w_scale", np.float32(1.0 / 127)), init("zero", np.int8(0)),
        init("w_image", rng.uniform(-1, 1, (48, CLASSES)).astype(np.float32)),
        init("w_text", rng.uniform(-0.1, 0.1, (SEQ, CLASSES)).astype(np.float32)),
    ]
    inputs = [
        helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 4, 4]),
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", SEQ]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", SEQ]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])]
    model = helper.make_model(helper.make_graph(nodes, "tiny", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def golden_for(model_path) -> Golden:
    rng = np.random.default_rng(1)
    inputs = {
        "image": rng.uniform(-1, 1, (SAMPLES, 3, 4, 4)).astype(np.float32),
        "input_ids": rng.integers(0, 30, (SAMPLES, SEQ)).astype(np.int64),
        "attention_mask": np.ones((SAMPLES, SEQ), np.int64),
    }
    int8_logits = OrtRunner(model_path).predict(inputs)
    reference = int8_logits + rng.normal(0, 0.01, int8_logits.shape).astype(np.float32)
    return Golden(ids=[f"sample-{i}" for i in range(SAMPLES)], inputs=inputs, labels=np.argmax(reference, axis=1),
                  reference_logits=reference, int8_logits=int8_logits)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.int8.onnx"
    onnx.save(tiny_fused_model(), path)
    return path


def make_bundle(tmp_path, model_path, thresholds=None, target_name="jetson"):
    target = resolve_target(target_name)
    return write_bundle(tmp_path / "out", model_path, target, golden_for(model_path),
                        thresholds or target.gates.engine, lint_onnx(model_path, target).to_json())


def run_command(*argv) -> int:
    parser = argparse.ArgumentParser()
    device_commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_bundle_holds_every_file_with_checksums(tmp_path, model_path):
    bundle = make_bundle(tmp_path, model_path)
    names = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert names == {"model.int8.onnx", "target.json", "golden.npz", "thresholds.json", "lint.json", "README.md", CHECKSUMS_FILE,
                     "build_engine.sh", "golden_inputs.json", "golden_outputs.json",
                     "triton/edgepipe/config.pbtxt", "triton/edgepipe/1/README.md"}
    listed = [line.split("  ", 1)[1] for line in (bundle / CHECKSUMS_FILE).read_text().splitlines()]
    assert sorted(listed) == sorted(names - {CHECKSUMS_FILE})
    verify_bundle_checksums(bundle)
    assert (bundle / "build_engine.sh").stat().st_mode & 0o111  # executable
    readme = (bundle / "README.md").read_text()
    assert "python -m pipeline engine --bundle" in readme and "python -m pipeline verify --bundle" in readme


def test_readme_gives_the_three_ways_and_the_triton_layout(tmp_path, model_path):
    readme = (make_bundle(tmp_path, model_path) / "README.md").read_text()
    assert "python -m pipeline engine --bundle ." in readme and "python -m pipeline verify --bundle ." in readme
    assert "./build_engine.sh" in readme and "trtexec" in readme
    assert "polygraphy run model.int8.onnx --onnxrt" in readme and "--load-inputs golden_inputs.json" in readme
    assert "--load-outputs golden_outputs.json" in readme and "--atol" in readme and "--rtol" in readme
    assert "triton/" in readme and "config.pbtxt" in readme and "tritonserver --model-repository" in readme


def test_onnx_runtime_target_bundle_has_no_trtexec_script(tmp_path, model_path):
    bundle = make_bundle(tmp_path, model_path, target_name="cpu")
    assert not (bundle / "build_engine.sh").exists()
    assert (bundle / "triton" / "edgepipe" / "1" / "model.onnx").is_file()
    readme = (bundle / "README.md").read_text()
    assert "build_engine.sh" not in readme and "polygraphy run" in readme
    verify_bundle_checksums(bundle)


@pytest.mark.parametrize("name", ["build_engine.sh", "golden_inputs.json", "triton/edgepipe/config.pbtxt"])
def test_extra_files_cannot_replace_the_new_files(tmp_path, model_path, name):
    target = resolve_target("jetson")
    with pytest.raises(InputError, match="must be a relative path inside the bundle"):
        write_bundle(tmp_path / "out", model_path, target, golden_for(model_path), target.gates.engine, {},
                     extra_files={name: model_path})


def test_golden_and_target_read_back_unchanged(tmp_path, model_path):
    bundle = load_bundle(make_bundle(tmp_path, model_path))
    golden = golden_for(model_path)
    assert list(bundle.golden.ids) == list(golden.ids)
    assert set(bundle.golden.inputs) == {"image", "input_ids", "attention_mask"}
    for name, value in golden.inputs.items():
        np.testing.assert_array_equal(bundle.golden.inputs[name], value)
        assert bundle.golden.inputs[name].dtype == value.dtype
    np.testing.assert_array_equal(bundle.golden.int8_logits, golden.int8_logits)
    expected = resolve_target("jetson")
    assert dataclasses.replace(bundle.target, source=expected.source) == expected
    assert bundle.thresholds == expected.gates.engine


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="sha256sum not installed")
def test_checksums_file_is_sha256sum_format(tmp_path, model_path):
    bundle = make_bundle(tmp_path, model_path)
    subprocess.run(["sha256sum", "--check", "--quiet", CHECKSUMS_FILE], cwd=bundle, check=True)


def test_verify_with_onnx_runtime_passes(tmp_path, model_path, capsys):
    bundle = make_bundle(tmp_path, model_path)
    assert run_command("verify", "--bundle", str(bundle), "--runtime", "ort") == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "agreement 100.00%" in out


def test_verify_json_output(tmp_path, model_path, capsys):
    bundle = make_bundle(tmp_path, model_path)
    assert run_command("verify", "--bundle", str(bundle), "--runtime", "ort", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] is True and data["samples"] == SAMPLES
    assert data["row"]["vs_reference"]["agreement"] == 1.0


def test_unmeetable_thresholds_exit_3(tmp_path, model_path, capsys):
    bundle = make_bundle(tmp_path, model_path, thresholds=Gate(min_cosine=1.5, knob="nothing can meet this"))
    assert run_command("verify", "--bundle", str(bundle), "--runtime", "ort") == 3
    out = capsys.readouterr().out
    assert "FAIL" in out and "min logit cosine" in out


@pytest.mark.parametrize("victim", ["golden.npz", "model.int8.onnx", "thresholds.json"])
def test_tampering_one_byte_names_the_file(tmp_path, model_path, capsys, victim):
    bundle = make_bundle(tmp_path, model_path)
    path = bundle / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"{victim}: checksum mismatch"):
        verify_bundle_checksums(bundle)
    code = run_command("verify", "--bundle", str(bundle), "--runtime", "ort")
    assert code == 2
    assert f"{victim}: checksum mismatch" in capsys.readouterr().err


def test_missing_and_unlisted_files_are_named(tmp_path, model_path):
    bundle = make_bundle(tmp_path, model_path)
    (bundle / "lint.json").unlink()
    with pytest.raises(InputError, match="lint.json: listed in SHA256SUMS but missing"):
        verify_bundle_checksums(bundle)
    bundle = make_bundle(tmp_path, model_path)
    (bundle / "notes.txt").write_text("added later")
    with pytest.raises(InputError, match="notes.txt: not listed"):
        verify_bundle_checksums(bundle)


def test_device_outputs_are_not_part_of_the_checksums(tmp_path, model_path):
    bundle = make_bundle(tmp_path, model_path)
    (bundle / "device").mkdir()
    (bundle / "device" / "model.plan").write_bytes(b"plan")
    verify_bundle_checksums(bundle)


def test_a_failed_write_leaves_the_previous_bundle_intact(tmp_path, model_path, monkeypatch):
    bundle = make_bundle(tmp_path, model_path)
    before = (bundle / CHECKSUMS_FILE).read_text()

    def broken(_directory):
        raise OSError("disk full")

    monkeypatch.setattr(bundle_module, "checksums_text", broken)
    with pytest.raises(OSError, match="disk full"):
        make_bundle(tmp_path, model_path, thresholds=Gate(min_agreement=0.5))
    assert (bundle / CHECKSUMS_FILE).read_text() == before
    verify_bundle_checksums(bundle)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["bundle"]  # no temporary left behind


def test_rewriting_replaces_the_bundle(tmp_path, model_path):
    make_bundle(tmp_path, model_path)
    bundle = make_bundle(tmp_path, model_path, thresholds=Gate(min_agreement=0.5))
    assert load_bundle(bundle).thresholds == Gate(min_agreement=0.5)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["bundle"]


def test_golden_rejects_inconsistent_lengths(model_path):
    golden = golden_for(model_path)
    with pytest.raises(InputError, match="12 ids"):
        Golden(ids=golden.ids, inputs=golden.inputs, labels=golden.labels[:5],
               reference_logits=golden.reference_logits, int8_logits=golden.int8_logits)


def test_golden_arrays_are_read_only(model_path):
    golden = golden_for(model_path)
    with pytest.raises(ValueError):
        golden.int8_logits[0, 0] = 1.0


def test_verify_trt_without_a_plan_says_how_to_build_it(tmp_path, model_path, capsys):
    bundle = make_bundle(tmp_path, model_path)
    assert run_command("verify", "--bundle", str(bundle), "--runtime", "trt") == 2
    assert "python -m pipeline engine --bundle" in capsys.readouterr().err


def test_engine_without_tensorrt_exits_4_saying_what_is_missing(tmp_path, model_path, capsys):
    available, reason = tensorrt_status()
    if available:
        pytest.skip(f"TensorRT and a GPU are present here ({reason}): the engine is built for real in test_trt_runner.py")
    bundle = make_bundle(tmp_path, model_path)
    assert run_command("engine", "--bundle", str(bundle)) == 4
    err = capsys.readouterr().err
    assert "cannot build a TensorRT engine here" in err and ("tensorrt" in err.lower())


def test_engine_checks_checksums_before_anything_else(tmp_path, model_path, capsys):
    bundle = make_bundle(tmp_path, model_path)
    (bundle / "target.json").write_text("{}")
    assert run_command("engine", "--bundle", str(bundle)) == 2
    assert "target.json: checksum mismatch" in capsys.readouterr().err


def test_self_contained_onnx_is_required(tmp_path):
    model = tiny_fused_model()
    path = tmp_path / "external.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    target = resolve_target("jetson")
    with pytest.raises(InputError, match="external files"):
        write_bundle(tmp_path / "out", path, target, golden_for_model_at(tmp_path), target.gates.engine, {})


def golden_for_model_at(tmp_path) -> Golden:
    path = tmp_path / "plain.onnx"
    onnx.save(tiny_fused_model(), path)
    return golden_for(path)
