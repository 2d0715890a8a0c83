"""ONNX Runtime CPU latency of several ONNX files, side by side in one run, with ratios to the first.

    python benchmarks/cpu_latency.py REFERENCE.onnx OTHER.onnx [...] --rounds 15

The issue-3 comparison for any files: the first is the baseline (e.g. the FP32
export of the unpruned source model), the others compressed and quantized
forms. The timing (one session per file, 2 threads, the files taking turns,
warm-up before each turn, median over rounds of each round's median) is
pipeline.side_by_side's, the same as `python -m pipeline bench`, which times a
built directory's own files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import onnxruntime as ort

from pipeline.data.encode import InputSpec
from pipeline.side_by_side import Timing, latency_table, time_side_by_side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", type=Path, nargs="+", help="the baseline first, then the files to compare with it")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--runs", type=int, default=5, help="runs per file, batch and round (their median is the round's figure)")
    parser.add_argument("--warmup", type=float, default=0.2, help="seconds of untimed runs before each file's turn, per batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=192)
    args = parser.parse_args()
    timing = Timing(rounds=args.rounds, runs=args.runs, warmup_s=args.warmup, threads=args.threads)
    latencies = time_side_by_side(args.onnx, InputSpec(image_size=args.image_size), timing)
    print(f"ONNX Runtime {ort.__version__}, CPU, {args.threads} threads, {args.rounds} interleaved rounds x {args.runs} runs, "
          f"{args.warmup:g} s warm-up per turn\n")
    print(latency_table(latencies))


if __name__ == "__main__":
    main()
