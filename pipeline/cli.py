"""Command line: build, targets, report, bench, and the on-device commands (engine, verify, inspect)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from pipeline.errors import InputError, Interrupted, PipelineError
from pipeline.progress import DEFAULT_EVERY_S, ProgressStyle, progress_style

DEFAULT_TARGET = "jetson"


def _build_parser() -> argparse.ArgumentParser:
    from pipeline import device_commands
    from pipeline.settings import DEFAULT_MODEL, FUSIONS, TrainSettings  # no torch: `verify --runtime ort` runs without it

    defaults = TrainSettings()
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Fused image+text model -> gated INT8 ONNX -> TensorRT engine or device bundle.")
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="train or load the model, export, quantize, gate every stage, build the engine or bundle")
    build.add_argument("--target", default=DEFAULT_TARGET,
                       help="target name, alias or TOML file (see `targets`; default: jetson); several, comma-separated, or `all` "
                            "build a fleet in one run: out/<target>/ each, one shared stage cache, out/fleet.json")
    build.add_argument("--model", default=DEFAULT_MODEL, help=f"built-in model name or package.module:factory for your own nn.Module (default: {DEFAULT_MODEL})")
    build.add_argument("--weights", type=Path, default=None, help="state dict (.pt) to load instead of training; loaded with weights_only=True")
    build.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                       help="a Hugging Face tokenizer folder (read offline) for --model package.module:factory; replaces the one its input_spec names")
    build.add_argument("--onnx", type=Path, default=None, metavar="FILE",
                       help="start from your FP32 ONNX file instead of a torch model (not with --model/--weights/--fusion): its inputs "
                            "are read from the graph; simplified, quantized and gated against its own outputs; prune and factorize skipped")
    build.add_argument("--data", default="emoji", help="built-in data set name or a folder with samples.jsonl (default: emoji)")
    build.add_argument("--out", type=Path, default=None, help="output directory (default: out/<target name>; for a fleet: out, one directory per target in it)")
    build.add_argument("--cache", type=Path, default=None, metavar="DIR",
                       help="stage cache directory, shared by every build and target that names it (e.g. kept between CI runs; "
                            "default: inside the output directory; for a fleet: <out>/cache)")
    build.add_argument("--fusion", choices=FUSIONS, default=None, help="fusion strategy of the built-in models (default: the model's own)")
    build.add_argument("--epochs", type=int, default=None, help="training epochs when training (default: the model's recipe)")
    build.add_argument("--seed", type=int, default=defaults.seed, help=f"training seed (default: {defaults.seed})")
    build.add_argument("--calibration-method", choices=("minmax", "entropy", "percentile"), default=None, help="INT8 calibration method (default: the target's)")
    build.add_argument("--calibration", default=None, help="calibration set name in calibration/ (default: the target's)")
    for branch in ("image", "text", "fusion"):
        build.add_argument(f"--prune-{branch}", type=float, default=None, metavar="RATIO",
                           help=f"share of {branch} channels pruned per unit, 0 to skip (default: the target's compression.prune_{branch})")
    build.add_argument("--text-depth", type=int, default=None, metavar="N", help="MiniLM layers kept by depth pruning, the least sensitive dropped first (default: the target's)")
    build.add_argument("--factorize-energy", type=float, default=None, metavar="E", help="low-rank factorize Linear/1x1 conv layers keeping this spectral energy (default: the target's)")
    build.add_argument("--embedding-energy", type=float, default=None, metavar="E", help="factorize the token embedding keeping this spectral energy (default: the target's)")
    build.add_argument("--recovery-epochs", type=int, default=None, metavar="N", help="distillation epochs after pruning, and after factorizing where the target sets no compression.factorize_epochs (default: the target's)")
    build.add_argument("--recovery-seed", type=int, default=None, metavar="N", help="seed of the recovery trainings (default: the target's compression.recovery_seed, else --seed); the source model stays cached")
    build.add_argument("--keep", default=None, metavar="NAME,...",
                       help="modules (by their name in the model) that prune and factorize leave whole, added to the target's compression.keep")
    build.add_argument("--vocabulary", choices=("auto", "train", "whole"), default=None,
                       help="token tables keep only the rows the train split reads: auto (tables your factory starts at random, trained here), "
                            "train (every table), whole (none) (default: the target's compression.vocabulary)")
    build.add_argument("--gate-mode", choices=("point", "confidence"), default=None,
                       help="judge every accuracy gate on the drop's point estimate or on the upper bound of its 95%% interval (default: each gate's own mode)")
    build.add_argument("--no-compression", action="store_true", help="skip the prune and factorize stages (export the trained model as it is)")
    latency = build.add_mutually_exclusive_group()
    latency.add_argument("--latency", dest="latency", action="store_true", default=False,
                         help="also time every stage's ONNX with ONNX Runtime on this CPU (the ledger's b1/b16 columns; off by default: "
                              "about a minute of a cold build, and `bench` times a build's files side by side)")
    latency.add_argument("--no-latency", dest="latency", action="store_false", help="do not time the stages (the default; params and MACs are always counted)")
    build.add_argument("--simplifier", choices=("onnxsim", "none"), default="onnxsim", help="ONNX graph simplifier after export (default: onnxsim)")
    build.add_argument("--require-engine", action="store_true", help="fail (exit 4) instead of writing a device bundle when no engine can be built here")
    build.add_argument("--allow-mismatch", action="store_true",
                       help="where this machine's GPU or TensorRT differs from the target's, build the engine for this machine anyway "
                            "(default: write the device bundle; the manifest says why)")
    build.add_argument("--no-wait", dest="wait", action="store_false",
                       help="fail (exit 2) instead of waiting when another build is using the output directory (default: wait, and say so)")
    build.add_argument("--json", action="store_true", help="print the manifest summary as JSON instead of the table")
    shown = build.add_mutually_exclusive_group()
    shown.add_argument("--quiet", action="store_true", help="print no progress: only errors and the result (the table, or --json's summary)")
    shown.add_argument("--log-format", choices=("text", "json"), default="text",
                       help="progress as text (bars on a terminal, a line per long step at a steady rate elsewhere, as in a CI log) "
                            "or one JSON object per line on stderr (default: text)")
    build.add_argument("--progress-every", type=float, default=DEFAULT_EVERY_S, metavar="SECONDS",
                       help=f"without a terminal, at most one progress line per long step this often (default: {DEFAULT_EVERY_S:g})")
    build.set_defaults(func=build_command)

    targets = sub.add_parser("targets", help="list the deploy targets with their TensorRT version, compute capability and DLA cores")
    targets.add_argument("--json", action="store_true", help="print as JSON")
    targets.set_defaults(func=targets_command)

    report = sub.add_parser("report", help="print a build's ledger again from its manifest.json (report.md holds the same)")
    report.add_argument("--out", type=Path, default=None, help="the build's output directory (default: out/<target name>)")
    report.add_argument("--target", default=DEFAULT_TARGET, help="target whose default output directory to read when --out is not given (default: jetson)")
    report.add_argument("--json", action="store_true", help="print the manifest summary as JSON instead of the table")
    report.add_argument("--html", action="store_true", help="also write report.html again from the manifest (e.g. for a build made before it existed)")
    report.set_defaults(func=report_command)

    bench = sub.add_parser("bench", help="time a build's reference FP32 export, FP32 export and INT8 model side by side with ONNX Runtime on this CPU")
    bench.add_argument("--out", type=Path, default=None, help="the build's output directory (default: out/<target name>)")
    bench.add_argument("--target", default=DEFAULT_TARGET, help="target whose default output directory to read when --out is not given (default: jetson)")
    bench.add_argument("--rounds", type=int, default=15, help="rounds of turns (default: 15)")
    bench.add_argument("--runs", type=int, default=10, help="timed runs per file, batch size and round; their median is the round's figure (default: 10)")
    bench.add_argument("--warmup", type=float, default=0.2, help="seconds of untimed runs before each turn (default: 0.2)")
    bench.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default: 2)")
    bench.set_defaults(func=bench_command)

    device_commands.register(sub)
    return parser


def build_command(args: argparse.Namespace) -> int:
    from pipeline.targets import resolve_targets

    targets = resolve_targets(args.target)
    if args.progress_every < 0:
        raise InputError(f"--progress-every must be at least 0 (got {args.progress_every:g})")
    if len(targets) > 1:
        return fleet_command(args, targets)
    config = _build_config(args, targets[0], args.out or Path("out") / targets[0].name, args.cache)
    _run(args, lambda say: _build(config, say), _print_result)
    return 0


def fleet_command(args: argparse.Namespace, targets: list[Any]) -> int:
    from pipeline.fleet import build_fleet, fleet_configs, fleet_table
    from pipeline.report import summary_table

    out = args.out or Path("out")
    configs = fleet_configs([_build_config(args, target, out / target.name, args.cache) for target in targets], out, args.cache)

    def show(outcome: Any) -> None:
        if not args.json and not args.quiet and outcome.manifest is not None:
            print(summary_table(outcome.manifest) + "\n", flush=True)

    def print_fleet(fleet: dict[str, Any] | None, as_json: bool) -> None:
        if fleet is not None:
            print(json.dumps(fleet, indent=2) if as_json else fleet_table(fleet))

    fleet = _run(args, lambda say: build_fleet(configs, out, say, on_target=show), print_fleet, attribute="fleet")
    return int(fleet["exit_code"])


def _kept_modules(flag: str | None, pinned: tuple[str, ...]) -> tuple[str, ...] | None:
    """--keep a,b on top of the target's compression.keep (None: the flag is not given)."""
    if flag is None:
        return None
    names = [name.strip() for name in flag.split(",")]
    if not all(names):
        raise InputError(f"--keep '{flag}': an empty module name; give names separated by commas, e.g. --keep encoder.layers.0,classifier")
    return tuple(dict.fromkeys((*pinned, *names)))


def _build_config(args: argparse.Namespace, target: Any, out: Path, cache: Path | None) -> Any:
    """One target's build as the flags ask for it; bad flags are refused before anything is written."""
    from pipeline.build import BuildConfig
    from pipeline.targets import Compression, with_overrides
    from pipeline.models import train_defaults

    ratios = {"prune_image": args.prune_image, "prune_text": args.prune_text, "prune_fusion": args.prune_fusion}
    # a ratio given on the command line is the user's own choice: it holds for their model too, in place of the user budget's cap
    user_caps = {f"compression.user_budget.{name}": value for name, value in ratios.items()} if target.compression.user_budget else {}
    target = with_overrides(target, **{
        "quantize.method": args.calibration_method, "quantize.calibration": args.calibration,
        **{f"compression.{name}": value for name, value in ratios.items()}, **user_caps,
        "compression.factorize_energy": args.factorize_energy, "compression.embedding_energy": args.embedding_energy,
        "compression.recovery_epochs": args.recovery_epochs, "compression.text_depth": args.text_depth,
        "compression.recovery_seed": args.recovery_seed,
        "compression.keep": _kept_modules(args.keep, target.compression.keep), "compression.vocabulary": args.vocabulary,
        **({f"gates.{name}.mode": args.gate_mode for name in ("prune", "factorize", "quantize")} if args.gate_mode else {}),
    })
    if args.no_compression:
        target = dataclasses.replace(target, compression=Compression())
    recipe = train_defaults(args.model)
    if args.epochs is not None and args.epochs < 1:
        raise InputError(f"--epochs must be at least 1 (got {args.epochs})")
    train = dataclasses.replace(recipe, epochs=args.epochs or recipe.epochs, seed=args.seed)
    if args.weights is not None and not args.weights.is_file():
        raise InputError(f"{args.weights}: weights file not found (--weights)")
    target, onnx_settings = _onnx_source(args, target)
    check_out_dir(out)
    if cache is not None:
        check_out_dir(cache, flag="--cache")
    return BuildConfig(
        target=target, out=out, model=args.model, data=args.data, weights=args.weights, tokenizer=args.tokenizer,
        fusion=args.fusion, train=train, simplifier=args.simplifier,
        require_engine=args.require_engine, allow_mismatch=args.allow_mismatch, measure_latency=args.latency, wait=args.wait,
        cache=cache, onnx=args.onnx, **onnx_settings,
    )


def _onnx_source(args: argparse.Namespace, target: Any) -> tuple[Any, dict[str, Any]]:
    """--onnx: the torch source's flags refused beside it; a static batch 1 makes every run batch 1 (the eval batch and the
    target's TensorRT profile, min = opt = max = 1), since the graph takes no other. Returns the target and BuildConfig's extras."""
    from pipeline.models.onnx_source import static_batch
    from pipeline.settings import DEFAULT_MODEL
    from pipeline.targets import Batch, with_overrides

    if args.onnx is None:
        return target, {}
    given = [flag for flag, on in (("--model", args.model != DEFAULT_MODEL), ("--weights", args.weights is not None),
                                   ("--fusion", args.fusion is not None)) if on]
    if given:
        raise InputError(f"--onnx {args.onnx} with {given[0]}: the ONNX file is the source model; {given[0]} names a torch one "
                         "(give one or the other)")
    batch = static_batch(args.onnx)
    if batch is None:
        return target, {}
    if args.latency:
        raise InputError(f"--latency with --onnx {args.onnx}: its static batch {batch} cannot run the batch-16 latency column; "
                         "drop --latency or export the model with a dynamic batch axis")
    return with_overrides(target, **{"builder.batch": Batch(batch, batch, batch)}), {"eval_batch": batch}


def _build(config: Any, say: Any) -> dict[str, Any]:
    from pipeline.build import build

    return build(config, progress=say)


def _run(args: argparse.Namespace, work: Any, show: Any, attribute: str = "manifest") -> Any:
    """Run a build (or a fleet) with the progress the flags ask for and SIGTERM as an interrupt; print its result however it ends.

    Under torchrun every process runs the build and rank 0 alone speaks: the others print nothing (errors apart).
    """
    from pipeline.distributed import barrier, shutdown, world

    speaks = world().is_writer
    if not speaks:
        args = argparse.Namespace(**{**vars(args), "quiet": True})
        show = lambda result, as_json: None  # noqa: E731
    say, style = _progress(args)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with progress_style(style):
            result = work(say)
    except BaseException as error:
        # The manifest (or the fleet summary) already says how the build ended (failed, interrupted, error); so does the summary.
        show(getattr(error, attribute, None), args.json)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if world().active:
            barrier()  # the others wait for rank 0's manifest: torchrun stops every process once one of them fails
        shutdown()
    show(result, args.json)
    return result


def _progress(args: argparse.Namespace) -> tuple[Any, ProgressStyle]:
    """Where the build's messages and its long steps' progress go: stdout keeps the result alone when --json asks for it."""
    stream = sys.stderr if args.json or args.log_format == "json" else sys.stdout
    if args.quiet:
        return (lambda message: None), ProgressStyle(form="quiet")
    if args.log_format == "json":
        return (lambda message: print(json.dumps({"event": "message", "text": message}), file=sys.stderr, flush=True)), \
            ProgressStyle(form="json", every_s=args.progress_every, stream=sys.stderr)
    return (lambda message: print(message, file=stream, flush=True)), ProgressStyle(every_s=args.progress_every, stream=sys.stderr)


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name, 128 + signum)


def _print_result(manifest: dict[str, Any] | None, as_json: bool) -> None:
    from pipeline.report import summary, summary_table

    if manifest is None:
        return
    print(json.dumps(summary(manifest), indent=2) if as_json else summary_table(manifest))


def _out_dir(args: argparse.Namespace) -> Path:
    from pipeline.targets import resolve_target

    return args.out or Path("out") / resolve_target(args.target).name


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """--out must be a directory (or a path one can be made at) this process can create files in: an InputError naming it
    otherwise, raised before anything is written. Makes the directory, as the build would; writes nothing into it."""
    existing = next((p for p in (out, *out.parents) if p.exists() or p.is_symlink()), None)
    if existing is not None and not existing.is_dir():
        where = "is" if existing == out else f"lies under {existing}, which is"
        raise InputError(f"{flag} {out}: {where} not a directory (a build writes a directory of files)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # unnamed where the file system allows: nothing appears in the directory
            pass
    except OSError as error:
        raise InputError(f"{flag} {out}: cannot write there ({error.strerror or error}); choose a directory you can write to") from None


def report_command(args: argparse.Namespace) -> int:
    from pipeline.report import read_manifest

    out = _out_dir(args)
    manifest = read_manifest(out)
    if args.html:
        from pipeline.report_html import report_html
        from pipeline.store import atomic_write_text

        atomic_write_text(out / "report.html", report_html(manifest))
        print(f"wrote {out / 'report.html'}", file=sys.stderr)
    _print_result(manifest, args.json)
    return 0


def bench_command(args: argparse.Namespace) -> int:
    import onnxruntime

    from pipeline.bench import bench
    from pipeline.side_by_side import Timing, latency_table

    for flag, value, least in (("--rounds", args.rounds, 1), ("--runs", args.runs, 1), ("--threads", args.threads, 1), ("--warmup", args.warmup, 0)):
        if value < least:
            raise InputError(f"{flag} must be at least {least} (got {value:g})")
    out = _out_dir(args)
    timing = Timing(rounds=args.rounds, runs=args.runs, warmup_s=args.warmup, threads=args.threads)
    result = bench(out, timing)
    print(f"{out}: ONNX Runtime {onnxruntime.__version__}, CPU, {timing.threads} threads, side by side: {timing.rounds} rounds of turns, "
          f"{timing.runs} timed runs per turn after {timing.warmup_s:g} s of warm-up; median over rounds\n")
    print(latency_table(result.latencies, result.labels))
    if result.note:
        print(f"\nnote: {result.note}")
    return 0


def targets_command(args: argparse.Namespace) -> int:
    from pipeline.report import text_table
    from pipeline.targets import available_targets, target_summary

    rows = [target_summary(t) for t in available_targets().values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ["name", "aliases", "device", "tensorrt", "jetpack", "cuda", "compute_capability", "dla_cores", "precision"]
    print(text_table(columns, [[str(row[c]) for c in columns] for row in rows]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.allocator import tune_allocator
    from pipeline.kernels import pin_kernels

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from installed packages, never a hub
    # OpenMP threads that spin while waiting make torch 10-30x slower as soon as another process
    # competes for the cores (CI runners, shared dev boxes); passive waiting costs little when idle.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    tune_allocator()  # before torch loads: page faults cost a cold build 306 of 1,071 CPU seconds
    try:
        pin_kernels()  # before anything imports torch: the same kernel path on AVX2 and AVX-512 machines
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except (KeyboardInterrupt, Interrupted) as error:
        print("interrupted: artifacts already written are complete; rerun to resume from the cache", file=sys.stderr)
        return error.exit_code if isinstance(error, Interrupted) else 130
