"""ONNX Runtime CPU latency of several ONNX files, timed side by side.

The build's ledger times each stage on its own, minutes apart (and a cached
stage keeps the figures of the build that made it), so ratios between its rows
mix machine states. Here every file gets its own session (2 threads, ONNX
Runtime's default optimizations) and the files take turns, round after round:
machine noise falls on all of them alike. Each turn starts with untimed
warm-up runs, because right after a switch the first few batch-1 runs take
3-4x as long (measured, BENCHMARKS.md; the cause was not pinned down: turning
ONNX Runtime's thread spinning off did not remove it).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.data.encode import InputSpec
from pipeline.runners import ort_session_options
from pipeline.export import example_inputs

BATCHES = (1, 16)


@dataclass(frozen=True)
class Timing:
    """How the files are timed."""

    rounds: int = 15
    runs: int = 10  # per file, batch size and round; their median is the round's figure
    warmup_s: float = 0.2  # untimed runs before each turn, per batch size
    threads: int = 2


@dataclass(frozen=True)
class Latency:
    path: Path
    size_bytes: int
    median_ms: dict[int, float]  # batch size -> median over rounds of each round's median


def _feeds(session, spec: InputSpec) -> dict[int, dict[str, np.ndarray]]:

    names = [i.name for i in session.get_inputs()]
    return {batch: {n: t.numpy() for n, t in zip(names, example_inputs(spec, batch))} for batch in BATCHES}


def _warm_up(session, feed: dict[str, np.ndarray], seconds: float) -> None:
    start, runs = time.perf_counter(), 0
    while runs < 3 or time.perf_counter() - start < seconds:
        session.run(None, feed)
        runs += 1


def _median_ms(session, feed: dict[str, np.ndarray], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def time_side_by_side(paths: Sequence[Path], spec: InputSpec, timing: Timing = Timing()) -> list[Latency]:
    """Batch-1 and batch-16 latency of every file, the files taking turns."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(path), ort_session_options(timing.threads), providers=["CPUExecutionProvider"]) for path in paths]
    feeds = [_feeds(session, spec) for session in sessions]
    rounds: list[dict[int, list[float]]] = [{batch: [] for batch in BATCHES} for _ in sessions]
    for _ in range(max(1, timing.rounds)):
        for session, feed, per_file in zip(sessions, feeds, rounds):
            for batch in BATCHES:
                _warm_up(session, feed[batch], timing.warmup_s)
                per_file[batch].append(_median_ms(session, feed[batch], max(1, timing.runs)))
    return [Latency(Path(path), Path(path).stat().st_size, {batch: statistics.median(r[batch]) for batch in BATCHES})
            for path, r in zip(paths, rounds)]


def latency_table(latencies: Sequence[Latency], labels: Sequence[str] | None = None) -> str:
    """A markdown table: size, batch-1 and batch-16 ms, and the first file's time divided by each file's (higher is faster)."""
    labels = list(labels) if labels is not None else [str(latency.path) for latency in latencies]
    base = latencies[0].median_ms
    lines = ["| file | MB | batch 1 ms | × first, b1 | batch 16 ms | × first, b16 |", "|---|---:|---:|---:|---:|---:|"]
    for label, latency in zip(labels, latencies):
        ms = latency.median_ms
        lines.append(f"| {label} | {latency.size_bytes / 1e6:.1f} | {ms[1]:.2f} | {base[1] / ms[1]:.2f} | {ms[16]:.1f} | {base[16] / ms[16]:.2f} |")
    return "\n".join(lines)
