"""Engine stage: a TensorRT plan built from the INT8 (Q/DQ) ONNX for one target, through Polygraphy.

TensorRT and a CUDA GPU exist only on the devices and GPU hosts, so this module
imports `tensorrt` and Polygraphy inside the functions that use them; everywhere
else the build writes a device bundle instead (pipeline.bundle) and
`tensorrt_status()` says plainly what is missing.

What Polygraphy does (polygraphy.backend.trt, tested by NVIDIA against every
TensorRT release): the network (CreateNetwork: EXPLICIT_BATCH before 10,
STRONGLY_TYPED), the builder config (CreateConfig: profiles, workspace, optimization
level, profiling verbosity, precision flags, hardware/version compatibility, DLA with
GPU fallback), the build (EngineBytesFromNetwork) and loading a plan back
(EngineFromBytes, host code allowed). What stays ours, small: the target policy
(which settings, refusals naming the target key), the ONNX parse step (its errors
name the nodes), the DLA core index and the list of layers DLA cannot run, the
timing cache (Polygraphy ignores a rejected cache and writes the file in place),
reading per-layer precisions from the inspector, the process logger, the sidecar.

Precision by TensorRT major version (facts: shared/TENSORRT.md):
- 8.x/10.x, weakly typed: a Q/DQ network still needs BuilderFlag.INT8
  (TensorRT#4021); BuilderFlag.FP16 lets the unquantized layers run in half.
- 11.x (always) and 10.x opting in: strongly typed; no precision flags exist; INT8
  comes from the Q/DQ nodes, FP16 only from an FP16-typed graph, which this pipeline
  does not write, so fp16_fallback / precision "fp16" are refused there.
The precision flags TensorRT 11 removed are asked for only in `_legacy_precision_flags`,
called only when `uses_weak_typing(...)` is true; tests/test_tensorrt_api.py checks
the TensorRT names used here against tensorrt-stubs 10.13 and the 11.x removal list.

The plan stays plain bytes (trtexec and Triton load it as is); everything we
know about it goes to a sidecar JSON next to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import re
import sys
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
    """Build workdir/<plan_name> (+ <plan_name>.json sidecar) from the Q/DQ ONNX for target, through Polygraphy.

    Raises EngineRequired (exit 4) when TensorRT or a GPU is missing,
    InputError when the parser rejects the model (naming the nodes) or the
    device or TensorRT lacks what the target asks for, PipelineError when the build fails.
    """
    onnx_path = Path(onnx_path)
    local = local_tensorrt()
    import tensorrt as trt

    trt_log = TensorRTLog.of(trt)
    with trt_log.capture() as captured, quiet_polygraphy():
        return _build(trt, captured, local, onnx_path, target, workdir, timing_cache_dir, plan_name)


def _build(trt: Any, captured: "LogCapture", local: LocalTensorRT, onnx_path: Path, target: Target,
           workdir: Path, timing_cache_dir: Path | None, plan_name: str) -> EngineResult:
    from polygraphy.backend.trt import EngineBytesFromNetwork

    major = tensorrt_major(local.tensorrt_version)
    weak = uses_weak_typing(target, major)
    refuse_unhonoured_fp16(target, major)  # defect 8: before any work
    warnings: list[str] = []
    builder, network, _parser = network_from_onnx(trt, onnx_path, strongly_typed=_opts_into_strong_typing(target, major),
                                                 captured=captured)
    notes: list[str] = []
    config = create_config(trt, builder, network, target, major, notes)
    gpu_fallback_layers = _dla_fallback_layers(config, network) if target.builder.use_dla else ()
    cache_path = _timing_cache_path(timing_cache_dir, target, local)
    warnings += _load_timing_cache(config, cache_path)

    started = time.perf_counter()
    with _polygraphy_errors(f"TensorRT could not build an engine for '{target.name}' from {onnx_path}", captured):
        serialized = EngineBytesFromNetwork((builder, network), config=config)()
    build_seconds = time.perf_counter() - started
    plan = bytes(serialized)
    warnings += _save_timing_cache(config, cache_path)

    layers = _inspect_plan(captured, plan)
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


def built_precisions(target: Target, typing: str) -> dict[str, str]:
    """What the builder was allowed to run each precision from, as the sidecar states it.

    Weak typing: INT8 from the Q/DQ nodes (with BuilderFlag.INT8), FP16 where
    fp16_fallback (or precision "fp16") set BuilderFlag.FP16, FP32 for the rest.
    Strong typing: the graph's own types only (INT8 from Q/DQ, every other tensor FP32:
    this pipeline writes no FP16-typed graph, so FP16 is refused there, see refuse_unhonoured_fp16).
    """
    wants_fp16 = target.precision == "fp16" or (target.precision == "int8" and target.builder.fp16_fallback)
    found = {}
    if target.precision == "int8":
        found["int8"] = "Q/DQ nodes" + (" + BuilderFlag.INT8" if typing == "weak" else " (strongly typed)")
    if typing == "weak" and wants_fp16:
        found["fp16"] = "BuilderFlag.FP16: layers TensorRT finds faster in half"
    found["fp32"] = "every layer not quantized" + ("" if typing == "weak" and wants_fp16 else " (no FP16)")
    return found


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
        "precisions_built": built_precisions(target, result.typing),
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
            cls._instance._share_with_polygraphy()
            return cls._instance

    def _share_with_polygraphy(self) -> None:
        """Polygraphy's loaders give TensorRT `get_trt_logger()`, the module global TRT_LOGGER once made
        (polygraphy/backend/trt/util.py): make it this logger, so TensorRT keeps one logger and we read it."""
        try:
            from polygraphy.backend.trt import util as polygraphy_trt_util
        except ImportError:  # Polygraphy missing: nothing to share with (the build then fails naming it)
            return
        polygraphy_trt_util.TRT_LOGGER = self.logger

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
            print(f"[TensorRT] {msg}", file=sys.stderr, flush=True)  # stdout carries `build --json`


# ------------------------------------------------- Polygraphy under the build


@contextlib.contextmanager
def quiet_polygraphy() -> Iterator[None]:
    """Polygraphy logs to stdout (polygraphy/logger/logger.py); `build --json` owns stdout. Its
    failures still raise (PolygraphyException, turned into our errors by _polygraphy_errors),
    and what TensorRT itself logs reaches TensorRTLog, which prints warnings and errors to stderr."""
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        yield


@contextlib.contextmanager
def _polygraphy_errors(what: str, captured: "LogCapture", error: type[PipelineError] = PipelineError) -> Iterator[None]:
    """A Polygraphy failure ("Invalid Engine...", "X is not available on TensorRT version ...") as our
    error, with what TensorRT logged: Polygraphy's own message alone does not say why."""
    from polygraphy.exception import PolygraphyException

    try:
        yield
    except PolygraphyException as failure:
        logged = captured.errors[-20:] or ["(TensorRT logged no error)"]
        raise error(f"{what}: {failure}\n" + "\n".join(logged)) from None


def _opts_into_strong_typing(target: Target, major: int) -> bool:
    """10.x (and 9.x) build strongly typed only when the target opts in; 11.x always is, without the flag
    (STRONGLY_TYPED is deprecated there), and 8.x cannot (targets.py refuses "strong" before 10)."""
    return 9 <= major < 11 and not uses_weak_typing(target, major)


def network_from_onnx(trt: Any, onnx_path: Path, *, strongly_typed: bool, captured: "LogCapture") -> tuple[Any, Any, Any]:
    """(builder, network, parser): Polygraphy's CreateNetwork (EXPLICIT_BATCH before 10, STRONGLY_TYPED when
    asked), then the ONNX parser as Polygraphy's NetworkFromOnnxPath runs it (plugins initialised,
    parse_from_file so external weights are found next to the model).

    Our own step: the parse itself, so that a rejection names the ONNX nodes (InputError);
    NetworkFromOnnxPath logs the parser errors and raises "Could not parse ONNX correctly"
    (polygraphy/backend/trt/util.py, check_onnx_parser_errors), dropping which node failed.
    """
    from polygraphy.backend.trt import create_network, get_trt_logger

    with _polygraphy_errors("TensorRT could not create a network", captured, InputError):
        builder, network = create_network(strongly_typed=strongly_typed)
    logger = get_trt_logger()
    trt.init_libnvinfer_plugins(logger, "")
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)) or parser.num_errors:
        _raise_parser_errors(trt, parser, onnx_path, captured)
    return builder, network, parser


def create_config(trt: Any, builder: Any, network: Any, target: Target, major: int, notes: list[str]) -> Any:
    """The IBuilderConfig: Polygraphy's CreateConfig from the target's settings, then what it does not cover."""
    from polygraphy.backend.trt import CreateConfig

    settings = target.builder
    if settings.use_dla:
        _check_dla_core(builder, target)  # Polygraphy only warns and builds for the GPU when a device has no DLA
    options: dict[str, Any] = {
        "profiles": [optimization_profile(network, target)],
        "memory_pool_limits": {trt.MemoryPoolType.WORKSPACE: settings.workspace_mb << 20},
        # DETAILED: the engine inspector then reports each layer's precision and tactic.
        "profiling_verbosity": trt.ProfilingVerbosity.DETAILED,
        # TensorRT's own default is TF32 on; Polygraphy's CreateConfig clears it unless asked (config.py).
        "tf32": True,
    }
    if uses_weak_typing(target, major):
        options.update(_legacy_precision_flags(target))
    if version_tuple(trt.__version__) >= (8, 6):
        options["builder_optimization_level"] = settings.optimization_level
    else:
        notes.append(f"builder optimization level not settable in TensorRT {trt.__version__} (added in 8.6)")
    if settings.hardware_compatibility != "none":
        options["hardware_compatibility_level"] = _hardware_level(trt, settings.hardware_compatibility)
    if settings.version_compatible:
        # The plan embeds the lean runtime; loading it needs runtime.engine_host_code_allowed, which
        # Polygraphy's EngineFromBytes sets (here in _inspect_plan, and in pipeline.trt.runner).
        if getattr(trt.BuilderFlag, "VERSION_COMPATIBLE", None) is None:
            raise _missing_in_local_tensorrt(trt, "version_compatible", "true", "BuilderFlag.VERSION_COMPATIBLE", "8.6")
        options["version_compatible"] = True
    if settings.use_dla:
        # Polygraphy sets the DLA device type, GPU_FALLBACK (or DIRECT_IO without it) and, before 11,
        # PREFER_PRECISION_CONSTRAINTS (config.py, CreateConfig._configure_flags).
        options.update(use_dla=True, allow_gpu_fallback=settings.gpu_fallback)
    config = CreateConfig(**options)(builder, network)
    if settings.use_dla:
        config.DLA_core = settings.dla_core  # CreateConfig always picks core 0
    return config


def optimization_profile(network: Any, target: Target) -> Any:
    """A Polygraphy Profile with every network input's (min, opt, max) from profile_shapes()."""
    from polygraphy.backend.trt import Profile

    shapes = Profile()  # Polygraphy's (an ordered dict), turned into an IOptimizationProfile by CreateConfig
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shapes.add(tensor.name, *profile_shapes(tensor.name, tuple(tensor.shape), target))
    return shapes


def _legacy_precision_flags(target: Target) -> dict[str, bool]:
    """Weakly typed builds (8.x/10.x): CreateConfig's int8/fp16, i.e. the BuilderFlags TensorRT 11 removed."""
    return {
        "int8": target.precision == "int8",  # BuilderFlag.INT8 is still required for Q/DQ networks (TensorRT#4021)
        "fp16": target.precision == "fp16" or (target.precision == "int8" and target.builder.fp16_fallback),
    }


def refuse_unhonoured_fp16(target: Target, major: int) -> None:
    """Defect 8: a strongly typed build takes its precisions from the graph's types, so BuilderFlag.FP16 does not
    exist for it (TensorRT 11 removed it; 10.x forbids it with STRONGLY_TYPED). FP16 would need an FP16-typed
    ONNX (ModelOpt's AutoCast, onnxconverter-common's float16 conversion), which this pipeline does not write:
    refuse instead of building an FP32 engine that the target said would use FP16."""
    if uses_weak_typing(target, major):
        return
    why = (f"TensorRT {major}.x" if major >= 11 else "builder.network_typing = 'strong'") + " builds strongly typed"
    if target.precision == "fp16":
        raise InputError(f"target '{target.name}': precision = 'fp16' but {why}: FP16 comes only from an FP16-typed "
                         "graph, which this pipeline does not write; use precision = 'int8' with builder.fp16_fallback = false")
    if target.builder.fp16_fallback:
        raise InputError(f"target '{target.name}': builder.fp16_fallback = true but {why}, where unquantized layers run "
                         "in the graph's own type (FP32): there is no FP16 flag to fall back to; set "
                         "builder.fp16_fallback = false in the target (the engine is then INT8 + FP32, as the sidecar says)")


def _raise_parser_errors(trt: Any, parser: Any, onnx_path: Path, captured: LogCapture | None = None) -> None:
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


def _check_dla_core(builder: Any, target: Target) -> None:
    cores = builder.num_DLA_cores
    wanted = target.builder.dla_core
    if wanted >= cores:
        raise InputError(f"target '{target.name}' asks for DLA core {wanted} but this device reports {cores} DLA core(s); "
                         "build with a GPU target instead (e.g. jetson-orin-nx)")


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
    """Merge the build's timings into the file, as Polygraphy's EngineBytesFromNetwork does (under its
    LockFile, the same `<file>.lock` so a `polygraphy convert --save-timing-cache` on the same file waits
    for us; load what is there now, combine), but written atomically and reporting what did not merge:
    Polygraphy writes the file in place and combines with ignore_mismatch=True. Warnings for the report."""
    from polygraphy.util import LockFile

    if path is None:
        return []
    timing_cache = config.get_timing_cache()
    if timing_cache is None:
        return [f"TensorRT has no timing cache after the build (rejected?); {path} was not written"]
    warnings: list[str] = []
    path.parent.mkdir(parents=True, exist_ok=True)
    with LockFile(str(path)):
        current = path.read_bytes() if path.is_file() else b""
        if current:
            previous = config.create_timing_cache(current)
            # Another build may have written the file since ours was loaded: keep its timings too.
            if previous is None or not timing_cache.combine(previous, ignore_mismatch=False):
                warnings.append(f"the timing cache {path} did not match this device/TensorRT; replaced by this build's")
        atomic_write_bytes(path, bytes(timing_cache.serialize()))
    return warnings


# ------------------------------------------------------------- inspection


def load_engine(plan: bytes, captured: LogCapture, what: str) -> Any:
    """ICudaEngine from plan bytes through Polygraphy's EngineFromBytes, which allows host code (a
    version-compatible plan embeds the lean runtime) and initialises the plugins."""
    from polygraphy.backend.trt import EngineFromBytes

    with _polygraphy_errors(what, captured):
        return EngineFromBytes(plan)()


def _inspect_plan(captured: LogCapture, plan: bytes) -> tuple[LayerInfo, ...]:
    import tensorrt as trt

    engine = load_engine(plan, captured, "TensorRT built a plan it cannot load back")
    # Our own: Polygraphy's inspect tool prints the inspector's text, it has no per-layer precision reader.
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
