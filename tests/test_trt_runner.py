"""The engine stage and TrtRunner for real: TensorRT and a CUDA GPU required, skipped otherwise.

These run on a Jetson or a GPU host (pip install -e '.[tensorrt,device]' there: the engine code runs
through Polygraphy, which the `device` extra brings). On
machines without them every test here skips and says what is missing; the
TensorRT calls are then covered only statically (tests/test_tensorrt_api.py).
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import onnx
import pytest

from pipeline import device_commands
from pipeline.runners import OrtRunner
from pipeline.trt.engine import build_engine, read_engine_metadata, tensorrt_status
from pipeline.targets import Batch, resolve_target

from test_bundle import golden_for, make_bundle, tiny_fused_model  # noqa: E402  (tests/ is on sys.path)


def _require_tensorrt_and_cuda() -> None:
    from pipeline.trt.runner import trt_runner_status

    available, reason = tensorrt_status()
    if not available:
        pytest.skip(f"needs TensorRT and a CUDA GPU: {reason}")
    available, reason = trt_runner_status()
    if not available:
        pytest.skip(f"needs Polygraphy and the CUDA runtime (libcudart) for the runner's device buffers: {reason}")


@pytest.fixture
def model_path(tmp_path):
    _require_tensorrt_and_cuda()
    path = tmp_path / "model.int8.onnx"
    onnx.save(tiny_fused_model(), path)
    return path


def _with_batch(target, low, opt, high):
    return dataclasses.replace(target, builder=dataclasses.replace(target.builder, batch=Batch(low, opt, high)))


def test_engine_matches_onnx_runtime_on_the_same_qdq_model(tmp_path, model_path):
    from pipeline.trt.runner import TrtRunner

    result = build_engine(model_path, resolve_target("jetson"), tmp_path / "engine", tmp_path / "cache")
    assert result.plan_path.is_file() and result.timing_cache_path.is_file()
    assert read_engine_metadata(result.plan_path)["plan_sha256"] == result.plan_sha256
    assert result.layers, "the inspector reported no layers"
    golden = golden_for(model_path)
    inputs = dict(golden.inputs)
    trt_logits = TrtRunner(result.plan_path).predict(inputs)
    ort_logits = OrtRunner(model_path).predict(inputs)
    assert trt_logits.shape == ort_logits.shape
    assert np.mean(np.argmax(trt_logits, 1) == np.argmax(ort_logits, 1)) >= 0.9
    np.testing.assert_allclose(trt_logits, ort_logits, atol=0.1)


def test_timing_cache_is_reused_on_the_second_build(tmp_path, model_path):
    """The second build loads the first's timings (TensorRT accepts the file) and keeps them in the file it writes back."""
    target = resolve_target("jetson")
    first = build_engine(model_path, target, tmp_path / "a", tmp_path / "cache")
    written = first.timing_cache_path.read_bytes()
    assert written and not [w for w in first.warnings if "timing cache" in w]
    second = build_engine(model_path, target, tmp_path / "b", tmp_path / "cache")
    assert second.timing_cache_path == first.timing_cache_path
    assert not [w for w in second.warnings if "timing cache" in w], second.warnings  # loaded, not rejected, and combined
    assert len(second.timing_cache_path.read_bytes()) >= len(written)  # combined with the file: no timing was dropped


def test_static_batch_engine_pads_and_splits(tmp_path, model_path):
    from pipeline.trt.runner import TrtRunner

    target = _with_batch(resolve_target("jetson"), 4, 4, 4)
    result = build_engine(model_path, target, tmp_path / "engine", None)
    inputs = dict(golden_for(model_path).inputs)  # 12 samples: 3 full batches
    odd = {name: value[:6] for name, value in inputs.items()}  # one full batch and one padded
    runner = TrtRunner(result.plan_path)
    np.testing.assert_allclose(runner.predict(odd), runner.predict(inputs)[:6], atol=1e-5)


def test_engine_and_verify_commands_on_a_bundle(tmp_path, model_path, capsys):
    bundle = make_bundle(tmp_path, model_path)
    parser = argparse.ArgumentParser()
    device_commands.register(parser.add_subparsers(dest="command"))

    def run(*argv):
        args = parser.parse_args(list(argv))
        return args.func(args)

    # This GPU host is not the jetson target; --allow-mismatch builds for it anyway.
    assert run("engine", "--bundle", str(bundle), "--allow-mismatch") == 0
    assert (bundle / "device" / "model.plan").is_file()
    assert run("verify", "--bundle", str(bundle), "--runtime", "trt") == 0
    assert "PASS" in capsys.readouterr().out
