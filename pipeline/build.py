"""The conductor: run the declared passes through the cache, gate every artifact, write the manifest.

The whole pipeline reads top to bottom in build(): the passes the target
lists (source -> prune -> factorize -> export -> quantize by default), each
declared by its module in pipeline/stages/ (PASSES), then the deploy step (a TensorRT engine, or a
device bundle where TensorRT is absent). This module is the only one that
knows about caching, parity gates and the manifest; a pass only says what it
is (pipeline/stages/base.py).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import platform
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline import __version__, lint
from pipeline.allocator import allocator_facts
from pipeline.artifacts import Artifact
from pipeline.bundle import Golden, write_bundle
from pipeline.data import load_dataset
from pipeline.data.base import Dataset
from pipeline.data.calibration import CalibrationSet, load_calibration_set
from pipeline.data.encode import Encoded
from pipeline.data.splits import Splits
from pipeline.distributed import init_from_env
from pipeline.errors import EngineRequired, GateFailed, InputError, Interrupted
from pipeline.fingerprint import code_fingerprint
from pipeline.footprint import Footprint, onnx_footprint, torch_footprint
from pipeline.kernels import kernel_facts, kernel_signature
from pipeline.models.checkpoint import load_torch_artifact
from pipeline.models.onnx_source import onnx_config_json
from pipeline.models.source import model_input_spec
from pipeline.parity import Gate, ParityRow, check_gate, parity_row, unresolved_budget
from pipeline.progress import track
from pipeline.report import report_markdown
from pipeline.report_html import report_html
from pipeline.runners import OrtRunner, Runner, run_batches
from pipeline.stages import export, factorize, prune, quantize, source
from pipeline.stages.base import Context, Measure, Pass
from pipeline.store import Store, atomic_write_json, atomic_write_text, cache_key, canonical_json, sha256_bytes, sha256_file
from pipeline.targets import Compression, Target
from pipeline.training import PrefixCache, TrainSettings, predict_logits
from pipeline.trt.engine import (LocalTensorRT, build_engine, engine_metadata, engine_settings, local_tensorrt, target_mismatches,
                                 tensorrt_status)
from pipeline.trt.runner import TrtRunner
from pipeline.compression.prune import set_trainable_split, widen_reach

MANIFEST_SCHEMA = 1
GOLDEN_SAMPLES = 128
SENSITIVITY_SAMPLES = 64
# The stage modules by pass name; each declares its pass. A target lists the ones it runs, in this order (Target.passes).
PASSES = {"source": source, "prune": prune, "factorize": factorize, "export": export, "quantize": quantize}
# Which artifacts' bytes may differ between CPU kinds (issue 11's AVX-512 Xeon and AVX2 EPYC, then an AVX-512 EPYC).
# Pinned (the default), the AMD machines with and without AVX-512 built every stage alike; the Intel one did not (MKL).
CPU_DEPENDENT = {"measured": "pinned: every stage byte-identical on an AVX2 AMD EPYC and an AVX-512 AMD EPYC (sha256 06bff00a... to fc06b611...); "
                             "unpinned, the AVX-512 EPYC's bytes differed from the source stage on (torch's AVX-512 kernels), while the AVX2 "
                             "EPYC's were identical pinned and unpinned",
                 "stages": ["source", "prune", "factorize", "export", "quantize"],
                 "pinned_kernels": "ATen and oneDNN on their AVX2 paths on every CPU; compared on an Intel AVX-512 Xeon, the pinned bytes still "
                                   "differ from the AMD EPYCs' from the source stage on (MKL follows MKL_ENABLE_INSTRUCTIONS on Intel and not on AMD: "
                                   "the two vendors run different MKL code; MKL_CBWR=AVX2 does not unify them either, benchmarks/kernel_paths.py); "
                                   "ONNX Runtime's own int8 kernels (the cpu form) are not pinned"}
VERSIONED_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxsim", "onnxscript", "numpy", "transformers", "torch-pruning", "tensorrt")


@dataclass(frozen=True)
class BuildConfig:
    target: Target
    out: Path
    model: str = "fused-effnet-minilm"  # a registry name or package.module:factory
    data: str = "emoji"  # a registered data set or a folder in the samples.jsonl format
    weights: Path | None = None  # load these instead of training
    tokenizer: Path | None = None  # a user model's tokenizer folder, replacing the one its input_spec names (--tokenizer)
    fusion: str | None = None  # override the registry model's fusion
    train: TrainSettings = field(default_factory=TrainSettings)
    simplifier: str = "onnxsim"
    eval_batch: int = 32
    require_engine: bool = False
    allow_mismatch: bool = False  # build the engine on a machine whose GPU or TensorRT is not the target's (for this machine)
    measure_latency: bool = False  # ONNX Runtime CPU latency of every stage (the ledger's b1/b16 columns; --latency)
    wait: bool = True  # another build holds out's lock: wait for it (saying so), or with --no-wait fail at once (exit 2)
    cache: Path | None = None  # the stage cache, when not inside out (--cache; a fleet's targets share one)
    onnx: Path | None = None  # the user's FP32 ONNX as the source model instead of `model` (--onnx): prune and factorize skipped


@dataclass(frozen=True)
class StageResult:
    name: str
    artifact: Artifact
    cached: bool
    wall_s: float
    settings: dict
    parity: ParityRow | None = None
    gate: Gate | None = None
    facts: dict = field(default_factory=dict)
    footprint: Footprint | None = None
    # the footprint came from the store, measured by the earlier build that made the artifact:
    # its latency is not side by side with the stages measured in this build
    footprint_reused: bool = False
    resolution: str | None = None  # set when the eval set is too small to resolve the gate's accuracy budget
    code: str | None = None  # fingerprint of the pass's code (part of its cache key)

    def to_json(self, root: Path) -> dict[str, Any]:
        return {
            "name": self.name,
            "artifact": self.artifact.to_json(relative_to=root),
            "size_bytes": size_of(self.artifact.path),
            "cached": self.cached,
            "wall_s": round(self.wall_s, 3),
            "settings": self.settings,
            "code": self.code,
            "parity": self.parity.to_json() if self.parity else None,
            "gate": dataclasses.asdict(self.gate) if self.gate else None,
            "facts": self.facts,
            "footprint": self.footprint.to_json() if self.footprint else None,
            "footprint_reused": self.footprint_reused,
            "resolution": self.resolution,
        }


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tool_versions(kernels: dict[str, Any]) -> dict[str, str]:
    """The versions (and the kernel path) artifacts depend on: part of every stage's cache key."""
    versions = {"edgepipe": __version__, "python": platform.python_version(), "kernels": kernel_signature(kernels)}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


def config_json(config: Any) -> Any:
    """A pass's frozen config as the cache key and the manifest see it (paths become strings when written)."""
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config


def prefix_waypoints(compression: Compression) -> tuple[Callable[[Any], None], ...]:
    """Where the compression stages' recoveries split a model (their reach), for the prefix cache; none without them."""
    if not (compression.prunes() or compression.factorizes()):
        return ()
    return (functools.partial(widen_reach, compression=compression),)


class Conductor:
    """Runs passes through the store's cache, measures and gates their artifacts, and keeps the ledger."""

    def __init__(self, config: BuildConfig, store: Store, versions: dict[str, str], splits: Splits, progress: Callable[[str], None]):
        self.config = config
        self.store = store
        self.versions = versions
        self.splits = splits
        self.say = progress
        self.results: list[StageResult] = []
        self.logits: dict[str, np.ndarray] = {}
        self.artifacts: dict[str, Artifact] = {}  # made so far, by pass name, in order
        self.skipped: dict[str, str] = {}  # pass name -> why it did not apply
        # frozen-prefix outputs shared by this build's trainings and torch outputs; the source's, computed deeper, keep theirs
        # at the compression's reach on the way (what prune and factorize recover at)
        self.prefix_cache = PrefixCache(waypoints=prefix_waypoints(config.target.compression))
        self.reused_footprints: set[str] = set()  # artifacts whose cost columns an earlier build measured

    # ---------------------------------------------------------------- running a pass

    def run(self, declared: Pass) -> Artifact | None:
        """Run (or fetch from the cache) one pass, measure its artifact, gate it against the source."""
        if declared.skip:
            self.say(f"[{declared.name}] skipped: {declared.skip}")
            self.skipped[declared.name] = declared.skip
            return None
        settings, code = config_json(declared.config), code_fingerprint(declared.code)
        artifact, cached, wall = self.run_stage(declared.name, settings, declared.input_sha, declared.run, code)
        self.artifacts[declared.name] = artifact
        logits = self.measure(artifact, "eval", declared.measure)
        previous = self.results[-1].footprint if self.results else None
        gate = getattr(self.config.target.gates, declared.gate) if declared.gate else None
        self.record(declared.name, artifact, cached, wall, settings, logits, gate, dict(artifact.meta),
                    self.footprint(artifact, counted_from=previous), code)
        return artifact

    def run_stage(self, name: str, settings: Any, input_sha: str, produce: Callable[[Path], Artifact], code: str) -> tuple[Artifact, bool, float]:
        """The one place a cache key is made: the pass's config, its input, the tool versions and its code."""
        key = cache_key(name, settings, input_sha, {**self.versions, "code": code})
        start = time.perf_counter()
        cached = self.store.cached(name, key)
        if cached is not None:
            self.say(f"[{name}] cached ({self.store.relative(cached.path)})")
            return cached, True, time.perf_counter() - start
        self.say(f"[{name}] running")
        artifact = self.store.commit(name, key, produce)
        return artifact, False, time.perf_counter() - start

    # ---------------------------------------------------------------- measuring

    def measure(self, artifact: Artifact, split: str, how: Measure) -> np.ndarray:
        """Logits of an artifact on a split, cached by artifact content, split content and how it is run."""
        if how.runner == "torch":
            return self.torch_outputs(artifact, split, how)
        config = dict(artifact.meta.get("ort_session_config") or {})
        return self.outputs(artifact, lambda: OrtRunner(artifact.path, session_config=config), split,
                            {"ort_session_config": config} if config else {})

    def outputs(self, artifact: Artifact, runner: Callable[[], Runner], split: str = "eval", how: dict | None = None) -> np.ndarray:
        def compute(data: Encoded) -> np.ndarray:
            batches = track(data.batches(self.config.eval_batch), total=-(-len(data) // self.config.eval_batch),
                            desc=f"measuring {artifact.kind} on {split}", unit="batch", leave=False, samples_per_step=self.config.eval_batch)
            return run_batches(runner(), batches)

        return self._stored_logits(artifact, split, how or {}, compute)

    def torch_outputs(self, artifact: Artifact, split: str, how: Measure) -> np.ndarray:
        """Logits of a torch artifact, through the build's prefix cache (shared with its trainings).

        how.reach: the compression stages' reach, for a model they made: loaded,
        it splits where their recoveries did, so it reuses their prefix outputs.
        """

        batch = self.config.train.batch_size  # the trainings' batch size, so that their prefix outputs are reused

        def compute(data: Encoded) -> np.ndarray:
            model = load_torch_artifact(artifact.path)
            if how.reach is not None:
                set_trainable_split(model, text_layers=how.reach.text_layers, image_blocks=how.reach.image_blocks)
            return predict_logits(model, data, batch, self.prefix_cache, desc=f"  measuring torch on {split}")

        return self._stored_logits(artifact, split, {"batch": batch, "frozen_prefix": "cached"}, compute)

    def _stored_logits(self, artifact: Artifact, split: str, how: dict, compute: Callable[[Encoded], np.ndarray]) -> np.ndarray:
        key = sha256_bytes(f"{artifact.sha256}|{self.splits.fingerprint(split)}|{artifact.kind}|{canonical_json(how)}".encode())
        return self.store.stored_array(key, lambda: compute(self.splits.get(split)))

    def footprint(self, artifact: Artifact, counted_from: Footprint | None = None) -> Footprint:
        """Params, MACs, ONNX size and CPU latency of an artifact (cached by its content)."""
        spec, measure = self.splits.spec, self.config.measure_latency
        key = sha256_bytes(f"footprint|{artifact.sha256}|{canonical_json(spec.to_json())}|{measure}|{self.config.simplifier}".encode())

        def compute() -> dict:
            self.say(f"  measuring the cost of {artifact.kind} artifact" + (" (ONNX Runtime CPU latency)" if measure else ""))
            if artifact.kind == "torch":
                return torch_footprint(artifact.path, spec, self.config.simplifier, measure).to_json()
            return onnx_footprint(artifact.path, spec, counted_from, measure).to_json()

        stored, reused = self.store.stored_json(key, compute)
        if reused:
            self.reused_footprints.add(artifact.sha256)
        return Footprint.from_json(stored)

    def labels(self) -> np.ndarray:
        return np.asarray([s.label for s in self.splits.dataset.split("eval")], dtype=np.int64)

    # ---------------------------------------------------------------- the ledger and the gates

    def record(self, name: str, artifact: Artifact, cached: bool, wall_s: float, settings: Any, logits: np.ndarray | None, gate: Gate | None,
               facts: dict | None = None, footprint: Footprint | None = None, code: str | None = None) -> None:
        row = None
        if logits is not None:
            reference = self.logits.get("source", logits)
            previous = next(reversed(self.logits.values()), logits)
            row = parity_row(name, logits, reference, previous, self.labels())
            self.logits[name] = logits
        resolution = unresolved_budget(gate, row) if row is not None and gate is not None else None
        if resolution:
            self.say(f"  note: {resolution}")
        self.results.append(StageResult(name, artifact, cached, wall_s, settings, row, gate, facts or {}, footprint,
                                        footprint_reused=footprint is not None and artifact.sha256 in self.reused_footprints,
                                        resolution=resolution, code=code))
        if row is not None and gate is not None:
            violations = check_gate(gate, row)
            if violations:
                raise GateFailed(violations[0].message())

    def context(self, dataset: Dataset, calibration: CalibrationSet) -> Context:
        config = self.config
        return Context(config.target, config.model, config.fusion, config.weights, config.train, config.simplifier, dataset, self.splits,
                       self.splits.spec, calibration, self.prefix_cache, self.measure, SENSITIVITY_SAMPLES, onnx=config.onnx)


# ------------------------------------------------------------------ deploy: the engine, or the device bundle


def deploy(c: Conductor, int8: Artifact) -> dict[str, Any]:
    """Build the TensorRT engine where possible, else write the device bundle. Returns the manifest's engine entry."""
    target = c.config.target
    if target.software.runtime != "tensorrt":
        return {"status": "not-applicable", "reason": f"target '{target.name}' deploys the INT8 ONNX with ONNX Runtime"}
    report = lint.lint_onnx(int8.path, target)
    report.raise_on_errors()
    available, reason = tensorrt_status()
    where, reason = engine_or_bundle(target, available, reason, local_tensorrt() if available else None, c.config.allow_mismatch)
    if where == "engine":
        return engine_stage(c, int8, report.to_json(), reason)
    if c.config.require_engine:
        raise EngineRequired(f"--require-engine: no TensorRT engine can be built here: {reason}")
    bundle = bundle_stage(c, int8, report.to_json())
    return {"status": "deferred", "reason": reason, "bundle": str(bundle.relative_to(c.store.root)),
            "lint": {"errors": len(report.errors), "warnings": len(report.warnings)}}


def engine_or_bundle(target: Target, available: bool, status: str, local: LocalTensorRT | None, allow_mismatch: bool) -> tuple[str, str]:
    """Build the engine here only where this machine is the target (or --allow-mismatch says build for this one anyway).

    A plan is tied to the TensorRT version and the GPU it was built on: one built on an x86 GPU host for
    `--target jetson` would not load on the Jetson, so such a host writes the device bundle instead.
    """
    if not available or local is None:
        return "bundle", status
    mismatches = target_mismatches(target, local)
    if not mismatches:
        return "engine", status
    if allow_mismatch:
        return "engine", f"{status}; --allow-mismatch: built for this machine, not the target: " + "; ".join(mismatches)
    return "bundle", "this machine is not the target (" + "; ".join(mismatches) + "): the bundle builds the engine on the device; " \
                     "--allow-mismatch builds one for this machine instead"


def golden_indices(n: int, limit: int = GOLDEN_SAMPLES) -> np.ndarray:
    """A fixed, spread-out subset of the eval split (every k-th sample)."""
    return np.unique(np.linspace(0, n - 1, num=min(n, limit)).round().astype(np.int64))


def bundle_stage(c: Conductor, int8: Artifact, lint_json: dict) -> Path:
    eval_data = c.splits.get("eval")
    index = golden_indices(len(eval_data))
    subset = eval_data.subset(index)
    golden = Golden(ids=np.asarray(subset.ids), inputs=dict(subset.inputs), labels=subset.labels,
                    reference_logits=c.logits["source"][index], int8_logits=c.logits["quantize"][index])
    c.say("[bundle] writing device bundle")
    return write_bundle(c.store.root, int8.path, c.config.target, golden, c.config.target.gates.engine, lint_json,
                        ort_session_config=dict(int8.meta.get("ort_session_config") or {}))


def engine_stage(c: Conductor, int8: Artifact, lint_json: dict, status: str) -> dict[str, Any]:
    target = c.config.target
    local = local_tensorrt()
    settings = {**engine_settings(target), "tensorrt": local.tensorrt_version, "gpu": local.device_name, "cc": local.compute_capability}

    def produce(workdir: Path) -> Artifact:
        result = build_engine(int8.path, target, workdir, c.store.root / "timing-cache")
        return Artifact("engine", result.plan_path, sha256_file(result.plan_path), engine_metadata(result, target, int8.path))

    artifact, cached, wall = c.run_stage("engine", settings, int8.sha256, produce, code_fingerprint("pipeline.trt.engine"))
    logits = c.outputs(artifact, lambda: TrtRunner(artifact.path))
    # The engine must agree with the INT8 ONNX it was built from.
    row = parity_row("engine", logits, c.logits["quantize"], c.logits["quantize"], c.labels())
    c.record("engine", artifact, cached, wall, settings, logits, gate=None, facts={**artifact.meta, "lint": lint_json})
    violations = check_gate(target.gates.engine, row)
    if violations:
        raise GateFailed(violations[0].message().replace("vs reference", "vs INT8 ONNX"))
    return {"status": "built", "reason": status, "plan": c.store.relative(artifact.path)}


# ------------------------------------------------------------------ the pipeline


def build(config: BuildConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the pipeline; return the manifest (also written to out/manifest.json).

    The manifest is written however the build ends, and its status says how:
    "ok", "failed" (a gate), "interrupted" (Ctrl-C or SIGTERM) or "error"
    (any other exception, named); the exception then propagates. Bad input
    (InputError) found before any stage made its artifact is the exception:
    nothing is written, so the out directory keeps the last build's manifest.
    """
    world = init_from_env()  # under torchrun: every process builds, rank 0 alone writes (Store)
    store = Store(config.out, config.cache, world)
    with store.lock(wait=config.wait, on_wait=progress):
        started = time.perf_counter()  # after any wait for another build: wall_s is this build's own
        machine = {**kernel_facts(), "allocator": allocator_facts(), "processes": world.size}  # the allocator changes speed, not bytes
        # N data-parallel processes train other bytes than one (DistributedSampler's order): keyed apart; one process's keys as ever
        versions = {**tool_versions(machine), **({"processes": str(world.size)} if world.active else {})}
        dataset = load_dataset(config.data)
        calibration = load_calibration_set(config.target.quantize.calibration, dataset)
        spec = model_input_spec(config.model, dataset, config.fusion, config.weights, config.tokenizer, onnx=config.onnx, say=progress)
        conductor = Conductor(config, store, versions, Splits(dataset, spec), progress)
        context = conductor.context(dataset, calibration)
        engine: dict[str, Any] = {"status": "not-run"}

        def finish(ending: Ending) -> dict[str, Any]:
            manifest = make_manifest(config, versions, machine, dataset, calibration, conductor, engine, ending, time.perf_counter() - started)
            if world.is_writer:
                atomic_write_json(store.root / "manifest.json", manifest)
                atomic_write_text(store.root / "report.md", report_markdown(manifest))
                atomic_write_text(store.root / "report.html", report_html(manifest))
            return manifest

        try:
            for name in config.target.passes:
                conductor.run(PASSES[name].declare(context, conductor.artifacts))
            if world.is_writer:  # the engine or the bundle: rank 0's alone, the others are done
                conductor.store = store.solo()
                engine = deploy(conductor, conductor.artifacts["quantize"])
            else:
                engine = {"status": "not-run", "reason": f"rank {world.rank} of {world.size}: rank 0 deploys"}
        except BaseException as error:
            if isinstance(error, InputError) and not conductor.results:
                raise  # bad input before anything was built: the last build's manifest and report stay as they were
            error.manifest = finish(Ending.of(error))  # the CLI prints how the build ended
            raise
        return finish(Ending("ok"))


@dataclass(frozen=True)
class Ending:
    """How a build ended, as the manifest, report.md and --json say it."""

    status: str  # "ok", "failed", "interrupted" or "error"
    failure: str | None = None  # the gate's message, or what interrupted the build
    error: dict[str, str] | None = None  # {"type", "message"} of the exception, for "error"

    @staticmethod
    def of(error: BaseException) -> "Ending":
        if isinstance(error, GateFailed):
            return Ending("failed", str(error))
        if isinstance(error, Interrupted):
            return Ending("interrupted", f"interrupted by {error.signal_name}")
        if isinstance(error, KeyboardInterrupt):
            return Ending("interrupted", f"interrupted by {signal.Signals.SIGINT.name}")
        return Ending("error", f"{type(error).__name__}: {error}", {"type": type(error).__name__, "message": str(error)})


def compression_summary(c: Conductor) -> dict[str, Any]:
    """Which structural passes ran, and why one did not where the model (not the target) decided it."""
    asked = {"prune": c.config.target.compression.prunes(), "factorize": c.config.target.compression.factorizes()}
    unsupported = next((why for name, why in c.skipped.items() if name in asked and asked[name]), None)
    return {"prune": "prune" in c.artifacts, "factorize": "factorize" in c.artifacts, "skipped": unsupported}


def make_manifest(config: BuildConfig, versions: dict, machine: dict, dataset: Dataset, calibration: CalibrationSet, c: Conductor,
                  engine: dict, ending: Ending, wall_s: float) -> dict[str, Any]:
    root = c.store.root
    return {
        "schema": MANIFEST_SCHEMA,
        "status": ending.status,
        "failure": ending.failure,
        "error": ending.error,
        "versions": versions,
        "machine": {**machine, "cpu_dependent": CPU_DEPENDENT},
        "target": config.target.to_json(),
        "config": {
            "model": str(config.onnx) if config.onnx else config.model,  # an --onnx build's model is the file (config.onnx)
            "data": config.data, "weights": str(config.weights) if config.weights else None,
            "tokenizer": str(config.tokenizer) if config.tokenizer else None,
            "fusion": config.fusion, "train": dataclasses.asdict(config.train), "simplifier": config.simplifier,
            "eval_batch": config.eval_batch, "require_engine": config.require_engine, "allow_mismatch": config.allow_mismatch,
            "measure_latency": config.measure_latency,
            "onnx": onnx_config_json(config.onnx) if config.onnx else None,
        },
        "data": {
            "dataset": dataset.name, "fingerprint": dataset.fingerprint, "classes": list(dataset.classes),
            "splits": {name: len(samples) for name, samples in dataset.splits.items()},
            "calibration": {"name": calibration.name, "sha256": calibration.sha256, "size": len(calibration.ids), "frozen": calibration.frozen},
        },
        "compression": compression_summary(c),
        "skipped": dict(c.skipped),
        "cache": c.store.relative(c.store.cache_root),
        "stages": [result.to_json(root) for result in c.results],
        "engine": engine,
        "wall_s": round(wall_s, 2),
    }
