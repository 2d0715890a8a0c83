"""The golden set as Polygraphy data: golden_inputs.json and golden_outputs.json.

`polygraphy run model.int8.onnx --onnxrt --load-inputs golden_inputs.json
--load-outputs golden_outputs.json` (or `--trt` on the device) then checks a
runtime against the same outputs `python -m pipeline verify` uses, with
Polygraphy alone.

The files are written in Polygraphy's JSON encoding (polygraphy/json/serde.py
and polygraphy/comparator/struct.py, identical in 0.49.27 and 0.53.6) without
importing Polygraphy, which the device runtime does not need:
- an array is {"array": base64(np.save(array, allow_pickle=False)), "polygraphy_class": "ndarray"};
- golden_inputs.json is a list of feed dicts (one per iteration) of arrays, what
  `--load-inputs` reads (the `--save-inputs` format);
- golden_outputs.json is a RunResults: {"lst": [[runner_name, [IterationResult, ...]]],
  "polygraphy_class": "RunResults"}, each IterationResult {"outputs": {name:
  {"values": array, "polygraphy_class": "LazyArray"}}, "runtime": null,
  "runner_name": ..., "polygraphy_class": "IterationResult"};
- json.dumps with an indent of 4 spaces, no trailing newline, as Polygraphy's save_json.
tests/test_polygraphy_golden.py checks the bytes against Polygraphy's own
save_json and runs `polygraphy run` on them.

Iterations hold builder.batch.opt samples each (the batch a TensorRT plan is
tuned for; within min..max, so `--trt` runs them too), at most MAX_ITERATIONS
of them. With a static batch
(min = max) the samples beyond the last whole batch are left out.
The outputs are all of the INT8 ONNX's graph outputs as ONNX Runtime computes
them on exactly these iterations with the bundle's session config.
"""

from __future__ import annotations

import base64
import io
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.errors import InputError
from pipeline.onnx_io import GraphIO
from pipeline.runners import ort_session
from pipeline.targets import Target

INPUTS_FILE = "golden_inputs.json"
OUTPUTS_FILE = "golden_outputs.json"
RUNNER_NAME = "edgepipe-golden-onnxruntime"
_TAB = " " * 4  # polygraphy.constants.TAB
_TYPE_MARKER = "polygraphy_class"  # polygraphy.constants.TYPE_MARKER
# Polygraphy's JSON holds raw arrays in base64: all 128 golden samples of the default model made a 75 MB file
# beside a 10 MB INT8 model. Two iterations (16 samples at the default opt batch, about 9 MB) check a runtime;
# `python -m pipeline verify` checks all 128.
MAX_ITERATIONS = 2


def encode_array(array: np.ndarray) -> dict[str, str]:
    """Polygraphy's ndarray encoding."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return {"array": base64.b64encode(buffer.getvalue()).decode(), _TYPE_MARKER: "ndarray"}


def decode_array(encoded: Mapping[str, Any]) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(encoded["array"].encode(), validate=True)), allow_pickle=False)


def iteration_batch(target: Target, count: int) -> tuple[int, int]:
    """(samples per iteration, samples used) for count golden samples."""
    batch = target.builder.batch
    size = max(batch.min, min(batch.opt, batch.max))
    if count < size:
        return count, count  # fewer samples than a batch: one iteration (a static profile cannot run it)
    static = batch.min == batch.max
    return size, (count // size) * size if static else count


def golden_feeds(inputs: Mapping[str, np.ndarray], io_spec: GraphIO, target: Target) -> list[OrderedDict[str, np.ndarray]]:
    """The golden inputs cut into iterations, each a feed dict in the graph's input order."""
    names = [spec.name for spec in io_spec.inputs]
    missing = [name for name in names if name not in inputs]
    if missing:
        raise InputError(f"the golden set has no input(s) {missing} that the ONNX graph takes (it has {sorted(inputs)})")
    count = len(next(iter(inputs.values())))
    size, used = iteration_batch(target, count)
    used = min(used, MAX_ITERATIONS * size)
    return [OrderedDict((name, np.ascontiguousarray(inputs[name][start:start + size])) for name in names)
            for start in range(0, used, size)]


def ort_outputs(model_path: Path, feeds: Sequence[Mapping[str, np.ndarray]], io_spec: GraphIO,
                session_config: Mapping[str, str] | None) -> list[OrderedDict[str, np.ndarray]]:
    """Every graph output for each feed, as ONNX Runtime (CPU, the bundle's session config) computes it."""
    session = ort_session(Path(model_path), session_config=session_config)
    names = [spec.name for spec in io_spec.outputs]
    results = []
    for feed in feeds:
        values = session.run(names, dict(feed))
        results.append(OrderedDict((name, np.asarray(value)) for name, value in zip(names, values)))
    return results


def inputs_json(feeds: Sequence[Mapping[str, np.ndarray]]) -> str:
    return json.dumps([{name: encode_array(value) for name, value in feed.items()} for feed in feeds], indent=_TAB)


def outputs_json(results: Sequence[Mapping[str, np.ndarray]], runner_name: str = RUNNER_NAME) -> str:
    iterations = [{"outputs": {name: {"values": encode_array(value), _TYPE_MARKER: "LazyArray"} for name, value in outputs.items()},
                   "runtime": None, "runner_name": runner_name, _TYPE_MARKER: "IterationResult"} for outputs in results]
    return json.dumps({"lst": [[runner_name, iterations]], _TYPE_MARKER: "RunResults"}, indent=_TAB)


def write_golden_files(directory: Path, model_path: Path, inputs: Mapping[str, np.ndarray], io_spec: GraphIO,
                       target: Target, session_config: Mapping[str, str] | None
                       ) -> tuple[list[OrderedDict[str, np.ndarray]], list[OrderedDict[str, np.ndarray]]]:
    """Write golden_inputs.json and golden_outputs.json into directory; returns (feeds, outputs), one per iteration."""
    feeds = golden_feeds(inputs, io_spec, target)
    results = ort_outputs(model_path, feeds, io_spec, session_config)
    (Path(directory) / INPUTS_FILE).write_text(inputs_json(feeds), encoding="utf-8")
    (Path(directory) / OUTPUTS_FILE).write_text(outputs_json(results), encoding="utf-8")
    return feeds, results


# ------------------------------------------------------------ the README's commands

# Elementwise, an output passes `polygraphy run` when |diff| <= atol or |diff| / |golden| <= rtol
# (its defaults: 1e-5 each). Measured on the default model's INT8 ONNX (128 golden samples, logits in
# [-2.8, 4.7]), 2026-12-01, onnxruntime 1.32, polygraphy 0.53.6:
# - CPU form, no session config: Polygraphy's ONNX Runtime runner reproduces the golden outputs
#   bit for bit (max |diff| 0.0), so the tolerances stay tight;
# - TensorRT form (session.disable_quant_qdq = 1, which Polygraphy cannot set): with
#   --graph-optimization-level ORT_DISABLE_ALL max |diff| 0.032-0.063 (ONNX Runtime's float fusions
#   move values across a QuantizeLinear rounding step now and then; 171 of 1152 logits moved by more
#   than 0.01, every argmax the same); with Polygraphy's default level (Q/DQ fused into integer
#   kernels) up to 1.9, beyond any useful tolerance.
# A TensorRT plan against the golden outputs is not measured here (no GPU); the gate that decides is
# `python -m pipeline verify` (agreement, cosine), so the plan's elementwise tolerances are coarse.
ORT_TOLERANCES = {"atol": 1e-4, "rtol": 1e-3}
ORT_TOLERANCES_NO_QDQ_FUSION = {"atol": 0.25, "rtol": 0.05}
TRT_TOLERANCES = {"atol": 0.5, "rtol": 0.1}


def _no_qdq_fusion(session_config: Mapping[str, str] | None) -> bool:
    return dict(session_config or {}).get("session.disable_quant_qdq") == "1"


def ort_tolerances(session_config: Mapping[str, str] | None) -> dict[str, float]:
    return dict(ORT_TOLERANCES_NO_QDQ_FUSION if _no_qdq_fusion(session_config) else ORT_TOLERANCES)


def polygraphy_ort_options(session_config: Mapping[str, str] | None) -> list[str]:
    """Polygraphy's --onnxrt runner takes no session config entries; the nearest options to the bundle's."""
    if _no_qdq_fusion(session_config):
        # No QDQ fusion: dequantize, then the float op, as TensorRT computes. Polygraphy
        # can only turn off every graph optimization (--graph-optimization-level: in 0.53.6, not in 0.49.27).
        return ["--graph-optimization-level", "ORT_DISABLE_ALL"]
    return []


def tolerance_args(tolerances: Mapping[str, float]) -> list[str]:
    return ["--atol", f"{tolerances['atol']:g}", "--rtol", f"{tolerances['rtol']:g}"]


def polygraphy_ort_command(model_file: str, session_config: Mapping[str, str] | None) -> list[str]:
    return (["polygraphy", "run", model_file, "--onnxrt", *polygraphy_ort_options(session_config),
             "--load-inputs", INPUTS_FILE, "--load-outputs", OUTPUTS_FILE] + tolerance_args(ort_tolerances(session_config)))


def polygraphy_trt_command(plan_path: str) -> list[str]:
    return (["polygraphy", "run", plan_path, "--trt", "--model-type", "engine",
             "--load-inputs", INPUTS_FILE, "--load-outputs", OUTPUTS_FILE] + tolerance_args(TRT_TOLERANCES))
