"""On-device commands: `engine` and `verify` work from a bundle; `inspect` lints an ONNX model.

    python -m pipeline engine --bundle DIR [--out PLAN]
    python -m pipeline verify --bundle DIR [--runtime trt|ort] [--plan FILE]
    python -m pipeline inspect MODEL.onnx --target T [--json]

cli.py adds them with `device_commands.register(subparsers)`. Each command
returns its exit code: 0 fine, 1 lint errors (inspect), 2 bad input (a
checksum, a version mismatch), 3 parity gate failed (verify), 4 no TensorRT
or GPU here. Errors print as one message, without a traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline import parity
from pipeline.bundle import Bundle, load_bundle
from pipeline.errors import InputError, PipelineError
from pipeline.trt.engine import PLAN_NAME, EngineResult, build_engine, local_tensorrt, target_mismatches
from pipeline.trt.runner import TrtRunner
from pipeline.runners import OrtRunner
from pipeline.lint import lint_onnx
from pipeline.targets import resolve_target

LINT_FAILED_EXIT = 1
GOLDEN_BATCH = 32  # ONNX Runtime runs the golden set in batches of this size


def _reporting_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn a PipelineError into its message on stderr and its exit code."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except PipelineError as error:
            print(f"error: {error}", file=sys.stderr)
            return error.exit_code

    return run


# ------------------------------------------------------------------ engine


@_reporting_errors
def engine_command(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.bundle)  # checksums first: never build from a changed bundle
    local = local_tensorrt()  # EngineRequired (exit 4) naming what is missing
    problems = target_mismatches(bundle.target, local)
    for problem in problems:
        print(f"mismatch: {problem}", file=sys.stderr)
    if problems and not args.allow_mismatch:
        raise InputError(f"this machine differs from the bundle's target '{bundle.target.name}' (above); "
                         "build on the device the target describes, or pass --allow-mismatch to build for this one")
    _warn_about_lint(bundle)
    plan = Path(args.out) if args.out else bundle.device_dir / PLAN_NAME
    cache_dir = Path(args.timing_cache_dir) if args.timing_cache_dir else bundle.device_dir / "timing-cache"
    result = build_engine(bundle.model, bundle.target, plan.parent, cache_dir, plan_name=plan.name)
    print(engine_summary(result))
    return 0


def _warn_about_lint(bundle: Bundle) -> None:
    errors = [f for f in bundle.lint.get("findings", []) if f.get("severity") == "error"]
    if errors:
        first = errors[0]
        print(f"warning: the bundle's readiness lint has {len(errors)} error(s), e.g. {first.get('node')} "
              f"[{first.get('op')}]: {first.get('message')}", file=sys.stderr)


def engine_summary(result: EngineResult) -> str:
    counts = result.metadata.get("layer_precisions", {})
    lines = [
        f"engine: {result.plan_path} ({result.plan_path.stat().st_size / 1e6:.1f} MB), metadata {result.metadata_path}",
        f"  built with TensorRT {result.tensorrt_version} ({result.typing}ly typed) on {result.device_name} "
        f"(compute capability {result.compute_capability}) in {result.build_seconds:.1f} s",
        f"  layer precisions: {', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or '-'}",
    ]
    if result.gpu_fallback_layers:
        lines.append(f"  {len(result.gpu_fallback_layers)} layer(s) fell back from DLA to the GPU, e.g. {result.gpu_fallback_layers[0]}")
    if result.float_compute_layers:
        lines.append(f"  {len(result.float_compute_layers)} conv/matmul layer(s) run in float, e.g. {result.float_compute_layers[0]}")
    lines.extend(f"  note: {note}" for note in result.notes)
    return "\n".join(lines)


# ------------------------------------------------------------------ verify


def _runner(runtime: str, bundle: Bundle, plan: Path | None) -> Any:
    if runtime == "ort":

        return OrtRunner(bundle.model, name="onnxruntime", session_config=bundle.ort_session_config)
    plan = plan or bundle.device_dir / PLAN_NAME
    if not plan.is_file():
        raise InputError(f"{plan}: no TensorRT plan; build it with `python -m pipeline engine --bundle {bundle.path}` "
                         "(or check without a GPU: --runtime ort)")

    return TrtRunner(plan)


def _predict_golden(runner: Any, bundle: Bundle) -> np.ndarray:
    inputs = bundle.golden.inputs
    count = len(bundle.golden.ids)
    # never more than the target's profile allows: a model with a static batch (an --onnx source) takes only that
    size = max(1, min(GOLDEN_BATCH, bundle.target.builder.batch.max))
    batches = ({name: value[start:start + size] for name, value in inputs.items()}
               for start in range(0, count, size))
    return np.concatenate([runner.predict(batch) for batch in batches], axis=0)


def verify_rows(logits: np.ndarray, bundle: Bundle, stage: str) -> tuple[parity.ParityRow, parity.ParityRow]:
    """(row gated against the golden INT8 ONNX outputs, informational row against the reference model)."""
    golden = bundle.golden
    gated = parity.parity_row(stage, logits, golden.int8_logits, golden.int8_logits, golden.labels)
    against_reference = parity.parity_row(f"{stage} vs reference", logits, golden.reference_logits,
                                          golden.int8_logits, golden.labels)
    return gated, against_reference


def _format_comparison(name: str, comparison: parity.Comparison) -> str:
    return (f"vs {name}: agreement {100 * comparison.agreement:.2f}%, cosine min {comparison.cosine_min:.6f}, "
            f"max abs error {comparison.max_abs_error:.4g}, SQNR {comparison.sqnr_db:.1f} dB")


@_reporting_errors
def verify_command(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.bundle)
    runner = _runner(args.runtime, bundle, Path(args.plan) if args.plan else None)
    logits = _predict_golden(runner, bundle)
    stage = "engine" if args.runtime == "trt" else "onnxruntime"
    gated, against_reference = verify_rows(logits, bundle, stage)
    violations = parity.check_gate(bundle.thresholds, gated)
    if args.json:
        print(json.dumps({"runtime": args.runtime, "samples": len(logits), "row": gated.to_json(),
                          "vs_reference": against_reference.to_json(), "passed": not violations,
                          "violations": [v.message() for v in violations]}, indent=2))
    else:
        print(f"verify {bundle.target.name} with {runner.name} on {len(logits)} golden samples: "
              f"accuracy {100 * gated.accuracy:.2f}% ({against_reference.delta_pts:+.2f} pts vs reference)")
        print("  " + _format_comparison("INT8 ONNX (gated)", gated.vs_reference))
        print("  " + _format_comparison("reference model", against_reference.vs_reference))
        for violation in violations:
            print(f"FAIL: {violation.message()}")
        if not violations:
            print("PASS: the outputs meet the bundle's thresholds")
    return 3 if violations else 0


# ----------------------------------------------------------------- inspect


@_reporting_errors
def inspect_command(args: argparse.Namespace) -> int:
    report = lint_onnx(Path(args.model), resolve_target(args.target))
    print(json.dumps(report.to_json(), indent=2) if args.json else report.format_text())
    return LINT_FAILED_EXIT if report.errors else 0


# ----------------------------------------------------------------- parsers


def register(subparsers: Any) -> None:
    """Add the engine, verify and inspect subcommands to an argparse subparsers object."""
    engine = subparsers.add_parser(
        "engine", help="build the TensorRT plan from a device bundle (run on the device)",
        description="Check the bundle's checksums and that this machine's TensorRT and GPU match the bundle's "
                    "target, then build the plan with the same code as the engine stage.")
    engine.add_argument("--bundle", required=True, type=Path, help="the bundle directory (out/<target>/bundle)")
    engine.add_argument("--out", type=Path, default=None,
                        help=f"where to write the plan (default: BUNDLE/device/{PLAN_NAME}); metadata goes beside it as PLAN.json")
    engine.add_argument("--timing-cache-dir", type=Path, default=None,
                        help="directory of TensorRT timing caches, one per target, TensorRT version and GPU "
                             "(default: BUNDLE/device/timing-cache)")
    engine.add_argument("--allow-mismatch", action="store_true",
                        help="build even when this machine's TensorRT version or GPU differs from the target's")
    engine.set_defaults(func=engine_command)

    verify = subparsers.add_parser(
        "verify", help="run the bundle's golden inputs and check the outputs against its thresholds",
        description="Run the golden inputs through the plan (trt) or the bundle's ONNX model (ort), compare with "
                    "the golden INT8 ONNX outputs under the bundle's thresholds; exit 0 when they hold, 3 when not.")
    verify.add_argument("--bundle", required=True, type=Path, help="the bundle directory (out/<target>/bundle)")
    verify.add_argument("--runtime", choices=("trt", "ort"), default="trt",
                        help="trt: the TensorRT plan (needs TensorRT and a GPU); ort: ONNX Runtime on the CPU (default: trt)")
    verify.add_argument("--plan", type=Path, default=None,
                        help=f"the plan to check with --runtime trt (default: BUNDLE/device/{PLAN_NAME})")
    verify.add_argument("--json", action="store_true", help="print the parity rows as JSON")
    verify.set_defaults(func=verify_command)

    inspect = subparsers.add_parser(
        "inspect", help="TensorRT readiness lint of an ONNX model for a target",
        description="Report ops the target's TensorRT ONNX parser does not support, INT64 initializers, dynamic "
                    "dims without a profile, DLA-incompatible layers and Q/DQ placement TensorRT cannot fuse. "
                    f"Exits {LINT_FAILED_EXIT} when there are error findings.")
    inspect.add_argument("model", type=Path, help="the ONNX model to check")
    inspect.add_argument("--target", default="jetson", help="target name, alias or TOML file (default: jetson)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(func=inspect_command)
