"""Progress of the long steps (trainings, encodings, measurements): what a person or a CI log sees while a build runs.

    bars   tqdm's bars, on a terminal (the default when stderr is one)
    lines  a plain line whenever the log has been quiet for `every_s` (from whichever loop is running then):
           done/total, rate, samples/s, ETA and the step's own figures (loss, accuracy); the default without a
           terminal, where bars print nothing (a CI log)
    json   the same as one JSON object per line, for machines (--log-format json)
    quiet  nothing (--quiet)

The style is the one piece of ambient state in the package: the command line sets it for the duration of a
command (`with progress_style(...)`), and the library's loops ask `track(...)` for their bar, so that
no training or measuring function needs a parameter for how it is shown.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, TextIO

FORMS = ("auto", "bars", "lines", "json", "quiet")
DEFAULT_EVERY_S = 15.0


@dataclass(frozen=True)
class ProgressStyle:
    form: Literal["auto", "bars", "lines", "json", "quiet"] = "auto"
    every_s: float = DEFAULT_EVERY_S  # lines and json: a line once the log has been quiet this long (and one when a reported loop ends)
    stream: TextIO | None = None  # default: sys.stderr at the time of printing
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)

    def resolved(self) -> str:
        """The form that applies: auto means bars on a terminal, lines anywhere else."""
        if self.form != "auto":
            return self.form
        stream = self.stream or sys.stderr
        return "bars" if getattr(stream, "isatty", lambda: False)() else "lines"


class _Pace:
    """When the last progress line was printed, by any loop: the steady rate is the log's, not each loop's."""

    def __init__(self, now: float):
        self.last = now


_STYLE: ContextVar[tuple[ProgressStyle, _Pace] | None] = ContextVar("edgepipe_progress_style", default=None)


@contextlib.contextmanager
def progress_style(style: ProgressStyle) -> Iterator[ProgressStyle]:
    """Show the progress of everything run inside the block in this style."""
    token = _STYLE.set((style, _Pace(style.clock())))
    try:
        yield style
    finally:
        _STYLE.reset(token)


def _current() -> tuple[ProgressStyle, _Pace]:
    found = _STYLE.get()
    if found is None:
        style = ProgressStyle()
        return style, _Pace(style.clock())
    return found


def track(iterable: Iterable[Any], desc: str, unit: str, total: int | None = None, leave: bool = True,
          samples_per_step: int | None = None) -> Any:
    """The iterable, shown as the current style says; the result has set_postfix(**figures), as a tqdm bar does.

    samples_per_step: how many samples one step handles (an epoch's train split, a batch), for a samples/s figure.
    """
    style, pace = _current()
    form = style.resolved()
    if form == "bars":
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, unit=unit, total=total, leave=leave)
    return Steps(iterable, desc, unit, total, style, form, pace, samples_per_step)


class Steps:
    """A loop that reports itself in lines (or JSON lines, or not at all) at a steady rate."""

    def __init__(self, iterable: Iterable[Any], desc: str, unit: str, total: int | None, style: ProgressStyle, form: str,
                 pace: _Pace, samples_per_step: int | None = None):
        self.iterable, self.desc, self.unit, self.style, self.form, self.pace = iterable, desc.strip(), unit, style, form, pace
        self.samples_per_step = samples_per_step
        self.total = total if total is not None else _length(iterable)
        self.figures: dict[str, Any] = {}
        self.done = 0

    def set_postfix(self, **figures: Any) -> None:
        self.figures = figures

    def __iter__(self) -> Iterator[Any]:
        clock = self.style.clock
        started = clock()
        printed = False
        for item in self.iterable:
            yield item
            self.done += 1  # the caller finished this step (its figures are set by now)
            now = clock()
            # the log has been quiet long enough, whichever loop spoke last (the last step is left to the closing line)
            if now - self.pace.last >= self.style.every_s and self.done != self.total:
                self._report(now - started)
                printed, self.pace.last = True, now
        now = clock()
        if printed or now - started >= self.style.every_s or now - self.pace.last >= self.style.every_s:
            self._report(now - started, finished=True)  # a loop that was reported (or long, or after a quiet spell) says when it ends
            self.pace.last = now

    def _report(self, elapsed: float, finished: bool = False) -> None:
        if self.form == "quiet":
            return
        rate = self.done / elapsed if elapsed > 0 else None
        left = (self.total - self.done) / rate if rate and self.total is not None else None
        samples_per_s = rate * self.samples_per_step if rate and self.samples_per_step else None
        stream = self.style.stream or sys.stderr
        if self.form == "json":
            record = {"event": "progress", "step": self.desc, "unit": self.unit, "done": self.done, "total": self.total,
                      "elapsed_s": round(elapsed, 1), "per_s": round(rate, 4) if rate else None,
                      "eta_s": round(left, 1) if left is not None else None, "samples_per_s": round(samples_per_s, 1) if samples_per_s else None,
                      "finished": finished,
                      **{key: _plain(value) for key, value in self.figures.items()}}
            print(json.dumps(record), file=stream, flush=True)
            return
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        figures = "".join(f"  {key} {value}" for key, value in self.figures.items())
        timing = f"  {_rate(rate, self.unit)}" + (f" ({samples_per_s:.0f} samples/s)" if samples_per_s else "")
        timing += f"  elapsed {_duration(elapsed)}" + (f"  eta {_duration(left)}" if left and not finished else "")
        print(f"  {self.desc}: {self.unit} {count}{figures}{timing}{'  done' if finished else ''}", file=stream, flush=True)


def _length(iterable: Iterable[Any]) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def _plain(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _rate(per_s: float | None, unit: str) -> str:
    if not per_s:
        return f"- {unit}/s"
    return f"{per_s:.2f} {unit}/s" if per_s >= 1 else f"{60 * per_s:.2f} {unit}/min"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
