"""Deterministic stop points for a build run as a subprocess (tests/test_resume.py).

    python -c "import kill_hooks; kill_hooks.main()" POINT MARKER build ARGS...

runs `python -m pipeline build ARGS...` with one hook installed. A kill point
SIGKILLs the process itself at a chosen place, after writing MARKER (JSON: the
point, the pid and what was under way), so a test can prove the kill happened
there; the hold point keeps the build's out-directory lock, after writing
MARKER, until the file MARKER.release appears.

The hooks are installed without importing torch before main(): main() sets its
environment guards (allocator, pinned kernels) first. pipeline.cli's
build_command, which main() calls after the guards, is wrapped: the wrapper
imports pipeline.build (as build_command does first, so modules load in the
same order), patches one function, then runs the real build_command. Up to the
stop point the build computes exactly what an unhooked one does.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

HOLD_LIMIT_S = 600  # a held build gives up (and fails) if its test never releases it
TRAIN_BATCHES = 1  # the source training is killed after this many batches, as the next one starts
ONNX_FILE = "model.fp32.onnx"  # the export stage's file, killed with half its bytes written


def _kill(marker: Path, point: str, **facts: Any) -> None:
    marker.write_text(json.dumps({"point": point, "pid": os.getpid(), **facts}))
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_in_training(marker: Path) -> None:
    """SIGKILL as the source training's batch TRAIN_BATCHES + 1 starts (TRAIN_BATCHES optimizer steps taken)."""
    import pipeline.stages.source as source_stage
    import pipeline.training as training

    state = {"in_source": False, "batches": 0}
    real_train_source, real_loss = source_stage.train_source, training._loss

    def train_source(*args, **kwargs):
        state["in_source"] = True
        try:
            return real_train_source(*args, **kwargs)
        finally:
            state["in_source"] = False

    def loss(*args, **kwargs):
        if state["in_source"]:
            if state["batches"] == TRAIN_BATCHES:
                _kill(marker, "training", batches_done=state["batches"])
            state["batches"] += 1
        return real_loss(*args, **kwargs)

    source_stage.train_source = train_source  # the name the source pass's run calls
    training._loss = loss  # the name train()'s batch loop calls


def _kill_in_onnx_write(marker: Path) -> None:
    """SIGKILL with the first half of the export stage's ONNX bytes written (and flushed) to its file."""
    import io

    import onnx

    real_save = onnx.save

    def save(proto, f, *args, **kwargs):
        path = Path(f) if isinstance(f, (str, os.PathLike)) else None
        # the export stage's own file, in its entry's temp dir (stages/export/.KEY.xxxx/), not a footprint's --latency export
        if path is not None and path.name == ONNX_FILE and path.parent.name.startswith(".") and path.parent.parent.name == "export":
            buffer = io.BytesIO()
            real_save(proto, buffer, *args, **kwargs)
            data = buffer.getvalue()
            with open(path, "wb") as handle:
                handle.write(data[:len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            _kill(marker, "onnx-write", path=str(path.resolve()), written=len(data) // 2, size=len(data))
        return real_save(proto, f, *args, **kwargs)

    onnx.save = save  # export_onnx calls onnx.save(graph, path)


def _kill_in_quantizer(marker: Path) -> None:
    """SIGKILL inside quantize(): calibrated, with the first Q/DQ candidate written to the stage's scratch directory."""
    import pipeline.quantization.quantize as quantizer

    real_write = quantizer.write_qdq

    def write_qdq(prepared, regions, quantized, ranges, form, output, *rest):
        real_write(prepared, regions, quantized, ranges, form, output, *rest)
        _kill(marker, "quantizer", candidate=str(Path(output).resolve()), quantized_regions=len(quantized))

    quantizer.write_qdq = write_qdq  # the name the candidate builder calls


def _hold_lock(marker: Path) -> None:
    """With the out directory's lock held (right after the sweep that follows taking it), wait for MARKER.release."""
    from pipeline.store import Store

    real_sweep = Store.sweep_leftovers
    release = marker.with_name(marker.name + ".release")

    def sweep_leftovers(self):
        swept = real_sweep(self)
        marker.write_text(json.dumps({"point": "hold", "pid": os.getpid(), "lock": (self.root / ".lock").read_text()}))
        deadline = time.monotonic() + HOLD_LIMIT_S
        while not release.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"kill_hooks: {release} never appeared")
            time.sleep(0.02)
        return swept

    Store.sweep_leftovers = sweep_leftovers


POINTS: dict[str, Callable[[Path], None]] = {
    "training": _kill_in_training,
    "onnx-write": _kill_in_onnx_write,
    "quantizer": _kill_in_quantizer,
    "hold": _hold_lock,
}


def install(point: str, marker: Path) -> None:
    import pipeline.cli as cli

    patch, real_build_command = POINTS[point], cli.build_command

    def build_command(args):
        import pipeline.build  # noqa: F401  what build_command imports first; torch loads here, after main()'s guards

        patch(marker)
        return real_build_command(args)

    cli.build_command = build_command  # main() -> _build_parser() binds the build subcommand to this name


def main() -> None:
    point, marker, *argv = sys.argv[1:]
    install(point, Path(marker))
    from pipeline.cli import main as cli_main

    assert "torch" not in sys.modules, "kill_hooks imported torch before main() set its environment guards"
    sys.exit(cli_main(argv))
