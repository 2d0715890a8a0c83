"""Engine stage: a TensorRT plan built from the INT8 (Q/DQ) ONNX for one target.

TensorRT and a CUDA GPU exist only on the devices and GPU hosts, so this module
imports `tensorrt` inside the functions that use it; everywhere else the build
writes a device bundle instead (pipeline.bundle) and `tensorrt_status()` says
plainly what is missing.

Precision by TensorRT major version (facts: shared/TENSORRT.md):
- 8.x/10.x, weakly typed: a Q/DQ network still needs BuilderFlag.INT8
  (TensorRT#4021); BuilderFlag.FP16 lets the unquantized layers run in half.
  8.x also needs the EXPLICIT_BATCH network flag.
- 11.x, strongly typed (the only mode): no precision flags exist; INT8 comes
  from the Q/DQ nodes, FP16 from an FP16-typed graph.
The names TensorRT 11 removed live only in the `_legacy_*` functions, called
only when `uses_weak_typing(...)` is true; tests/test_tensorrt_api.py checks
that statically against tensorrt-stubs 10.13 and the 11.x removal list.

The plan stays plain bytes (trtexec and Triton load it as is); everything we
know about it goes to a sidecar JSON next to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import json
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import onnx

from pipeline.errors import EngineRequired, InputError, PipelineError
from pipeline.store import atomic_write_bytes, atomic_write_json, sha256_bytes
from pipeline.targets import Target, version_tuple

PLAN_NAME = "model.plan"
SIDECAR_SUFFIX = ".json"  # model.plan -> model.plan.json

# Layers whose precision says whether the INT8 request was honoured; the rest
# (shuffles, reformats, casts, pooling) legitimately stay in float. Decided from
# the inspector's "ParameterType" (the network layer type, as TREx reads it:
# "Convolution", "Reformat", "Shuffle", "Pooling", ...), never from layer names:
# TensorRT names a reformat after the layer it feeds ("Reformatting CopyNode for
# Input Tensor 0 to Conv_0").
_COMPUTE_PARAMETER_TYPES = frozenset({"convolution", "deconvolution", "matrixmultiply", "fullyconnected", "gemm"})
# Without a ParameterType (Myelin/ForeignNode layers, other versions) only these
# kernel families ("LayerType") count as compute; "Reformat", "Shuffle", "NoOp" never.
_COMPUTE_LAYER_TYPES = ("convolution", "gemm", "matrixmultiply", "fullyconnected")
_NON_COMPUTE_LAYER_TYPES = ("reformat", "shuffle", "noop", "padding", "pooling", "slice", "cast", "copy")


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class LayerInfo:
    """One layer of the built engine as the engine inspector reports it."""

    name: str
    type: str
    precision: str  # int8, fp16, fp32, bf16, fp8, int32, int64, bool or unknown
    device: str  # "GPU" or "DLA"


@dataclass(frozen=True)
class LocalTensorRT:
    """What this machine has: TensorRT version and the GPU TensorRT would build for."""

    tensorrt_version: str
    device_name: str
    compute_capability: str


@dataclass(frozen=True)
class EngineResult:
    plan_path: Path
    metadata_path: Path
    plan_sha256: str
    tensorrt_version: str
    device_name: str
    compute_capability: str
    typing: str  # "weak" or "strong"
    build_seconds: float
    layers: tuple[LayerInfo, ...]
    gpu_fallback_layers: tuple[str, ...]  # network layers DLA could not run (DLA targets)
    float_compute_layers: tuple[str, ...]  # conv/matmul layers the engine runs in float
    timing_cache_path: Path | None
    notes: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    # Things the report would otherwise hide: a rejected or missing timing cache,
    # layer precisions the inspector did not tell. Also in the sidecar ("warnings").
    warnings: tuple[str, ...] = ()


# ------------------------------------------------------------ availability


def tensorrt_status() -> tuple[bool, str]:
    """(True, summary) when TensorRT and a CUDA GPU are usable here, else (False, what is missing)."""
    trt, reason = _import_tensorrt()
    if trt is None:
        return False, reason
    gpu = local_gpu()
    if gpu is None:
        return False, (f"TensorRT {trt.__version__} is installed but no CUDA GPU is visible "
                       "(no NVIDIA driver library libcuda, or it reports no device)")
    name, capability = gpu
    return True, f"TensorRT {trt.__version__} with {name} (compute capability {capability})"


def _import_tensorrt() -> tuple[Any, str]:
    try:
        import tensorrt as trt
    except ImportError as error:
        return None, (f"the 'tensorrt' Python module is not installed ({error}); JetPack ships it on "
                      "Jetson, and GPU hosts install it from NVIDIA's index (pip install 'edgepipe[tensorrt]')")
    # tensorrt-stubs installs a bare tensorrt/ folder of .pyi files, which Python
    # imports as an empty namespace package: that is not TensorRT.
    if not hasattr(trt, "Builder") or not hasattr(trt, "__version__"):
        where = ", ".join(getattr(trt, "__path__", [])) or "?"
        return None, (f"the 'tensorrt' module found ({where}) is not TensorRT's runtime "
                      "(only type stubs are installed)")
    return trt, ""


def local_gpu() -> tuple[str, str] | None:
    """(device name, "major.minor") of CUDA device 0, or None when there is none.

    Asks the CUDA driver directly (libcuda, present wherever an NVIDIA driver
    is, Jetson included), so a CPU-only torch does not hide the GPU; falls
    back to torch.cuda where the driver library cannot be loaded by name.
    """
    found = _gpu_from_driver()
    return found if found is not None else _gpu_from_torch()


def _gpu_from_driver() -> tuple[str, str] | None:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device = ctypes.c_int()
    count = ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return None
    if cuda.cuDeviceGet(ctypes.byref(device), 0) != 0:
        return None
    name = ctypes.create_string_buffer(256)
    major, minor = ctypes.c_int(), ctypes.c_int()
    cuda.cuDeviceGetName(name, 256, device)
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76 (cuda.h)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)
    return name.value.decode(errors="replace"), f"{major.value}.{minor.value}"


def _gpu_from_torch() -> tuple[str, str] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}"


def local_tensorrt() -> LocalTensorRT:
    """This machine's TensorRT and GPU; EngineRequired (exit 4) naming what is missing."""
    trt, reason = _import_tensorrt()
    if trt is None:
        raise EngineRequired(f"cannot build a TensorRT engine here: {reason}")
    gpu = local_gpu()
    if gpu is None:
        raise EngineRequired(f"cannot build a TensorRT engine here: TensorRT {trt.__version__} is installed but no CUDA GPU is visible")
    return LocalTensorRT(tensorrt_version=str(trt.__version__), device_name=gpu[0], compute_capability=gpu[1])


# ------------------------------------------------- local vs target versions


def tensorrt_major(version: str) -> int:
    return version_tuple(version)[0]


def version_matches(local: str, wanted: str) -> bool:
    """True when local (e.g. "10.3.0.30") has every component wanted names (e.g. "10.3")."""
    wanted_parts = version_tuple(wanted)
    return version_tuple(local)[: len(wanted_parts)] == wanted_parts


def target_mismatches(target: Target, local: LocalTensorRT) -> list[str]:
    """Plain sentences for each way this machine differs from what the target describes."""
    problems: list[str] = []
    wanted_trt = target.software.tensorrt
    if wanted_trt and not version_matches(local.tensorrt_version, wanted_trt):
        shipped = f" (JetPack {target.software.jetpack} ships it)" if target.software.jetpack else ""
        problems.append(
            f"TensorRT here is {local.tensorrt_version} but target '{target.name}' expects {wanted_trt}{shipped}; "
            f"a plan built here loads only with TensorRT {local.tensorrt_version}"
            + (" and the build uses the other major version's API path" if tensorrt_major(local.tensorrt_version) != tensorrt_major(wanted_trt) else ""))
    wanted_cc = target.device.compute_capability
    if wanted_cc and local.compute_capability != wanted_cc:
        problems.append(
            f"the GPU here is {local.device_name} (compute capability {local.compute_capability}) but target "
            f"'{target.name}' is {target.device.name} (compute capability {wanted_cc}); a plan is tied to the "
            "GPU it was built on unless built hardware-compatible")
    return problems


def uses_weak_typing(target: Target, major: int) -> bool:
    """Weak typing (precision flags) on 8.x/10.x unless the target opts into strong typing; never on 11+."""
    if major >= 11:
        return False
    return target.builder.network_typing != "strong"


# ------------------------------------------------------------- the build


def engine_settings(target: Target) -> dict[str, Any]:
    """Everything in the target that changes the plan (for the stage cache key; add the TensorRT version and GPU)."""
    return {"precision": target.precision, "builder": dataclasses.asdict(target.builder),
            "device": {"compute_capability": target.device.compute_capability, "dla_cores": target.device.dla_cores}}


def build_engine(onnx_path: Path, target: Target, workdir: Path, timing_cache_dir: Path | None,
                 *, plan_name: str = PLAN_NAME) -> EngineResult:
    """Build workdir/<plan_name> (+ <plan_name>.json sidecar) from the Q/DQ ONNX for target.

    Raises EngineRequired (exit 4) when TensorRT or a GPU is missing,
    InputError when the parser rejects the model (naming the nodes) or the
    device lacks what the target asks for, PipelineError when the build fails.
    """
    onnx_path = Path(onnx_path)
    local = local_tensorrt()
    import tensorrt as trt

    trt_log = TensorRTLog.of(trt)
    with trt_log.capture() as captured:
        return _build(trt, trt_log.logger, captured, local, onnx_path, target, workdir, timing_cache_dir, plan_name)


def _build(trt: Any, logger: Any, captured: "LogCapture", local: LocalTensorRT, onnx_path: Path, target: Target,
           workdir: Path, timing_cache_dir: Path | None, plan_name: str) -> EngineResult:
    major = tensorrt_major(local.tensorrt_version)
    weak = uses_weak_typing(target, major)
    warnings: list[str] = []
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, target, major))
    _parse_onnx(trt, network, logger, onnx_path, captured)
    config = builder.create_builder_config()
    notes = _configure(trt, builder, network, config, target, major)
    if uses_weak_typing(target, major):
        _legacy_set_precision_flags(trt, config, target)
    gpu_fallback_layers = _dla_fallback_layers(config, network) if target.builder.use_dla else ()
    cache_path = _timing_cache_path(timing_cache_dir, target, local)
    warnings += _load_timing_cache(config, cache_path)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - started
    if serialized is None:
        raise PipelineError(f"TensorRT could not build an engine for '{target.name}' from {onnx_path}:\n"
                            + "\n".join(captured.errors[-20:] or ["(TensorRT logged no error)"]))
    plan = bytes(serialized)
    warnings += _save_timing_cache(config, cache_path)

    layers = _inspect_plan(trt, logger, captured, plan, version_compatible=target.builder.version_compatible)
    float_layers = tuple(info.name for info in layers if _is_float_compute(info)) if target.precision == "int8" else ()
    unreadable = [info.name for info in layers if info.precision == "unknown"]
    if layers and len(unreadable) == len(layers):
        warnings.append(f"the engine inspector gave no readable precision for any of the {len(layers)} layer(s) "
                        f"(TensorRT {trt.__version__}; e.g. '{layers[0].name}'): the layer precisions and the list of "
                        "conv/matmul layers running in float are unknown, not clean")
    elif unreadable:
        warnings.append(f"no readable precision for {len(unreadable)} of {len(layers)} layer(s), e.g. '{unreadable[0]}'")
    workdir = Path(workdir)
    plan_path = workdir / plan_name
    atomic_write_bytes(plan_path, plan)
    result = EngineResult(
        plan_path=plan_path,
        metadata_path=plan_path.with_name(plan_path.name + SIDECAR_SUFFIX),
        plan_sha256=sha256_bytes(plan),
        tensorrt_version=local.tensorrt_version,
        device_name=local.device_name,
        compute_capability=local.compute_capability,
        typing="weak" if weak else "strong",
        build_seconds=round(build_seconds, 3),
        layers=layers,
        gpu_fallback_layers=gpu_fallback_layers,
        float_compute_layers=float_layers,
        timing_cache_path=cache_path,
        notes=tuple(notes) + tuple(captured.dla_fallback_messages) + tuple(f"warning: {w}" for w in warnings),
        warnings=tuple(warnings),
    )
    metadata = engine_metadata(result, target, onnx_path)
    atomic_write_json(result.metadata_path, metadata)
    return dataclasses.replace(result, metadata=metadata)


def engine_metadata(result: EngineResult, target: Target, onnx_path: Path) -> dict[str, Any]:
    """The sidecar JSON: what was built, where, how, and what the engine really runs."""
    precisions: dict[str, int] = {}
    for info in result.layers:
        precisions[info.precision] = precisions.get(info.precision, 0) + 1
    return {
        "plan": result.plan_path.name,
        "plan_sha256": result.plan_sha256,
        "source_onnx": str(onnx_path),
        "target": target.name,
        "tensorrt_version": result.tensorrt_version,
        "device_name": result.device_name,
        "compute_capability": result.compute_capability,
        "typing": result.typing,
        "precision_requested": target.precision,
        "version_compatible": target.builder.version_compatible,
        "hardware_compatibility": target.builder.hardware_compatibility,
        "dla_core": target.builder.dla_core if target.builder.use_dla else None,
        "build_seconds": result.build_seconds,
        "layer_precisions": precisions,
        "layers": [asdict(info) for info in result.layers],
        "gpu_fallback_layers": list(result.gpu_fallback_layers),
        "float_compute_layers": list(result.float_compute_layers),
        "timing_cache": str(result.timing_cache_path) if result.timing_cache_path else None,
        "notes": list(result.notes),
        "warnings": list(result.warnings),
    }


@dataclass
class LogCapture:
    """What TensorRT logged while one build (or plan load) ran."""

    errors: list[str] = field(default_factory=list)
    dla_fallback_messages: list[str] = field(default_factory=list)


class TensorRTLog:
    """The one TensorRT logger of this process, and per-build buffers of what it logged.

    TensorRT keeps the first logger given to a Builder or Runtime in a process and
    logs everything there (TensorRT#1475; Polygraphy likewise makes one global
    logger, `get_trt_logger()` in polygraphy/backend/trt/util.py). So the logger
    is created once and every build reads its messages from a LogCapture it
    starts and ends (`with TensorRTLog.of(trt).capture() as captured:`).
    Builds running at once in threads each see all messages of that time.
    """

    _instance: "TensorRTLog | None" = None
    _instance_lock = threading.Lock()

    def __init__(self, trt: Any) -> None:
        self._trt = trt
        self._captures: list[LogCapture] = []
        self._lock = threading.Lock()
        owner = self

        class _Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:  # called by TensorRT: must not raise
                owner._log(severity, msg)

        self.logger = _Logger()

    @classmethod
    def of(cls, trt: Any) -> "TensorRTLog":
        """The process's logger (made on first use). A different `tensorrt` module (only
        tests swap it) gets its own, as a fresh process would."""
        with cls._instance_lock:
            if cls._instance is None or cls._instance._trt is not trt:
                cls._instance = cls(trt)
            return cls._instance

    @contextlib.contextmanager
    def capture(self) -> Iterator[LogCapture]:
        captured = LogCapture()
        with self._lock:
            self._captures.append(captured)
        try:
            yield captured
        finally:
            with self._lock:
                self._captures.remove(captured)

    def _log(self, severity: Any, msg: str) -> None:
        levels = self._trt.ILogger.Severity
        is_error = severity in (levels.ERROR, levels.INTERNAL_ERROR)
        is_fallback = "DLA" in msg and ("falling back to GPU" in msg or "Switching this layer's device type to GPU" in msg)
        with self._lock:
            for captured in self._captures:
                if is_error:
                    captured.errors.append(msg)
                if is_fallback:
                    captured.dla_fallback_messages.append(msg)
        if is_error or severity == levels.WARNING:
            print(f"[TensorRT] {msg}", flush=True)


def _collecting_logger(trt: Any) -> Any:
    """The process-wide TensorRT logger (see TensorRTLog)."""
    return TensorRTLog.of(trt).logger


def _network_flags(trt: Any, target: Target, major: int) -> int:
    if major < 10:
        return _legacy_explicit_batch_flag(trt)
    if major >= 11 or uses_weak_typing(target, major):
        # 10.x networks are always explicit batch and weakly typed by default;
        # 11.x networks are always strongly typed (the flag is deprecated there).
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # 10.x opting into strong typing


def _legacy_explicit_batch_flag(trt: Any) -> int:
    """TensorRT 8.x only: implicit batch is its default. EXPLICIT_BATCH is gone in 11."""
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def _legacy_set_precision_flags(trt: Any, config: Any, target: Target) -> None:
    """Weakly typed builds (8.x/10.x): the flags TensorRT 11 removed."""
    if target.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # still required for Q/DQ networks (TensorRT#4021)
    if target.precision == "fp16" or (target.precision == "int8" and target.builder.fp16_fallback):
        config.set_flag(trt.BuilderFlag.FP16)


def _parse_onnx(trt: Any, network: Any, logger: Any, onnx_path: Path, captured: LogCapture | None = None) -> None:
    parser = trt.OnnxParser(network, logger)
    # path= lets the parser find external weight files next to the model.
    if parser.parse(onnx_path.read_bytes(), path=str(onnx_path)):
        return
    node_names = _onnx_node_labels(onnx_path)
    lines = []
    for index in range(parser.num_errors):
        parser_error = parser.get_error(index)
        lines.append(_describe_parser_error(parser_error, node_names))
    # The parser also logs (e.g. "While parsing node number 5 [Op -> "y"]: ..."), often with more detail.
    lines += [f"TensorRT log: {message}" for message in (captured.errors[-10:] if captured else [])
              if not any(message in line for line in lines)]
    raise InputError(
        f"{onnx_path}: TensorRT {trt.__version__}'s ONNX parser rejected the model:\n  "
        + "\n  ".join(lines or ["(no parser error recorded)"])
        + f"\nrun `python -m pipeline inspect {onnx_path} --target <target>` for a readiness report")


def _describe_parser_error(parser_error: Any, node_names: list[str]) -> str:
    index = parser_error.node()
    # node_name() exists from TensorRT 9.1 on; before that only the index is known.
    name = parser_error.node_name() if hasattr(parser_error, "node_name") else ""
    if not name and 0 <= index < len(node_names):
        name = node_names[index]
    where = f"node {index} '{name}'" if index >= 0 else "model"
    return f"{where}: {parser_error.desc()} (code {parser_error.code()})"


def _onnx_node_labels(onnx_path: Path) -> list[str]:
    """"name (OpType)" for each top-level node, to name the node a parser error points at."""
    try:

        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception:  # the parser already failed; a second failure must not hide its message
        return []
    return [f"{node.name or '<unnamed>'} ({node.op_type})" for node in graph.node]


def _configure(trt: Any, builder: Any, network: Any, config: Any, target: Target, major: int) -> list[str]:
    """Workspace, optimization level, profiling, profile, DLA and compatibility; returns notes."""
    notes: list[str] = []
    settings = target.builder
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = settings.optimization_level
    else:
        notes.append(f"builder optimization level not settable in TensorRT {trt.__version__} (added in 8.6)")
    # DETAILED: the engine inspector then reports each layer's precision and tactic.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    _add_optimization_profile(builder, network, config, target)
    if settings.use_dla:
        _configure_dla(trt, builder, config, target)
    if settings.hardware_compatibility != "none":
        level = _hardware_level(trt, settings.hardware_compatibility)
        if not hasattr(config, "hardware_compatibility_level"):
            raise _missing_in_local_tensorrt(trt, "hardware_compatibility", settings.hardware_compatibility,
                                             "IBuilderConfig.hardware_compatibility_level", "8.6")
        config.hardware_compatibility_level = level
    if settings.version_compatible:
        # The plan embeds the lean runtime; loading it needs runtime.engine_host_code_allowed
        # (_inspect_plan here, pipeline.trt.runner on the device).
        flag = getattr(trt.BuilderFlag, "VERSION_COMPATIBLE", None)
        if flag is None:
            raise _missing_in_local_tensorrt(trt, "version_compatible", "true", "BuilderFlag.VERSION_COMPATIBLE", "8.6")
        config.set_flag(flag)
    return notes


# builder.hardware_compatibility value -> (HardwareCompatibilityLevel member, first TensorRT with it).
# SAME_COMPUTE_CAPABILITY first appears in 10.9 (NvInfer.h / pyCore.cpp of v10.3.0-v10.8.0 lack it),
# so JetPack 6 (10.3) has only NONE and AMPERE_PLUS; the enum itself arrived in 8.6.
_HARDWARE_LEVELS = {"ampere_plus": ("AMPERE_PLUS", "8.6"), "same_compute_capability": ("SAME_COMPUTE_CAPABILITY", "10.9")}


def _hardware_level(trt: Any, name: str) -> Any:
    """The HardwareCompatibilityLevel for a target value, looked up only when asked for."""
    member, since = _HARDWARE_LEVELS[name]
    levels = getattr(trt, "HardwareCompatibilityLevel", None)
    level = getattr(levels, member, None) if levels is not None else None
    if level is None:
        raise _missing_in_local_tensorrt(trt, "hardware_compatibility", name, f"HardwareCompatibilityLevel.{member}", since)
    return level


def _missing_in_local_tensorrt(trt: Any, key: str, value: str, api_name: str, since: str) -> InputError:
    return InputError(f"target asks for builder.{key} = '{value}' but the TensorRT here ({trt.__version__}) has no "
                      f"{api_name} (first in TensorRT {since}); drop builder.{key} from the target or build with "
                      f"TensorRT {since} or later")


def profile_shapes(input_name: str, shape: Iterable[int], target: Target) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) for one network input: the batch axis from the target, other axes fixed.

    A dynamic axis other than the batch has no size in the target, so it is an
    error here (and a finding of `inspect` before the build).
    """
    dims = tuple(int(d) for d in shape)
    for axis, size in enumerate(dims[1:], start=1):
        if size < 0:
            raise InputError(f"input '{input_name}' has a dynamic axis {axis} (shape {list(dims)}); only the batch axis "
                             "may be dynamic: export with a fixed size for it")
    batch = target.builder.batch
    if not dims or dims[0] >= 0:
        return dims, dims, dims
    rest = dims[1:]
    return (batch.min, *rest), (batch.opt, *rest), (batch.max, *rest)


def _add_optimization_profile(builder: Any, network: Any, config: Any, target: Target) -> None:
    profile = builder.create_optimization_profile()
    dynamic = False
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        low, opt, high = profile_shapes(tensor.name, tuple(tensor.shape), target)
        dynamic = dynamic or any(int(d) < 0 for d in tensor.shape)
        profile.set_shape(tensor.name, low, opt, high)
    if dynamic:
        config.add_optimization_profile(profile)


def _configure_dla(trt: Any, builder: Any, config: Any, target: Target) -> None:
    cores = builder.num_DLA_cores
    wanted = target.builder.dla_core
    if wanted >= cores:
        raise InputError(f"target '{target.name}' asks for DLA core {wanted} but this device reports {cores} DLA core(s); "
                         "build with a GPU target instead (e.g. jetson-orin-nx)")
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = wanted
    if target.builder.gpu_fallback:
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)


def _dla_fallback_layers(config: Any, network: Any) -> tuple[str, ...]:
    """Network layers the DLA cannot run: with GPU fallback they run on the GPU."""
    names = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if not config.can_run_on_DLA(layer):
            names.append(layer.name)
    return tuple(names)


# ----------------------------------------------------------- timing cache


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def timing_cache_name(target_name: str, tensorrt_version: str, device_name: str, compute_capability: str) -> str:
    """A cache per target, TensorRT version and device: timings from another GPU or version are wrong."""
    return f"{_slug(target_name)}__trt-{_slug(tensorrt_version)}__{_slug(device_name)}__sm{compute_capability.replace('.', '')}.cache"


def _timing_cache_path(directory: Path | None, target: Target, local: LocalTensorRT) -> Path | None:
    if directory is None:
        return None
    return Path(directory) / timing_cache_name(target.name, local.tensorrt_version, local.device_name, local.compute_capability)


def _load_timing_cache(config: Any, path: Path | None) -> list[str]:
    """Give the build the cache file's timings; warnings (a rejected file) for the report."""
    if path is None:
        return []
    data = path.read_bytes() if path.is_file() else b""
    timing_cache = config.create_timing_cache(data)
    # ignore_mismatch=False: a cache from another device is rejected (returns False), not trusted.
    if config.set_timing_cache(timing_cache, ignore_mismatch=False):
        return []
    warning = (f"TensorRT rejected the timing cache {path} (made on another device or TensorRT version?); "
               "built without its timings")
    # Go on with an empty cache so this build's timings are still kept; failing that, with none.
    if data:
        timing_cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(timing_cache, ignore_mismatch=False):
            warning += " and without a timing cache"
    return [warning]


def _save_timing_cache(config: Any, path: Path | None) -> list[str]:
    """Merge the build's timings into the file, as Polygraphy does: under an exclusive lock,
    load what is there now, combine, write atomically. Warnings for the report."""
    if path is None:
        return []
    timing_cache = config.get_timing_cache()
    if timing_cache is None:
        return [f"TensorRT has no timing cache after the build (rejected?); {path} was not written"]
    warnings: list[str] = []
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(path.with_name(path.name + ".lock")):
        current = path.read_bytes() if path.is_file() else b""
        if current:
            previous = config.create_timing_cache(current)
            # Another build may have written the file since ours was loaded: keep its timings too.
            if previous is None or not timing_cache.combine(previous, ignore_mismatch=False):
                warnings.append(f"the timing cache {path} did not match this device/TensorRT; replaced by this build's")
        atomic_write_bytes(path, bytes(timing_cache.serialize()))
    return warnings


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


# ------------------------------------------------------------- inspection


def _inspect_plan(trt: Any, logger: Any, captured: LogCapture, plan: bytes, *, version_compatible: bool = False) -> tuple[LayerInfo, ...]:
    runtime = trt.Runtime(logger)
    if version_compatible:
        # A version-compatible plan embeds the lean runtime (host code); the runtime refuses
        # it unless allowed (Polygraphy's EngineFromBytes does the same).
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise PipelineError("TensorRT built a plan it cannot load back: "
                            + ("; ".join(captured.errors[-5:]) or "(TensorRT logged no error)"))
    inspector = engine.create_engine_inspector()
    return parse_engine_information(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def _key(entry: Mapping[str, Any], *names: str) -> Any:
    """entry[name] for the first of names present, keys compared case-insensitively."""
    folded = {str(key).lower(): value for key, value in entry.items()}
    for name in names:
        if name.lower() in folded:
            return folded[name.lower()]
    return None


def parse_engine_information(text: str) -> tuple[LayerInfo, ...]:
    """Layers from the engine inspector's JSON.

    LayerInfo.type is the "ParameterType" (the network layer type: "Convolution",
    "Reformat", "Pooling", ...; what TREx reads), else the "LayerType" (kernel
    family: "CaskConvolution", "Reformat", "NoOp", "Myelin"). Precision from the
    first input's data type: 10.x "Format/Datatype" ("Thirty-two wide channel
    vectorized row major Int8 format"), 11.x a separate data type key
    ("DataType"/"Datatype", next to "Format"); with dynamic shapes 10.x says "N/A
    due to dynamic shapes", so a layer with weights then falls back to the
    weights' type ("Weights": {"Type": "Int8"}).
    """
    data = json.loads(text)
    layers = []
    for entry in _key(data, "Layers") or []:
        if isinstance(entry, str):  # built without DETAILED verbosity: names only
            layers.append(LayerInfo(name=entry, type="", precision="unknown", device="GPU"))
            continue
        tensors = list(_key(entry, "Inputs") or []) or list(_key(entry, "Outputs") or [])
        precision = precision_of(tensors[0]) if tensors and isinstance(tensors[0], Mapping) else "unknown"
        weights = _key(entry, "Weights")
        if precision == "unknown" and isinstance(weights, Mapping):
            precision = _normalize_type(str(_key(weights, "Type") or ""))
        layer_type = str(_key(entry, "ParameterType") or _key(entry, "LayerType") or "")
        name = str(_key(entry, "Name") or "")
        layers.append(LayerInfo(name=name, type=layer_type, precision=precision, device=_device_of(entry)))
    return tuple(layers)


def precision_of(io_entry: Mapping[str, Any]) -> str:
    """The data type of one inspector input/output entry, normalized ("unknown" when not told)."""
    value = _key(io_entry, "DataType", "Datatype", "Data Type", "Format/Datatype", "Format/DataType")
    if value is None:  # no data type key: the format string may still name it ("... FP32 format")
        value = _key(io_entry, "Format")
    return _normalize_type(str(value or ""))


def _normalize_type(text: str) -> str:
    text = text.lower()
    # Order matters: "int8" before "int", "half"/"fp16" before "float".
    for needle, name in (("int8", "int8"), ("fp8", "fp8"), ("bf16", "bf16"), ("bfloat", "bf16"),
                         ("half", "fp16"), ("fp16", "fp16"), ("float16", "fp16"), ("int32", "int32"),
                         ("int64", "int64"), ("bool", "bool"), ("fp32", "fp32"), ("float", "fp32")):
        if needle in text:
            return name
    return "unknown"


def _device_of(entry: Mapping[str, Any]) -> str:
    # The inspector has no device field; DLA subgraphs show up by name/type.
    # The authoritative list of what fell back is _dla_fallback_layers().
    text = " ".join(str(_key(entry, key) or "") for key in ("Name", "LayerType", "TacticName")).lower()
    return "DLA" if "dla" in text else "GPU"


def _is_compute_type(layer_type: str) -> bool:
    """A convolution/matmul by its ParameterType (or, lacking one, its LayerType); never by name."""
    folded = layer_type.lower().replace("_", "").replace(" ", "")
    if folded in _COMPUTE_PARAMETER_TYPES:
        return True
    if any(word in folded for word in _NON_COMPUTE_LAYER_TYPES):
        return False
    return any(word in folded for word in _COMPUTE_LAYER_TYPES)


def _is_float_compute(info: LayerInfo) -> bool:
    return info.precision in ("fp32", "fp16", "bf16") and _is_compute_type(info.type)


def read_engine_metadata(plan_path: Path) -> dict[str, Any]:
    """The sidecar of a plan, or {} when there is none."""
    sidecar = Path(plan_path).with_name(Path(plan_path).name + SIDECAR_SUFFIX)
    if not sidecar.is_file():
        return {}
    return json.loads(sidecar.read_text())
