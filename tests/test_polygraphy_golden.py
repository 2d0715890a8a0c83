"""golden_inputs.json / golden_outputs.json: Polygraphy's own encoding, and `polygraphy run` accepts them."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline import polygraphy_golden
from pipeline.bundle import load_bundle, write_bundle
from pipeline.lint import lint_onnx
from pipeline.onnx_io import graph_io
from pipeline.targets import resolve_target

from test_bundle import SAMPLES, golden_for, make_bundle, tiny_fused_model  # noqa: E402  (tests/ is on sys.path)

TRT_FORM = {"session.disable_quant_qdq": "1"}


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.int8.onnx"
    onnx.save(tiny_fused_model(), path)
    return path


def polygraphy_module():
    return pytest.importorskip("polygraphy", reason="polygraphy is not installed (pip install -e '.[dev]')")


def test_iterations_follow_the_target_batch(tmp_path, model_path):
    golden = golden_for(model_path)
    io_spec = graph_io(model_path)
    feeds = polygraphy_golden.golden_feeds(golden.inputs, io_spec, resolve_target("jetson"))  # opt 8, dynamic
    assert [len(feed["image"]) for feed in feeds] == [8, SAMPLES - 8]
    assert list(feeds[0]) == ["image", "input_ids", "attention_mask"]  # the graph's input order
    static = polygraphy_golden.golden_feeds(golden.inputs, io_spec, resolve_target("jetson-agx-orin"))  # 8/8/8
    assert [len(feed["image"]) for feed in static] == [8]
    np.testing.assert_array_equal(np.concatenate([f["input_ids"] for f in feeds]), golden.inputs["input_ids"])


def test_outputs_are_the_int8_onnx_outputs_with_the_session_config(tmp_path, model_path):
    golden = golden_for(model_path)
    bundle = make_bundle(tmp_path, model_path)
    data = json.loads((bundle / "golden_outputs.json").read_text())
    (runner, iterations), = data["lst"]
    assert runner == polygraphy_golden.RUNNER_NAME
    assert [list(it["outputs"]) for it in iterations] == [["logits"]] * len(iterations)
    logits = np.concatenate([polygraphy_golden.decode_array(it["outputs"]["logits"]["values"]) for it in iterations])
    # golden_for computed int8_logits with ONNX Runtime in one batch: the same numbers here
    np.testing.assert_allclose(logits, golden.int8_logits, rtol=1e-6, atol=1e-6)
    assert logits.dtype == np.float32


def test_files_are_byte_identical_to_polygraphys_save_json(tmp_path, model_path):
    polygraphy_module()
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json, save_json

    golden = golden_for(model_path)
    io_spec = graph_io(model_path)
    target = resolve_target("jetson")
    feeds, results = polygraphy_golden.write_golden_files(tmp_path, model_path, golden.inputs, io_spec, target, TRT_FORM)

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    save_json(feeds, str(theirs / "inputs.json"))
    run_results = RunResults()
    run_results.add(results, runtime=None, runner_name=polygraphy_golden.RUNNER_NAME)
    run_results.save(str(theirs / "outputs.json"))
    assert (tmp_path / "golden_inputs.json").read_bytes() == (theirs / "inputs.json").read_bytes()
    assert (tmp_path / "golden_outputs.json").read_bytes() == (theirs / "outputs.json").read_bytes()

    loaded_inputs = load_json(str(tmp_path / "golden_inputs.json"))
    assert len(loaded_inputs) == len(feeds)
    for mine, back in zip(feeds, loaded_inputs):
        assert list(back) == list(mine)
        for name in mine:
            np.testing.assert_array_equal(back[name], mine[name])
            assert back[name].dtype == mine[name].dtype
    loaded = RunResults.load(str(tmp_path / "golden_outputs.json"))
    (name, iterations), = loaded.items()
    assert name == polygraphy_golden.RUNNER_NAME and len(iterations) == len(results)
    for mine, back in zip(results, iterations):
        np.testing.assert_array_equal(back["logits"], mine["logits"])


def readme_command(bundle: Path, runtime_flag: str) -> list[str]:
    """The `polygraphy run ... --onnxrt ...` command line the bundle README gives."""
    lines = [line for line in (bundle / "README.md").read_text().splitlines()
             if line.startswith("polygraphy run") and runtime_flag in line]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


def polygraphy_cli() -> list[str]:
    polygraphy_module()
    script = shutil.which("polygraphy") or str(Path(sys.executable).with_name("polygraphy"))
    if not Path(script).is_file():
        pytest.skip("the polygraphy command is not on PATH")
    return [script]


@pytest.mark.parametrize("target_name, session_config", [("jetson", TRT_FORM), ("jetson-agx-orin", TRT_FORM), ("cpu", None)])
def test_polygraphy_run_onnxrt_passes_with_the_readme_command(tmp_path, model_path, target_name, session_config):
    cli = polygraphy_cli()
    target = resolve_target(target_name)
    bundle = write_bundle(tmp_path / "out", model_path, target, golden_for(model_path), target.gates.engine,
                          lint_onnx(model_path, target).to_json(), ort_session_config=session_config)
    argv = readme_command(bundle, "--onnxrt")
    assert argv[:2] == ["polygraphy", "run"] and "--load-inputs" in argv and "--load-outputs" in argv
    assert ("--graph-optimization-level" in argv) == bool(session_config)
    result = subprocess.run(cli + argv[1:], cwd=bundle, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PASSED" in result.stdout + result.stderr


def test_polygraphy_run_fails_on_a_changed_output(tmp_path, model_path):
    """The comparison is real: one golden logit moved beyond the tolerances fails the run."""
    cli = polygraphy_cli()
    bundle = make_bundle(tmp_path, model_path)
    from polygraphy.comparator import RunResults

    results = RunResults.load(str(bundle / "golden_outputs.json"))
    (name, iterations), = results.items()
    iterations[0]["logits"] = iterations[0]["logits"] + np.float32(1.0)
    results.save(str(bundle / "golden_outputs.json"))
    result = subprocess.run(cli + readme_command(bundle, "--onnxrt")[1:], cwd=bundle, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0


def test_bundle_readme_names_the_golden_files(tmp_path, model_path):
    bundle = make_bundle(tmp_path, model_path)
    assert load_bundle(bundle)  # the checksums cover the new files
    readme = (bundle / "README.md").read_text()
    assert "golden_inputs.json" in readme and "golden_outputs.json" in readme
    assert "--atol 0.0001 --rtol 0.001" in readme
