"""What bias correction buys: each form quantized with and without it, every region INT8, no fallback.

    python benchmarks/bias_correction.py --onnx out/jetson-orin-nano/stages/export/<key>/model.fp32.onnx

For each form (`tensorrt`, `cpu`) the same FP32 model is quantized twice by
pipeline.quantization.quantize, once with its INT8 convolutions' biases
corrected (the default, pipeline/quantization/bias_correction.py) and once
without, and each INT8 model is run as its form's runtime computes it (the
`tensorrt` form with Q/DQ in float, as TensorRT does). Reports eval accuracy
and top-1 agreement with the FP32 model on eval (the split the gates judge)
and calib (the split the fallback tunes on), with the agreement's Wilson
interval, and the seconds each quantize call took. Writes
benchmarks/results/bias_correction.md.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

from pipeline.artifacts import Artifact
from pipeline.data import load_dataset
from pipeline.data.calibration import load_calibration_set
from pipeline.data.encode import encode
from pipeline.kernels import cpu_facts
from pipeline.parity import accuracy, compare, wilson_interval
from pipeline.quantization.evaluate import ort_logits
from pipeline.quantization.qdq import FORMS
from pipeline.quantization.quantize import quantize
from pipeline.store import sha256_file
from pipeline.targets import Quantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantization import spec_from_onnx  # noqa: E402  (the sibling benchmark's input spec)

RESULTS = Path(__file__).resolve().parent / "results" / "bias_correction.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True, help="the FP32 ONNX model (the export stage's)")
    parser.add_argument("--forms", nargs="+", choices=sorted(FORMS), default=["tensorrt", "cpu"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    spec = spec_from_onnx(args.onnx)
    dataset = load_dataset("emoji")
    calibration = encode(load_calibration_set("emoji-default", dataset).samples(dataset), spec)
    splits = {name: encode(dataset.split(name), spec) for name in ("eval", "calib")}
    reference = {name: ort_logits(args.onnx, data, args.threads) for name, data in splits.items()}
    fp32 = Artifact("onnx", args.onnx, sha256_file(args.onnx))
    work = Path(tempfile.mkdtemp(prefix="bias-correction-"))
    lines = ["# What bias correction buys", "",
             f"Command: `python benchmarks/bias_correction.py {shlex.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"- CPU: {cpu_facts()['model']} ({', '.join(cpu_facts()['isa'])}), {args.threads} threads, Python {platform.python_version()}",
             f"- FP32 model sha256 {fp32.sha256[:12]}…; {len(splits['eval'])} eval and {len(splits['calib'])} calib samples; every region "
             f"in INT8, no fallback; calibration: emoji-default ({len(calibration)} samples), percentile", "",
             f"FP32 eval accuracy: {accuracy(reference['eval'], splits['eval'].labels):.4f}", "",
             "| form | bias correction | eval accuracy | eval agreement with FP32 [95% CI] | calib agreement | quantize s |",
             "|---|---|---|---|---|---|"]
    for form in args.forms:
        for corrected in (False, True):
            start = time.perf_counter()
            int8 = quantize(fp32, calibration, Quantize(form=form), work / f"{form}-{corrected}", bias_correction=corrected)
            seconds = time.perf_counter() - start
            logits = {name: ort_logits(int8.path, data, args.threads, int8.meta["ort_session_config"]) for name, data in splits.items()}
            agree = {name: compare(logits[name], reference[name]).agreement for name in splits}
            low, high = wilson_interval(round(agree["eval"] * len(splits["eval"])), len(splits["eval"]))
            lines.append(f"| {form} | {'on' if corrected else 'off'} | {accuracy(logits['eval'], splits['eval'].labels):.4f} | "
                         f"{agree['eval']:.4f} [{low:.3f}, {high:.3f}] | {agree['calib']:.4f} | {seconds:.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
