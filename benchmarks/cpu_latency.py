"""ONNX Runtime CPU latency of several ONNX files, side by side in one run, with ratios to the first.

    python benchmarks/cpu_latency.py REFERENCE.onnx OTHER.onnx [...] --rounds 15

The issue-3 comparison: the first file is the baseline (the FP32 export of the
unpruned source model), the others are compressed and quantized forms. Every
file gets its own session (2 threads, ONNX Runtime's default optimizations),
then the sessions are run in turns, round after round (each round: a few
batch-1 and batch-16 runs of every file, median of each), so that machine noise
falls on all of them alike. Each turn starts with untimed warm-up runs: right
after a switch the first few batch-1 runs take 3-4x as long (the previous
session's threads and caches), which with only the median of a few runs made
the int8 files look up to 2x slower than they run on their own. Printed: the median over rounds per file and batch
size, and the baseline's time divided by each file's (higher is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeline.data.encode import InputSpec
from pipeline.runners import ort_session_options
from pipeline.stages.export import example_inputs

BATCHES = (1, 16)


def session(path: Path, threads: int) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), ort_session_options(threads), providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession, spec: InputSpec) -> dict[int, dict[str, np.ndarray]]:
    names = [i.name for i in sess.get_inputs()]
    return {batch: {n: t.numpy() for n, t in zip(names, example_inputs(spec, batch))} for batch in BATCHES}


def warm_up(sess: ort.InferenceSession, feed: dict[str, np.ndarray], seconds: float) -> None:
    """Run untimed until `seconds` have passed (at least 3 runs): the transient after a switch passes within ~40 ms."""
    start, runs = time.perf_counter(), 0
    while runs < 3 or time.perf_counter() - start < seconds:
        sess.run(None, feed)
        runs += 1


def timed_ms(sess: ort.InferenceSession, feed: dict[str, np.ndarray], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", type=Path, nargs="+", help="the baseline first, then the files to compare with it")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--runs", type=int, default=5, help="runs per file, batch and round (their median is the round's figure)")
    parser.add_argument("--warmup", type=float, default=0.2, help="seconds of untimed runs before each file's turn, per batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=192)
    args = parser.parse_args()
    spec = InputSpec(image_size=args.image_size)
    sessions = [session(path, args.threads) for path in args.onnx]
    inputs = [feeds(s, spec) for s in sessions]
    for sess, feed in zip(sessions, inputs):  # warm up: first runs allocate and pack weights
        for batch in BATCHES:
            timed_ms(sess, feed[batch], 3)
    rounds: list[list[dict[int, float]]] = [[] for _ in sessions]
    for _ in range(args.rounds):
        for index, (sess, feed) in enumerate(zip(sessions, inputs)):
            round_ms = {}
            for batch in BATCHES:
                warm_up(sess, feed[batch], args.warmup)
                round_ms[batch] = timed_ms(sess, feed[batch], args.runs)
            rounds[index].append(round_ms)
    medians = [{batch: statistics.median(r[batch] for r in per_file) for batch in BATCHES} for per_file in rounds]
    base = medians[0]
    print(f"ONNX Runtime {ort.__version__}, CPU, {args.threads} threads, {args.rounds} interleaved rounds x {args.runs} runs, {args.warmup:g} s warm-up per turn\n")
    print("| file | MB | batch 1 ms | ×ref b1 | batch 16 ms | ×ref b16 |")
    print("|---|---:|---:|---:|---:|---:|")
    for path, median in zip(args.onnx, medians):
        print(f"| {path} | {path.stat().st_size / 1e6:.1f} | {median[1]:.2f} | {base[1] / median[1]:.2f} | {median[16]:.1f} | {base[16] / median[16]:.2f} |")


if __name__ == "__main__":
    main()
