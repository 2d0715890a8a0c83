"""Deploy targets: one TOML file per target in pipeline/resources/targets/ (or a user's own file by path), validated on load.

A target says what the device is, which TensorRT/CUDA it ships, how to
quantize and build for it, how much to compress, and which parity gates the
artifacts must pass. An unknown key, a wrong type or an impossible request
(DLA on a device without DLA) is an InputError naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Mapping

from pipeline.errors import InputError
from pipeline.parity import Gate
from pipeline.resources import shipped_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TARGETS_DIR = shipped_dir("targets")


@dataclass(frozen=True)
class Device:
    name: str
    kind: Literal["jetson", "gpu", "cpu"]
    compute_capability: str | None = None  # "8.7"; None for CPU targets
    dla_cores: int = 0
    memory_gb: float | None = None
    architecture: str | None = None  # "Ampere", "Ada", ...: shown in listings


@dataclass(frozen=True)
class Software:
    runtime: Literal["tensorrt", "onnxruntime"]
    tensorrt: str | None = None  # "10.3"
    cuda: str | None = None
    jetpack: str | None = None


@dataclass(frozen=True)
class Quantize:
    """How the INT8 stage calibrates and where it puts Q/DQ."""

    calibration: str = "emoji-default"  # a set in calibration/
    method: Literal["minmax", "entropy", "percentile"] = "percentile"
    percentile: float = 99.999
    # "tensorrt": symmetric S8 activations and weights, per-channel weights;
    # "cpu": the form ONNX Runtime's CPU kernels run fastest.
    form: Literal["tensorrt", "cpu"] = "tensorrt"
    op_types: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
    max_fallback_steps: int = 8
    embedding: Literal["int8", "float"] = "int8"  # the token embedding table: int8 rows with per-row scales, or float


@dataclass(frozen=True)
class Export:
    """How the ONNX export is shaped for the target's parser (pipeline/onnx_compat.py)."""

    # The newest default-domain opset the export may use. None: the one the target's TensorRT parser
    # documents (pipeline/trt_onnx_ops.toml `max_opset`; 17 for TensorRT 8.5), else the exporter's own (18).
    # Below 18 the export is converted, and ops that parser lacks (LayerNormalization before 8.6) decomposed.
    max_opset: int | None = None


@dataclass(frozen=True)
class Batch:
    min: int = 1
    opt: int = 8
    max: int = 32


@dataclass(frozen=True)
class Builder:
    """TensorRT builder settings (ignored by ONNX Runtime targets)."""

    workspace_mb: int = 1024
    optimization_level: int = 3
    batch: Batch = field(default_factory=Batch)
    use_dla: bool = False
    dla_core: int = 0
    hardware_compatibility: Literal["none", "ampere_plus", "same_compute_capability"] = "none"
    version_compatible: bool = False
    # Weakly typed builds (TensorRT 8.x/10.x) may run the layers left unquantized
    # in FP16 when this is true (BuilderFlag.FP16 beside INT8). Strongly typed
    # builds ignore it: there FP16 comes only from an FP16-typed graph.
    fp16_fallback: bool = True
    # DLA layers that cannot run on the DLA run on the GPU (BuilderFlag.GPU_FALLBACK).
    gpu_fallback: bool = True
    # "auto": weak typing on TensorRT 8.x/10.x, strong typing on 11.x (where
    # weak typing was removed); "strong" opts in on 10.x (deprecated weak typing).
    network_typing: Literal["auto", "weak", "strong"] = "auto"


@dataclass(frozen=True)
class Budget:
    """Shares of the source model's parameters and MACs a compressed model may keep (None: no limit on that one)."""

    params: float | None = None
    macs: float | None = None
    # What a user's model is pruned under, in place of the compression table's own (chosen on the built-in model:
    # its fusion left whole, its image ratio spending the MACs the others leave): the caps the fitting scales down
    # from, and whether sensitivity splits them between units. None: the compression table's value.
    prune_image: float | None = None
    prune_text: float | None = None
    prune_fusion: float | None = None
    allocate: bool | None = None
    importance: Literal["magnitude", "taylor"] | None = None


@dataclass(frozen=True)
class Compression:
    """Budget for the structural stages (prune, factorize); all zeros / None skip them."""

    prune_image: float = 0.0  # share of channels removed per unit; 0 leaves the branch alone
    prune_text: float = 0.0
    prune_fusion: float = 0.0
    # How far pruning reaches, and recovery trains: the last N EfficientNet blocks / MiniLM layers
    # (None: the model's own fine-tuned tail). Recovery cost grows with the image reach.
    image_blocks: int | None = None
    text_layers: int | None = None
    # Depth pruning: MiniLM layers kept (the least sensitive go first; None keeps them all). Width pruning
    # cannot remove a layer's fixed per-op cost, which dominates batch-1 latency (pipeline/compression/depth.py).
    text_depth: int | None = None
    importance: Literal["magnitude", "taylor"] = "magnitude"
    importance_samples: int = 64  # the first calib samples (never eval) Taylor importance takes its loss gradient on
    allocate: bool = False  # per-unit ratios from measured sensitivity (same parameter budget per branch)
    # Global budget: prune to at most this fraction of the MACs (the branch ratios are scaled together to fit).
    budget_macs: float | None = None
    # A model whose units are discovered (a user's: the ratios above were measured on the built-in ones) is pruned
    # no further than this budget asks: its ratios scaled by the least factor (at most 1) that fits it (pipeline.compression.prune.fit_user_budget).
    user_budget: Budget | None = None
    factorize_energy: float | None = None  # Linear / 1x1 conv: retained spectral energy; None skips them
    embedding_energy: float | None = None  # the token embedding (45% of the default model's parameters); None leaves it whole
    recovery_epochs: int = 4  # distillation budget after each structural stage (factorize: factorize_epochs where set); ends sooner at a plateau of the calib KL
    # Encoder learning rate while recovering from pruning: a pruned layer has more to relearn than a fine-tuned
    # one (the jetson pruning ratios, before BatchNorm recalibration, recovered in 4 epochs to 81.6% eval accuracy
    # at 1e-4 and 84.8% at 5e-4; BENCHMARKS.md).
    # Factorize recovers at the model's own fine-tuning rate.
    recovery_lr: float = 5e-4
    # Recovery ends at the epoch budget or once the calib KL to the teacher has not improved for this many epochs.
    recovery_patience: int = 3
    # Mixed image/text pairs (two train samples' halves) per train pair in each batch, distilled on the teacher's answers alone.
    recovery_mixed: float = 1.0
    # Weight of the hidden-state term: every trained block's output matched to the teacher's (pipeline/feature_distillation.py).
    recovery_features: float = 0.0
    recovery_seed: int | None = None  # None: the build's --seed
    # The factorize stage's own budget (None: recovery_epochs): a factorized embedding starts close to its teacher.
    factorize_epochs: int | None = None
    # Modules (by name, e.g. "encoder.layers.0") neither stage changes: their outputs are not pruned, their layers not factorized.
    keep: tuple[str, ...] = ()
    # Token tables: keep the rows the train split reads, every other id sharing one row (pipeline/compression/vocabulary.py).
    # "auto": the tables a model's factory starts at random, when the source was trained here; "train": every table; "whole": none.
    vocabulary: Literal["auto", "train", "whole"] = "auto"

    def prunes(self) -> bool:
        return any(r > 0 for r in (self.prune_image, self.prune_text, self.prune_fusion)) or self.text_depth is not None

    def factorizes(self) -> bool:
        return self.factorize_energy is not None or self.embedding_energy is not None


@dataclass(frozen=True)
class Gates:
    export: Gate = field(default_factory=lambda: Gate(min_agreement=1.0, max_abs_error=1e-3, knob="export is expected to be exact; report a bug"))
    prune: Gate = field(default_factory=lambda: Gate(max_drop_pts=1.0, knob="lower compression.prune_* or raise compression.recovery_epochs"))
    factorize: Gate = field(default_factory=lambda: Gate(max_drop_pts=1.0, knob="raise compression.factorize_energy / embedding_energy or compression.factorize_epochs (recovery_epochs where unset)"))
    quantize: Gate = field(default_factory=lambda: Gate(max_drop_pts=1.0, min_agreement=0.97, knob="--calibration-method, a larger calibration set, or quantize.max_fallback_steps"))
    engine: Gate = field(default_factory=lambda: Gate(min_agreement=0.99, knob="inspect the engine's layer precisions; build with fp16 fallback"))


PASSES = ("source", "prune", "factorize", "export", "quantize")
REQUIRED_PASSES = ("source", "export", "quantize")


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    device: Device
    software: Software
    aliases: tuple[str, ...] = ()
    precision: Literal["int8", "fp16", "fp32"] = "int8"
    quantize: Quantize = field(default_factory=Quantize)
    export: Export = field(default_factory=Export)
    builder: Builder = field(default_factory=Builder)
    compression: Compression = field(default_factory=Compression)
    gates: Gates = field(default_factory=Gates)
    # The passes the build runs, in order (pipeline/stages/); leaving one out skips it. source, export and quantize are required.
    passes: tuple[str, ...] = PASSES
    source: str = ""  # the TOML file it came from

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check value against annotation tp; return it converted (lists to tuples, tables to dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except InputError as error:
                errors.append(error)
        raise errors[0] if errors else InputError(f"{where}: unexpected value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise InputError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is tuple:
        (item_type, _) = typing.get_args(tp)
        if not isinstance(value, list):
            raise InputError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
        return _build(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise InputError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r}")  # a bug in this module, not in the file


def _build(cls: type, table: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.name != "source"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise InputError(f"{where}: unknown key '{unknown[0]}' (known keys: {', '.join(sorted(known))})")
    missing = [f.name for f in fields(cls) if f.name in known and f.name not in table
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise InputError(f"{where}: missing required key '{missing[0]}'")
    values = {name: _coerce(value, hints[name], f"{where}.{name}" if where else name) for name, value in table.items()}
    return cls(**values)


def _check_consistency(target: Target, where: str) -> None:
    if target.builder.use_dla and target.device.dla_cores == 0:
        raise InputError(f"{where}: builder.use_dla = true but device '{target.device.name}' has no DLA cores (device.dla_cores = 0)")
    if target.builder.use_dla and target.builder.dla_core >= target.device.dla_cores:
        raise InputError(f"{where}: builder.dla_core = {target.builder.dla_core} but the device has {target.device.dla_cores} DLA core(s)")
    batch = target.builder.batch
    if not 1 <= batch.min <= batch.opt <= batch.max:
        raise InputError(f"{where}: builder.batch must satisfy 1 <= min <= opt <= max (got {batch.min}, {batch.opt}, {batch.max})")
    if target.builder.use_dla and not batch.min == batch.opt == batch.max:
        raise InputError(f"{where}: DLA needs static shapes: builder.batch min, opt and max must be equal")
    if target.software.runtime == "tensorrt" and not target.software.tensorrt:
        raise InputError(f"{where}: software.runtime = 'tensorrt' needs software.tensorrt (the version the device ships)")
    if target.export.max_opset is not None and target.export.max_opset < 1:
        raise InputError(f"{where}: export.max_opset = {target.export.max_opset} must be an ONNX opset (>= 1); leave it out "
                         "for the one the target's TensorRT parser documents")
    if not 0 <= target.builder.optimization_level <= 5:
        raise InputError(f"{where}: builder.optimization_level must be 0..5")
    _check_device_and_tensorrt(target, where)
    unknown = [name for name in target.passes if name not in PASSES]
    if unknown:
        raise InputError(f"{where}: passes: unknown pass '{unknown[0]}' (known, in order: {', '.join(PASSES)})")
    if list(target.passes) != sorted(set(target.passes), key=PASSES.index) or not set(REQUIRED_PASSES) <= set(target.passes):
        raise InputError(f"{where}: passes = {list(target.passes)}: list each pass once, in the order {', '.join(PASSES)}, "
                         f"with {', '.join(REQUIRED_PASSES)} among them")
    comp = target.compression
    for name in ("prune_image", "prune_text", "prune_fusion"):
        ratio = getattr(comp, name)
        if not 0.0 <= ratio < 1.0:
            raise InputError(f"{where}: compression.{name} = {ratio} must be in [0, 1): a ratio of 1 would remove everything")
    for name in ("factorize_energy", "embedding_energy"):
        energy = getattr(comp, name)
        if energy is not None and not 0.0 < energy <= 1.0:
            raise InputError(f"{where}: compression.{name} = {energy} must be in (0, 1]")
    for name in ("image_blocks", "text_layers", "text_depth"):
        reach = getattr(comp, name)
        if reach is not None and reach < 1:
            raise InputError(f"{where}: compression.{name} = {reach} must be >= 1 (leave it out for "
                             + ("every layer)" if name == "text_depth" else "the model's own trained tail)"))
    if comp.budget_macs is not None and not 0.0 < comp.budget_macs < 1.0:
        raise InputError(f"{where}: compression.budget_macs = {comp.budget_macs} must be in (0, 1): a fraction of the reference's MACs")
    for name in ("params", "macs"):
        share = getattr(comp.user_budget, name) if comp.user_budget is not None else None
        if share is not None and not 0.0 < share <= 1.0:
            raise InputError(f"{where}: compression.user_budget.{name} = {share} must be in (0, 1]: a share of the source model's {name}")
    for name in ("prune_image", "prune_text", "prune_fusion"):
        cap = getattr(comp.user_budget, name) if comp.user_budget is not None else None
        if cap is not None and not 0.0 <= cap < 1.0:
            raise InputError(f"{where}: compression.user_budget.{name} = {cap} must be in [0, 1): a pruning ratio")
    if comp.importance_samples < 1:
        raise InputError(f"{where}: compression.importance_samples = {comp.importance_samples} must be >= 1 (calib samples Taylor importance is taken on)")
    if not comp.recovery_lr > 0:
        raise InputError(f"{where}: compression.recovery_lr = {comp.recovery_lr} must be > 0")
    if comp.recovery_epochs < 0:
        raise InputError(f"{where}: compression.recovery_epochs = {comp.recovery_epochs} must be >= 0")
    if comp.factorize_epochs is not None and comp.factorize_epochs < 0:
        raise InputError(f"{where}: compression.factorize_epochs = {comp.factorize_epochs} must be >= 0")
    if comp.recovery_patience < 1:
        raise InputError(f"{where}: compression.recovery_patience = {comp.recovery_patience} must be >= 1")
    if not 0.0 <= comp.recovery_features <= 100.0:
        raise InputError(f"{where}: compression.recovery_features = {comp.recovery_features} must be in [0, 100] (weight of the hidden-state term)")
    if not 0.0 <= comp.recovery_mixed <= 4.0:
        raise InputError(f"{where}: compression.recovery_mixed = {comp.recovery_mixed} must be in [0, 4] (mixed pairs per train pair)")


def version_tuple(text: str) -> tuple[int, ...]:
    """(10, 3, 0, 30) for "10.3.0.30": versions compare as tuples."""
    return tuple(int(part) for part in re.findall(r"\d+", text))


def _check_device_and_tensorrt(target: Target, where: str) -> None:
    """Requests the device or its TensorRT cannot honour (facts: shared/TENSORRT.md)."""
    device, software, builder = target.device, target.software, target.builder
    if device.dla_cores < 0:
        raise InputError(f"{where}: device.dla_cores = {device.dla_cores} must be >= 0")
    if device.compute_capability is not None and not re.fullmatch(r"\d+\.\d+", device.compute_capability):
        raise InputError(f"{where}: device.compute_capability = {device.compute_capability!r} must look like \"8.7\"")
    if software.tensorrt is not None and not re.fullmatch(r"\d+(\.\d+){0,3}", software.tensorrt):
        raise InputError(f"{where}: software.tensorrt = {software.tensorrt!r} must be a version like \"10.3\"")
    if software.runtime == "tensorrt" and device.kind == "cpu":
        raise InputError(f"{where}: software.runtime = 'tensorrt' needs a GPU device, but device.kind = 'cpu'")
    if software.runtime == "tensorrt" and device.compute_capability is None:
        raise InputError(f"{where}: software.runtime = 'tensorrt' needs device.compute_capability (engines are tied to the GPU)")
    if builder.hardware_compatibility == "ampere_plus" and device.compute_capability is not None \
            and version_tuple(device.compute_capability) < (8, 0):
        raise InputError(f"{where}: builder.hardware_compatibility = 'ampere_plus' needs compute capability >= 8.0 "
                         f"(device.compute_capability = {device.compute_capability})")
    if builder.use_dla and target.precision == "fp32":
        raise InputError(f"{where}: builder.use_dla = true needs precision int8 or fp16 (DLA runs only FP16 and INT8)")
    trt = version_tuple(software.tensorrt) if software.tensorrt else None
    if trt is None:
        return
    if builder.network_typing == "strong" and trt[0] < 10:
        raise InputError(f"{where}: builder.network_typing = 'strong' needs TensorRT 10 or later (target ships {software.tensorrt})")
    if (builder.hardware_compatibility != "none" or builder.version_compatible) and trt < (8, 6):
        raise InputError(f"{where}: builder.hardware_compatibility / builder.version_compatible need TensorRT 8.6 or later "
                         f"(target ships {software.tensorrt})")
    if builder.network_typing == "weak" and trt[0] >= 11:
        raise InputError(f"{where}: builder.network_typing = 'weak' but TensorRT {software.tensorrt} removed weak typing (11.x builds are strongly typed)")
    # NVIDIA "Working with DLA" (TensorRT 11.4.1): no DLA in 11.0 through 11.4.0.
    if builder.use_dla and (11,) <= trt < (11, 4, 1):
        raise InputError(f"{where}: builder.use_dla = true but TensorRT {software.tensorrt} has no DLA support (11.0 to 11.4.0)")


def load_target_file(path: Path) -> Target:
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: target file not found")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid TOML: {error}")
    try:
        target = _build(Target, table, "")
    except InputError as error:  # name the file: the key path alone does not say which target
        raise _wrap_errors(path, error)
    target = dataclasses.replace(target, source=str(path))
    _check_consistency(target, str(path))
    return target


def target_from_mapping(table: Mapping[str, Any], where: str) -> Target:
    """A Target from a parsed table (a TOML file's, or the target.json a bundle carries), validated."""
    try:
        target = _build(Target, {key: value for key, value in table.items() if key != "source"}, "")
        _check_consistency(target, where)
    except InputError as error:
        raise _wrap_errors(Path(where), error)
    return dataclasses.replace(target, source=where)


def _wrap_errors(path: Path, error: InputError) -> InputError:
    text = str(error)
    return error if text.startswith(str(path)) else InputError(f"{path}: {text}")


def available_targets(directory: Path = TARGETS_DIR) -> dict[str, Target]:
    """All targets in directory by name; each file is validated."""
    found: dict[str, Target] = {}
    for path in sorted(Path(directory).glob("*.toml")):
        try:
            target = load_target_file(path)
        except InputError as error:
            raise _wrap_errors(path, error)
        if target.name != path.stem:
            raise InputError(f"{path}: name = '{target.name}' must match the file name '{path.stem}'")
        found[target.name] = target
    return found


def resolve_target(name_or_path: str, directory: Path = TARGETS_DIR) -> Target:
    """A target by name, alias, or path to a TOML file."""
    if name_or_path.endswith(".toml"):
        path = Path(name_or_path)
        try:
            return load_target_file(path)
        except InputError as error:
            raise _wrap_errors(path, error)
    targets = available_targets(directory)
    if name_or_path in targets:
        return targets[name_or_path]
    for target in targets.values():
        if name_or_path in target.aliases:
            return target
    names = sorted(list(targets) + [a for t in targets.values() for a in t.aliases])
    raise InputError(f"unknown target '{name_or_path}'; known targets: {', '.join(names)} (files in {directory})")


def resolve_targets(spec: str, directory: Path = TARGETS_DIR) -> list[Target]:
    """--target as a list: one name, alias or TOML file; several, comma-separated (a fleet); or `all` (every shipped target)."""
    if spec.strip() == "all":
        return list(available_targets(directory).values())
    names = [part.strip() for part in spec.split(",")]
    if any(not name for name in names):
        raise InputError(f"--target {spec!r}: an empty name in the list; give names, aliases or TOML files separated by commas")
    targets: list[Target] = []
    for name in names:
        target = resolve_target(name, directory)
        twin = next((t for t in targets if t.name == target.name), None)
        if twin is not None:
            raise InputError(f"--target {spec!r}: '{name}' names target '{target.name}' a second time; each target builds once into out/<target>/")
        targets.append(target)
    return targets


def target_summary(target: Target) -> dict[str, Any]:
    """One row of `python -m pipeline targets`: what the device is and what it ships."""
    return {
        "name": target.name,
        "aliases": ", ".join(target.aliases),
        "device": target.device.name,
        "compute_capability": target.device.compute_capability or "-",
        "dla_cores": target.device.dla_cores,
        "runtime": target.software.runtime,
        "tensorrt": target.software.tensorrt or "-",
        "jetpack": target.software.jetpack or "-",
        "cuda": target.software.cuda or "-",
        "precision": target.precision,
        "uses_dla": target.builder.use_dla,
    }


def with_overrides(target: Target, **overrides: Any) -> Target:
    """A copy of target with dotted-path overrides applied, e.g. {"quantize.method": "minmax"}."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        target = _replace_path(target, dotted.split("."), value)
    _check_consistency(target, f"{target.source} (with command-line overrides)")
    return target


def _replace_path(obj: Any, parts: list[str], value: Any) -> Any:
    head, rest = parts[0], parts[1:]
    current = getattr(obj, head)
    return dataclasses.replace(obj, **{head: _replace_path(current, rest, value) if rest else value})
