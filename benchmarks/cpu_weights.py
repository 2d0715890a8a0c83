"""The `cpu` form's INT8 weights: what 7-bit weights cost, and what each 8-bit alternative costs instead.

    python benchmarks/cpu_weights.py --onnx out/jetson-orin-nano/stages/export/<key>/model.fp32.onnx

The `cpu` target's INT8 model agrees with its FP32 input on about 0.96-0.97 of
the eval samples, against a 0.97 gate (issue 11). Its form stores weights in 7
bits (`reduce_range`) because ONNX Runtime's x86 u8s8 kernels without VNNI sum
pairs of u8 x s8 products in 16 bits (VPMADDUBSW) and saturate with 8-bit
weights. This writes the same FP32 model in variants of the form, every region
in INT8 and no fallback (so only the form differs), and measures each as this
CPU's ONNX Runtime runs it: eval accuracy, top-1 agreement with the FP32 model,
and batch-1 and batch-16 latency (2 threads, variants interleaved, each turn
warmed up by pipeline.timing's rule). Writes benchmarks/results/cpu_weights.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shlex
import sys
import tempfile
from pathlib import Path

from pipeline.artifacts import Artifact
from pipeline.data import load_dataset
from pipeline.data.calibration import load_calibration_set
from pipeline.data.encode import encode
from pipeline.kernels import cpu_facts
from pipeline.parity import accuracy, compare
from pipeline.quantization.evaluate import ort_logits
from pipeline.quantization.qdq import FORMS
from pipeline.quantization.quantize import quantize
from pipeline.store import sha256_file
from pipeline.targets import Quantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantization import Variant, latency_ms, spec_from_onnx  # noqa: E402  (the sibling benchmark's timing and input spec)

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_weights.md"
CPU = FORMS["cpu"]
FORMS_TRIED = {
    "cpu form as shipped: U8 activations, S8 weights in 7 bits": CPU,
    "S8 weights in 8 bits": dataclasses.replace(CPU, reduce_range=False),
    "U8 weights in 8 bits (u8u8 kernels)": dataclasses.replace(CPU, reduce_range=False, unsigned_weights=True),
    "S8 activations (symmetric), S8 weights in 8 bits": dataclasses.replace(CPU, reduce_range=False, signed_activations=True,
                                                                            symmetric_activations=True),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True, help="the FP32 ONNX model (the export stage's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per variant at batch 1 (batch 16: a quarter)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, help="keep the INT8 files here (v0.onnx ... in the table's order), e.g. for "
                        "benchmarks/ort_profile.py; default: a temporary directory")
    args = parser.parse_args(argv)

    spec = spec_from_onnx(args.onnx)
    dataset = load_dataset("emoji")
    calibration = encode(load_calibration_set("emoji-default", dataset).samples(dataset), spec)
    evaluation = encode(dataset.split("eval"), spec)
    reference = ort_logits(args.onnx, evaluation, args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cpu-weights-"))
    settings = Quantize(form="cpu")
    rows, variants = [], [Variant("FP32 (reference)", args.onnx)]
    for index, (name, form) in enumerate(FORMS_TRIED.items()):
        fp32 = Artifact("onnx", args.onnx, sha256_file(args.onnx))
        int8 = quantize(fp32, calibration, settings, work / f"v{index}", form=form).path.rename(work / f"v{index}.onnx")
        logits = ort_logits(int8, evaluation, args.threads)
        rows.append((name, accuracy(logits, evaluation.labels), compare(logits, reference).agreement))
        variants.append(Variant(name, int8))
        print(f"{name}: agreement {rows[-1][2]:.4f}", file=sys.stderr, flush=True)
    b1 = latency_ms(variants, evaluation, args.threads, args.repeats, 1)
    b16 = latency_ms(variants, evaluation, args.threads, max(3, args.repeats // 4), 16)
    fp32_accuracy = accuracy(reference, evaluation.labels)
    lines = ["# The `cpu` form's weights: 7 bits, or 8 bits another way", "",
             f"Command: `python benchmarks/cpu_weights.py {shlex.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"- CPU: {cpu_facts()['model']} ({', '.join(cpu_facts()['isa'])}), {args.threads} threads, Python {platform.python_version()}",
             f"- {len(evaluation)} eval samples; every region in INT8, no fallback; calibration: emoji-default, percentile", "",
             "| form | eval accuracy | agreement with FP32 | batch 1 (ms) | batch 16 (ms) |", "|---|---|---|---|---|",
             f"| FP32 (reference) | {fp32_accuracy:.4f} | 1.0000 | {b1['FP32 (reference)']:.2f} | {b16['FP32 (reference)']:.1f} |"]
    lines += [f"| {name} | {acc:.4f} | {agree:.4f} | {b1[name]:.2f} | {b16[name]:.1f} |" for name, acc, agree in rows]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
