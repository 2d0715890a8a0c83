"""Progress a CI log shows: a line per long step at a steady rate without a terminal, JSON lines for machines, nothing when quiet."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_emoji_folder, write_target
from pipeline.progress import ProgressStyle, progress_style, track

REPO = Path(__file__).resolve().parent.parent
LENIENT = {"quantize": {"max_drop_pts": 100.0, "min_agreement": 0.0}}


class Clock:
    """A clock the test moves: each step of the loop below takes `step_s` seconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_loop(form: str, steps: int, step_s: float, every_s: float, tty: bool = False) -> str:
    stream, clock = io.StringIO(), Clock()
    stream.isatty = lambda: tty  # type: ignore[method-assign]
    with progress_style(ProgressStyle(form=form, every_s=every_s, stream=stream, clock=clock)):
        bar = track(range(steps), desc="  train", unit="epoch", samples_per_step=100)
        for epoch in bar:
            clock.now += step_s
            bar.set_postfix(loss=f"{1 / (epoch + 1):.3f}", val_acc=f"{0.5 + epoch / 100:.3f}")
    return stream.getvalue()


def test_without_a_terminal_a_long_loop_prints_a_line_at_a_steady_rate():
    lines = run_loop("auto", steps=8, step_s=10.0, every_s=25.0).splitlines()
    # a line once 25 s have passed since the last (epochs 3 and 6), and one when the loop ends
    assert len(lines) == 3, lines
    assert lines[0] == "  train: epoch 3/8  loss 0.333  val_acc 0.520  6.00 epoch/min (10 samples/s)  elapsed 30s  eta 50s"
    assert lines[1].startswith("  train: epoch 6/8  loss 0.167")
    assert lines[2].startswith("  train: epoch 8/8  loss 0.125") and lines[2].endswith("done") and "eta" not in lines[2]


def test_a_short_loop_prints_nothing():
    assert run_loop("lines", steps=3, step_s=1.0, every_s=15.0) == ""


def test_short_loops_after_a_quiet_spell_still_print_a_line():
    """The steady rate is the log's: a short loop that ends a 15-second silence left by other short loops reports."""
    stream, clock = io.StringIO(), Clock()
    with progress_style(ProgressStyle(form="lines", every_s=15.0, stream=stream, clock=clock)):
        for _ in track(range(1), desc="encoding val", unit="batch"):
            clock.now += 10.0  # alone too short to report
        for _ in track(range(2), desc="train: epoch 1", unit="batch"):
            clock.now += 4.0  # at 18 s the log has been quiet for 18 s
    assert stream.getvalue().splitlines()[0].startswith("  train: epoch 1: batch 2/2")


def test_json_lines_carry_the_same_figures():
    records = [json.loads(line) for line in run_loop("json", steps=4, step_s=10.0, every_s=10.0).splitlines()]
    assert [r["done"] for r in records] == [1, 2, 3, 4] and records[-1]["finished"]  # the last step once, as the closing line
    first = records[0]
    assert first == {"event": "progress", "step": "train", "unit": "epoch", "done": 1, "total": 4, "elapsed_s": 10.0, "per_s": 0.1,
                     "eta_s": 30.0, "samples_per_s": 10.0, "finished": False, "loss": 1.0, "val_acc": 0.5}


def test_quiet_prints_nothing_and_a_terminal_gets_tqdm_bars():
    assert run_loop("quiet", steps=4, step_s=30.0, every_s=1.0) == ""
    stream = io.StringIO()
    stream.isatty = lambda: True  # type: ignore[method-assign]
    with progress_style(ProgressStyle(stream=stream)):
        assert type(track(range(3), desc="x", unit="epoch")).__name__ == "tqdm"


# ---------------------------------------------------------------- through the CLI, as a CI runs it (no terminal)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("progress")
    return write_emoji_folder(work / "emoji", per_class=4), write_target(work / "tiny.toml", gates=LENIENT)


def build(inputs: tuple[Path, Path], out: Path, *flags: str) -> subprocess.CompletedProcess:
    data, target = inputs
    args = ["build", "--model", "fused-tiny", "--data", str(data), "--target", str(target), "--epochs", "3", "--no-compression",
            "--out", str(out), *flags]
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=out.parent, env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def ci_log_build(inputs, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One build as a CI runs it (no terminal), every step reported: its out directory and its output."""
    out = tmp_path_factory.mktemp("ci-log") / "out"
    return out, build(inputs, out, "--progress-every", "0")


def test_a_build_in_a_ci_log_reports_every_training_epoch(ci_log_build):
    _, result = ci_log_build
    epochs = [line for line in result.stderr.splitlines() if re.match(r"  train: epoch \d+/\d+ ", line)]  # the epochs, not their batches
    assert [line.split()[2] for line in epochs[:3]] == ["1/3", "2/3", "3/3"], result.stderr[-2000:]
    assert all("loss" in line and "val_acc" in line and "samples/s" in line for line in epochs)
    assert "[source] running" in result.stdout and "[quantize] running" in result.stdout


def test_log_format_json_makes_every_stderr_line_a_json_object(inputs, tmp_path):
    result = build(inputs, tmp_path / "out", "--log-format", "json", "--progress-every", "0", "--json")
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert {"event": "message", "text": "[source] running"} in records
    assert any(r["event"] == "progress" and r["step"] == "train" and r["unit"] == "epoch" for r in records)
    assert json.loads(result.stdout)["status"] == "ok"  # stdout holds the result alone


def test_quiet_prints_the_result_alone(inputs, ci_log_build, tmp_path):
    """On a copy of the CI build (its stages cached: the per-stage lines are what --quiet must hold back; the quiet form
    of a long loop is test_quiet_prints_nothing_and_a_terminal_gets_tqdm_bars's)."""
    shutil.copytree(ci_log_build[0], tmp_path / "out", ignore=shutil.ignore_patterns(".lock"))
    result = build(inputs, tmp_path / "out", "--quiet", "--progress-every", "0", "--json")
    assert result.stderr == ""
    assert json.loads(result.stdout)["status"] == "ok"
