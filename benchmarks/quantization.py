"""INT8 against plain post-training quantization, side by side in one run (issue 5, item 6).

    python benchmarks/quantization.py --onnx out/jetson-orin-nano/stages/export/<key>/model.fp32.onnx

Takes one FP32 ONNX and one calibration set and compares, on the eval split:
ONNX Runtime's quantize_static defaults, the all-ops TensorRT form (symmetric
S8, per-channel, percentile), and this project's two forms (tensorrt, cpu)
with the accuracy-aware fallback tuned on the calib split. Reports accuracy,
top-1 agreement with the FP32 model, file size, and ONNX Runtime CPU latency
at batch 1 and 16 (2 threads, median of repeated runs, variants interleaved
so that load on the machine hits them alike, each turn warmed up by
pipeline.timing's rule). Writes a markdown table with
the command that produced it to benchmarks/results/quantization.md.

Parity of TensorRT-form files is measured two ways: as ONNX Runtime's x86
INT8 kernels compute it (they saturate S8 x S8 pair sums without VNNI) and as
TensorRT computes it (dequantize, float op: session.disable_quant_qdq).
"""

from __future__ import annotations

import argparse
import logging
import platform
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from pipeline.artifacts import Artifact
from pipeline.data import load_dataset
from pipeline.data.calibration import load_calibration_set
from pipeline.data.encode import Encoded, InputSpec, encode
from pipeline.parity import accuracy, compare
from pipeline.quantization.evaluate import make_evaluator, ort_logits
from pipeline.quantization.qdq import quiet
from pipeline.runners import ort_session
from pipeline.quantization.quantize import quantize
from pipeline.store import sha256_file
from pipeline.targets import resolve_target
from pipeline.timing import WarmUp, time_interleaved

RESULTS = Path(__file__).resolve().parent / "results" / "quantization.md"
EMULATE_TENSORRT = {"session.disable_quant_qdq": "1"}


@dataclass(frozen=True)
class Variant:
    name: str
    path: Path
    deploy_config: Mapping[str, str] = field(default_factory=dict)  # how the deploy runtime's arithmetic is emulated
    note: str = ""


def spec_from_onnx(path: Path) -> InputSpec:
    """Image size and token count from the graph's static input shapes."""
    import onnx

    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(str(path), load_external_data=False).graph.input}
    return InputSpec(image_size=shapes["image"][-1], max_tokens=shapes["input_ids"][-1])


def ort_defaults(fp32: Path, calibration: Encoded, output: Path) -> Path:
    """quantize_static with nothing but the model, the data and the output (after quant_pre_process)."""
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from pipeline.quantization.quantize import CALIBRATION_BATCH
    prepared = output.with_suffix(".prepared.onnx")
    with quiet():
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(output), _Reader(calibration, CALIBRATION_BATCH))
    prepared.unlink()
    return output


def tensorrt_all_ops(fp32: Path, calibration: Encoded, output: Path, percentile: float) -> Path:
    """What a TensorRT user gets from ONNX Runtime's tools: symmetric S8, per-channel, percentile, every op."""
    from onnxruntime.quantization import CalibrationMethod, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from pipeline.quantization.quantize import CALIBRATION_BATCH
    prepared = output.with_suffix(".prepared.onnx")
    extra = {"QuantizeBias": False, "ActivationSymmetric": True, "WeightSymmetric": True,
             "CalibTensorRangeSymmetric": True, "CalibPercentile": percentile}
    with quiet():
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(output), _Reader(calibration, CALIBRATION_BATCH),
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.Percentile, extra_options=extra)
    prepared.unlink()
    return output


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over encoded samples."""

    def __init__(self, data: Encoded, batch: int):
        self._batches = list(data.batches(batch))
        self._position = 0

    def get_next(self):
        if self._position >= len(self._batches):
            return None
        self._position += 1
        return self._batches[self._position - 1]

    def rewind(self) -> None:
        self._position = 0


def ours(fp32: Path, calibration: Encoded, tuning: Encoded, target_name: str, workdir: Path) -> tuple[Path, dict]:
    target = resolve_target(target_name)
    reference = ort_logits(fp32, tuning)
    evaluator = make_evaluator(tuning, reference, target.gates.quantize)
    artifact = quantize(Artifact("onnx", fp32, sha256_file(fp32)), calibration, target.quantize, workdir, evaluator)
    return artifact.path, dict(artifact.meta)


def latency_ms(variants: list[Variant], data: Encoded, threads: int, repeats: int, batch: int) -> dict[str, float]:
    """Median wall time of one run per variant, variants interleaved run by run.

    Each of the `repeats` rounds gives every variant one turn: pipeline.timing's
    warm-up, then one timed run (a run right after a switch of session is slow).
    """
    feed_all = next(data.batches(batch))
    sessions = {v.name: ort_session(v.path, threads) for v in variants}
    calls = [_one_run(session, {i.name: feed_all[i.name] for i in session.get_inputs()}) for session in sessions.values()]
    measured = time_interleaved(calls, runs=1, rounds=repeats, warmup=WarmUp())
    return {name: m.median_ms for name, m in zip(sessions, measured)}


def _one_run(session, feed: Mapping[str, np.ndarray]) -> Callable[[], object]:
    return lambda: session.run(None, feed)


def parity(variant: Variant, data: Encoded, reference: np.ndarray, threads: int) -> dict[str, float]:
    native = ort_logits(variant.path, data, threads)
    row = {"accuracy": accuracy(native, data.labels), "agreement": compare(native, reference).agreement}
    if variant.deploy_config:
        emulated = ort_logits(variant.path, data, threads, variant.deploy_config)
        row |= {"accuracy_deploy": accuracy(emulated, data.labels), "agreement_deploy": compare(emulated, reference).agreement}
    return row


def markdown(rows: list[tuple[Variant, dict]], command: str, facts: list[str]) -> str:
    head = ("| variant | accuracy | agreement | accuracy (TensorRT arithmetic) | agreement (TensorRT arithmetic) "
            "| MB | batch 1 (ms) | batch 16 (ms) | notes |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for variant, r in rows:
        deploy = (f"{r['accuracy_deploy']:.3f}", f"{r['agreement_deploy']:.3f}") if "accuracy_deploy" in r else ("-", "-")
        lines.append(f"| {variant.name} | {r['accuracy']:.3f} | {r['agreement']:.3f} | {deploy[0]} | {deploy[1]} | "
                     f"{r['mb']:.1f} | {r['b1']:.1f} | {r['b16']:.1f} | {variant.note} |")
    return "\n".join([
        "# INT8 against plain post-training quantization", "",
        f"Command: `{command}`", "", *[f"- {fact}" for fact in facts], "", *lines, "",
        "accuracy and agreement: as ONNX Runtime's CPU kernels compute them (what the `cpu` target deploys);",
        "TensorRT arithmetic: the same file with session.disable_quant_qdq (dequantize, then the float op),",
        "which is what TensorRT computes; ONNX Runtime's x86 S8xS8 kernels saturate without VNNI.", "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True, help="the FP32 ONNX model")
    parser.add_argument("--calibration", default="emoji-default", help="calibration set name (calibration/*.toml)")
    parser.add_argument("--dataset", default="emoji")
    parser.add_argument("--limit", type=int, default=0, help="at most this many eval/tuning samples (0: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per variant at batch 1 (batch 16: a quarter)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--int8-tensorrt", type=Path, help="an INT8 ONNX the quantize stage already wrote for the jetson "
                        "target (out/<target>/stages/quantize/*/model.int8.onnx): measured instead of quantizing again")
    parser.add_argument("--int8-cpu", type=Path, help="likewise for the cpu target")
    parser.add_argument("--note", action="append", default=[], help="a line to add to the table's facts")
    parser.add_argument("--skip", default="", help="comma-separated variants to leave out: defaults,trt-all,ours-tensorrt,ours-cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    skip = set(filter(None, args.skip.split(",")))

    spec = spec_from_onnx(args.onnx)
    dataset = load_dataset(args.dataset)
    calibration = encode(load_calibration_set(args.calibration, dataset).samples(dataset), spec)
    limit = args.limit or None
    tuning = encode(dataset.split("calib")[:limit], spec)
    evaluation = encode(dataset.split("eval")[:limit], spec)
    reference = ort_logits(args.onnx, evaluation, args.threads)

    work = Path(tempfile.mkdtemp(prefix="quant-bench-"))
    variants = [Variant("FP32 (reference)", args.onnx)]
    builders: list[tuple[str, Callable[[], Variant]]] = [
        ("defaults", lambda: Variant("ONNX Runtime quantize_static defaults", ort_defaults(args.onnx, calibration, work / "defaults.onnx"),
                                     note="QDQ, MinMax, per-tensor, S8 activations, every op")),
        ("trt-all", lambda: Variant("TensorRT form, all ops (ONNX Runtime tools)",
                                    tensorrt_all_ops(args.onnx, calibration, work / "trt-all.onnx", 99.999), EMULATE_TENSORRT,
                                    note="symmetric S8, per-channel, percentile 99.999")),
    ]
    for key, build in builders:
        if key not in skip:
            started = time.monotonic()
            variants.append(build())
            logging.info("%s: %.0f s", key, time.monotonic() - started)
    given = {"ours-tensorrt": args.int8_tensorrt, "ours-cpu": args.int8_cpu}
    for key, target, config in (("ours-tensorrt", "jetson", EMULATE_TENSORRT), ("ours-cpu", "cpu", {})):
        if key in skip:
            continue
        if given[key] is not None:
            variants.append(Variant(f"ours, target {target} (quantize stage output)", given[key], config,
                                    note=f"`{given[key]}`"))
            continue
        started = time.monotonic()
        path, meta = ours(args.onnx, calibration, tuning, target, work / key)
        floats = ", ".join(f"{r['op_type']} {r['name']}" for r in meta["float_regions"]) or "none"
        variants.append(Variant(f"ours, target {target} ({meta['form']} form, {meta['method']})", path, config,
                                note=f"fallback {meta['fallback_steps']} step(s), {meta['fallback_stop']}; float: {floats}; "
                                     f"{round(time.monotonic() - started)} s to quantize"))

    rows = [(v, parity(v, evaluation, reference, args.threads) | {"mb": v.path.stat().st_size / 1e6}) for v in variants]
    b1 = latency_ms(variants, evaluation, args.threads, args.repeats, 1)
    b16 = latency_ms(variants, evaluation, args.threads, max(3, args.repeats // 4), 16)
    rows = [(v, r | {"b1": b1[v.name], "b16": b16[v.name]}) for v, r in rows]

    import onnxruntime

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    facts = [f"FP32 model: `{args.onnx}` ({args.onnx.stat().st_size / 1e6:.1f} MB), input {spec.image_size} px, {spec.max_tokens} tokens",
             f"calibration set `{args.calibration}`: {len(calibration)} samples; tuning (fallback): calib split, {len(tuning)} samples; "
             f"measured on the eval split: {len(evaluation)} samples, agreement against the FP32 ONNX",
             f"ONNX Runtime {onnxruntime.__version__}, CPU EP, {args.threads} threads, {platform.processor() or platform.machine()}; "
             f"latency: median of {args.repeats} (batch 1) / {max(3, args.repeats // 4)} (batch 16) interleaved runs, "
             f"each after a warm-up of at least {WarmUp().runs} runs and {WarmUp().seconds:g} s",
             *args.note]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(markdown(rows, command, facts))
    print(args.output.read_text())
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
