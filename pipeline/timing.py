"""Wall-clock timing of inference calls: one warm-up rule, one set of statistics.

Every latency figure the project prints (the ledger's cost columns, `bench`,
benchmarks/cpu_latency.py, benchmarks/quantization.py) comes from here, so
figures from different tools differ only in what they time, not in how.

The rule: callables take turns, round after round (one callable is a turn of
its own each round). Each turn starts with untimed warm-up runs, at least
WarmUp.runs of them and for at least WarmUp.seconds, then the timed runs.
Right after a switch from one ONNX Runtime session to another the first 3-4
batch-1 runs take 3-4x as long (measured, BENCHMARKS.md), so a turn without
warm-up measures the switch, not the model.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

Call = Callable[[], object]  # one inference


@dataclass(frozen=True)
class WarmUp:
    """Untimed runs at the start of every turn: at least `runs` of them and for at least `seconds`."""

    runs: int = 3
    seconds: float = 0.2


@dataclass(frozen=True)
class Measurement:
    """Timed runs of one callable, in milliseconds."""

    median_ms: float  # median over rounds of each round's median (one round: the median of its runs)
    p90_ms: float  # 90th percentile of every timed run
    runs: int  # timed runs, over all rounds


def warm_up(call: Call, warmup: WarmUp) -> int:
    """Run call untimed until both floors of the rule are met; the number of runs made."""
    start, runs = time.perf_counter(), 0
    while runs < warmup.runs or time.perf_counter() - start < warmup.seconds:
        call()
        runs += 1
    return runs


def timed_runs_ms(call: Call, runs: int) -> list[float]:
    """Wall time of each of `runs` consecutive calls, in milliseconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return times


def time_interleaved(calls: Sequence[Call], runs: int = 10, rounds: int = 1, warmup: WarmUp = WarmUp()) -> list[Measurement]:
    """Each call timed in turns: every round, each call in order gets a warm-up and then `runs` timed runs."""
    runs, rounds = max(1, runs), max(1, rounds)
    per_call: list[list[list[float]]] = [[] for _ in calls]
    for _ in range(rounds):
        for call, turns in zip(calls, per_call):
            warm_up(call, warmup)
            turns.append(timed_runs_ms(call, runs))
    return [_measurement(turns) for turns in per_call]


def time_call(call: Call, runs: int = 10, rounds: int = 1, warmup: WarmUp = WarmUp()) -> Measurement:
    """One call timed on its own, by the same rule."""
    return time_interleaved([call], runs, rounds, warmup)[0]


def _measurement(turns: list[list[float]]) -> Measurement:
    every = [t for turn in turns for t in turn]
    return Measurement(median_ms=float(statistics.median(statistics.median(turn) for turn in turns)),
                       p90_ms=float(np.percentile(every, 90)), runs=len(every))
