"""ONNX Runtime CPU latency of several ONNX files, timed side by side.

The build's ledger times each stage on its own, minutes apart (and a cached
stage keeps the figures of the build that made it), so ratios between its rows
mix machine states. Here every file gets its own session (2 threads, ONNX
Runtime's default optimizations) and the files take turns, round after round:
machine noise falls on all of them alike. Each turn starts with untimed
warm-up runs, because right after a switch the first few batch-1 runs take
3-4x as long (measured, BENCHMARKS.md; the cause was not pinned down: turning
ONNX Runtime's thread spinning off did not remove it). The turns and the
warm-up rule are pipeline.timing's; the sessions are pipeline.runners'.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.data.encode import InputSpec
from pipeline.runners import ort_session
from pipeline.export import example_inputs
from pipeline.timing import WarmUp, time_interleaved

BATCHES = (1, 16)


@dataclass(frozen=True)
class Timing:
    """How the files are timed."""

    rounds: int = 15
    runs: int = 10  # per file, batch size and round; their median is the round's figure
    warmup_s: float = 0.2  # untimed runs before each turn, per batch size (and at least WarmUp.runs of them)
    threads: int = 2


@dataclass(frozen=True)
class Latency:
    path: Path
    size_bytes: int
    median_ms: dict[int, float]  # batch size -> median over rounds of each round's median


def _feeds(session, spec: InputSpec) -> dict[int, dict[str, np.ndarray]]:
    names = [i.name for i in session.get_inputs()]
    return {batch: {n: t.numpy() for n, t in zip(names, example_inputs(spec, batch))} for batch in BATCHES}


def time_side_by_side(paths: Sequence[Path], spec: InputSpec, timing: Timing = Timing()) -> list[Latency]:
    """Batch-1 and batch-16 latency of every file, the files taking turns."""
    sessions = [ort_session(path, timing.threads) for path in paths]
    feeds = [_feeds(session, spec) for session in sessions]
    # one turn per file and batch size, file by file, batch 1 then batch 16 (the order of the turns in a round)
    calls = [_one_run(session, feed[batch]) for session, feed in zip(sessions, feeds) for batch in BATCHES]
    measured = iter(time_interleaved(calls, timing.runs, timing.rounds, WarmUp(seconds=timing.warmup_s)))
    return [Latency(Path(path), Path(path).stat().st_size, {batch: next(measured).median_ms for batch in BATCHES})
            for path in paths]


def _one_run(session, feed: dict[str, np.ndarray]):
    return lambda: session.run(None, feed)


def latency_table(latencies: Sequence[Latency], labels: Sequence[str] | None = None) -> str:
    """A markdown table: size, batch-1 and batch-16 ms, and the first file's time divided by each file's (higher is faster)."""
    labels = list(labels) if labels is not None else [str(latency.path) for latency in latencies]
    base = latencies[0].median_ms
    lines = ["| file | MB | batch 1 ms | × first, b1 | batch 16 ms | × first, b16 |", "|---|---:|---:|---:|---:|---:|"]
    for label, latency in zip(labels, latencies):
        ms = latency.median_ms
        lines.append(f"| {label} | {latency.size_bytes / 1e6:.1f} | {ms[1]:.2f} | {base[1] / ms[1]:.2f} | {ms[16]:.1f} | {base[16] / ms[16]:.2f} |")
    return "\n".join(lines)
