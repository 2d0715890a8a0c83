"""A fake `tensorrt` module per TensorRT version, a fake CUDA runtime, and the tensorrt-stubs API they are checked against.

Shared by tests/test_tensorrt_api.py (the engine stage's calls per version) and
tests/test_engine_stage.py (`build` through the CLI with an engine). TensorRT
cannot be installed here, so:

- Every name the fake plays comes from tensorrt-stubs 10.13 (install: pip
  install --no-deps tensorrt-stubs==10.13.0.35.1), enum values included (the
  stubs record them: "# value = <BuilderFlag.FP16: 0>"); names a version lacks
  are hidden (ADDED_IN, and the 11.x removals), so touching one raises
  AttributeError as that TensorRT would.
- Polygraphy imports `tensorrt` lazily and keeps the module it first got
  (polygraphy/mod/importer.py, LazyModule); `install()` swaps the fake in and
  resets those caches and Polygraphy's process logger, as a fresh process would.
- A "plan" the fake builds is a small header (the TensorRT version, whether it
  is version-compatible, the profile) followed by the parsed ONNX bytes; its
  execution context runs that ONNX with ONNX Runtime on host memory handed out
  by the fake CUDA runtime (FakeCudaRuntime, what Polygraphy's `cuda.wrapper()`
  calls). That proves the wiring (build -> plan -> load -> bind -> execute_async_v3
  -> output allocator -> host copy), not TensorRT's numerics or kernels.
"""

from __future__ import annotations

import ast
import ctypes
import importlib.machinery
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

# Removed in TensorRT 11 (NVIDIA, "Removed Python APIs and Replacements", 10.x -> 11.x).
REMOVED_MODULE_CHAINS = frozenset({
    ("BuilderFlag", flag) for flag in ("FP16", "INT8", "FP8", "BF16", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                                       "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO")
} | {("NetworkDefinitionCreationFlag", "EXPLICIT_BATCH")} | {
    (name,) for name in ("IInt8Calibrator", "IInt8EntropyCalibrator", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator",
                         "IInt8LegacyCalibrator", "CalibrationAlgoType", "QuantizationFlag", "IAlgorithm",
                         "IAlgorithmContext", "IAlgorithmIOInfo", "IAlgorithmSelector", "IAlgorithmVariant")
})
REMOVED_MEMBERS = {
    "IBuilderConfig": frozenset({"int8_calibrator", "set_calibration_profile", "get_calibration_profile",
                                 "set_quantization_flag", "get_quantization_flag", "clear_quantization_flag",
                                 "quantization_flags", "algorithm_selector"}),
    "Builder": frozenset({"platform_has_fast_fp16", "platform_has_fast_int8"}),
    "ICudaEngine": frozenset({"device_memory_size", "device_memory_size_for_profile"}),
}


# --------------------------------------------------------------- stub API


@dataclass
class ClassInfo:
    name: str
    bases: list[str] = field(default_factory=list)
    members: set[str] = field(default_factory=set)
    nested: dict[str, "ClassInfo"] = field(default_factory=dict)
    methods: set[str] = field(default_factory=set)  # defs; the other members are properties or enum values


@dataclass
class StubApi:
    module_names: set[str] = field(default_factory=set)
    classes: dict[str, ClassInfo] = field(default_factory=dict)
    module_functions: set[str] = field(default_factory=set)
    # (enum class, member) -> the value the stubs record ("# value = <BuilderFlag.FP16: 0>"): the real enum values
    enum_values: dict[tuple[str, str], int] = field(default_factory=dict)
    # module-level aliases such as `float32: DataType  # value = <DataType.FLOAT: 0>` -> ("DataType", "FLOAT")
    aliases: dict[str, tuple[str, str]] = field(default_factory=dict)

    def methods(self, class_name: str, seen: frozenset[str] = frozenset()) -> set[str]:
        info = self.classes.get(class_name)
        if info is None or class_name in seen:
            return set()
        found = set(info.methods)
        for base in info.bases:
            found |= self.methods(base, seen | {class_name})
        return found

    def members(self, class_name: str, seen: frozenset[str] = frozenset()) -> set[str]:
        """Members of a class and of its bases (resolved by name)."""
        info = self.classes.get(class_name)
        if info is None or class_name in seen:
            return set()
        found = set(info.members) | set(info.nested)
        for base in info.bases:
            found |= self.members(base, seen | {class_name})
        return found

    def merge(self, other: "StubApi") -> None:
        self.module_names |= other.module_names
        self.classes.update(other.classes)
        self.module_functions |= other.module_functions
        self.enum_values.update(other.enum_values)
        self.aliases.update(other.aliases)


IVAR = re.compile(r":ivar\s+(\w+)\s*:")


def _class_from_ast(node: ast.ClassDef) -> ClassInfo:
    info = ClassInfo(name=node.name, bases=[_base_name(base) for base in node.bases])
    info.members |= set(IVAR.findall(ast.get_docstring(node) or ""))
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            info.members.add(item.name)
            if not any(isinstance(d, ast.Name) and d.id == "property" for d in item.decorator_list):
                info.methods.add(item.name)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            info.members.add(item.target.id)
        elif isinstance(item, ast.Assign):
            info.members |= {t.id for t in item.targets if isinstance(t, ast.Name)}
        elif isinstance(item, ast.ClassDef):
            info.nested[item.name] = _class_from_ast(item)
    return info


def _base_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _api_from_ast(tree: ast.Module) -> StubApi:
    api = StubApi()
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            api.classes[node.name] = _class_from_ast(node)
            api.module_names.add(node.name)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            api.module_names.add(node.name)
            api.module_functions.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            api.module_names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            api.module_names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets) and isinstance(node.value, ast.List):
                api.module_names |= {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
        elif isinstance(node, ast.ImportFrom):
            api.module_names |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            api.module_names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return api


DEF_LINE = re.compile(r"^(\s*)(async\s+)?def\s+(\w+)\s*\(")


def parse_tolerantly(text: str, max_repairs: int = 200) -> tuple[ast.Module | None, int]:
    """(module, lines repaired); None when the slips cannot be repaired line by line."""
    lines = text.splitlines()
    for repairs in range(max_repairs + 1):
        try:
            return ast.parse("\n".join(lines)), repairs
        except SyntaxError as error:
            index = (error.lineno or 0) - 1
            if not 0 <= index < len(lines):
                return None, repairs
            line = lines[index]
            match = DEF_LINE.match(line)
            indent = re.match(r"\s*", line).group(0)
            # Keep the def (its name is the API) with a signature that parses; the body follows.
            replacement = f"{indent}def {match.group(3)}(*args, **kwargs):" if match else f"{indent}pass"
            if replacement == line:
                return None, repairs
            lines[index] = replacement
    return None, max_repairs


CLASS_LINE = re.compile(r"^(\s*)class\s+(\w+)\s*(?:\(([^)]*)\))?\s*:")
MEMBER_LINE = re.compile(r"^(\s*)(\w+)\s*[:=]")
IMPORT_LINE = re.compile(r"^from\s+\S+\s+import\s+(\w+)(?:\s+as\s+(\w+))?")


def api_from_regex(text: str) -> StubApi:
    """Fallback when a file cannot be parsed: classes, defs, annotations and :ivar by indentation."""
    api = StubApi()
    stack: list[tuple[int, ClassInfo]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        while stack and indent <= stack[-1][0] and not line.lstrip().startswith((":ivar", '"""')):
            stack.pop()
        owner = stack[-1][1] if stack else None
        if match := CLASS_LINE.match(line):
            info = ClassInfo(name=match.group(2), bases=[b.strip().split(".")[-1] for b in (match.group(3) or "").split(",") if b.strip()])
            if owner is None:
                api.classes[info.name] = info
                api.module_names.add(info.name)
            else:
                owner.nested[info.name] = info
            stack.append((indent, info))
        elif match := DEF_LINE.match(line):
            (owner.members if owner else api.module_names).add(match.group(3))
            (owner.methods if owner else api.module_functions).add(match.group(3))
        elif owner is not None and (ivars := IVAR.findall(line)):
            owner.members |= set(ivars)
        elif match := MEMBER_LINE.match(line):
            (owner.members if owner else api.module_names).add(match.group(2))
        elif owner is None and (match := IMPORT_LINE.match(line)):
            api.module_names.add(match.group(2) or match.group(1))
    return api


def load_stub_file(path: Path) -> tuple[StubApi, str]:
    """The API one .pyi file declares, and how it was read ("ast", "ast+N repairs" or "regex")."""
    text = path.read_text(encoding="utf-8")
    tree, repairs = parse_tolerantly(text)
    api, how = (api_from_regex(text), "regex") if tree is None else (_api_from_ast(tree), "ast" if repairs == 0 else f"ast+{repairs} repairs")
    for line in text.splitlines():
        if match := ENUM_VALUE.match(line):
            name, enum, member, value = match.groups()
            api.enum_values[(enum, member)] = int(value)
            if not line.startswith(" ") and name in api.module_names:
                api.aliases[name] = (enum, member)
    return api, how


ENUM_VALUE = re.compile(r"^\s*(\w+): [\w.\[\]]+\s+# value = <(\w+)\.(\w+): (-?\d+)>")


def load_stub_api() -> StubApi | None:
    """tensorrt-stubs' API (all its files merged), or None when the stubs are not installed."""
    files = find_stub_files()
    if files is None:
        return None
    api = StubApi()
    for path in files:
        api.merge(load_stub_file(path)[0])
    return api


def find_stub_files() -> list[Path] | None:
    for entry in map(Path, sys.path):
        bindings = entry / "tensorrt_bindings" / "tensorrt.pyi"
        if bindings.is_file():
            files = [bindings, entry / "tensorrt_bindings" / "__init__.pyi", entry / "tensorrt" / "__init__.pyi"]
            return [f for f in files if f.is_file()]
    return None



# ------------------------------------------------------------------ the fake


# Names the fake hides before the TensorRT version that introduced them (the stubs are 10.13):
ADDED_IN = {
    # NvInfer.h / pyCore.cpp: kSAME_COMPUTE_CAPABILITY first in 10.9 (absent v10.3.0-v10.8.0); JetPack 6 has 10.3
    ("HardwareCompatibilityLevel", "SAME_COMPUTE_CAPABILITY"): (10, 9),
    # hardware compatibility, version compatibility (lean runtime, host code) and the optimization level: 8.6
    ("HardwareCompatibilityLevel",): (8, 6),
    ("IBuilderConfig", "hardware_compatibility_level"): (8, 6),
    ("BuilderFlag", "VERSION_COMPATIBLE"): (8, 6),
    ("BuilderFlag", "EXCLUDE_LEAN_RUNTIME"): (8, 6),
    ("Runtime", "engine_host_code_allowed"): (8, 6),
    ("IBuilderConfig", "builder_optimization_level"): (8, 6),
    # strongly typed networks arrived with 9.x (used only on 10.x here); ParserError.node_name with 9.1
    # (see engine._describe_parser_error)
    ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED"): (9, 0),
    ("ParserError", "node_name"): (9, 1),
    # The name-based I/O API (get_tensor_name, set_tensor_address, execute_async_v3, IOutputAllocator) is 8.5's.
}

INSPECTOR_JSON = json.dumps({"Layers": [
    {"Name": "image_head", "LayerType": "CaskGemmMatrixMultiply", "Inputs": [{"Name": "x", "Format/Datatype": "Int8"}],
     "Outputs": [{"Name": "y", "Format/Datatype": "Row major linear FP32"}]},
    {"Name": "text_head", "LayerType": "CaskGemmMatrixMultiply", "Inputs": [{"Name": "t", "Format/Datatype": "Half"}]},
    {"Name": "fuse", "LayerType": "PointWiseV2", "Inputs": [{"Name": "a", "DataType": "Float"}]},
], "Bindings": ["image", "logits"]})

PLAN_MAGIC = b"FAKE-TRT-PLAN\n"
VC_PREFIX = b"VC-"  # a version-compatible plan: it embeds the lean runtime (host code)


class _Enum:
    def __init__(self, path: str, value: int):
        self.path, self.value = path, value

    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return self.path

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    def __eq__(self, other) -> bool:
        return isinstance(other, _Enum) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)


class _EnumType(SimpleNamespace):
    """A pybind11 enum as TensorRT exposes it: members as attributes and in __members__ (Polygraphy iterates it)."""

    @property
    def __members__(self) -> dict[str, _Enum]:
        return dict(vars(self))


class _Double:
    """An instance of a TensorRT class: attributes checked against the stubs, calls recorded.

    Methods answer from the fake's behaviour table (default: None); properties
    read back what was set (or the table's value), as a pybind11 property does.
    """

    def __init__(self, world: "FakeTensorRT", class_name: str, **state):
        object.__setattr__(self, "_world", world)
        object.__setattr__(self, "_class", class_name)
        object.__setattr__(self, "_state", state)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        world, class_name = self._world, self._class
        world.check_member(class_name, name)
        behaviour = world.behaviour(self, name)
        if name in world.api.methods(class_name):
            def call(*args, **kwargs):
                world.calls.append((f"{class_name}.{name}", args, kwargs))
                return behaviour(*args, **kwargs) if callable(behaviour) else behaviour
            return call
        if name in self._state:
            return self._state[name]
        return None if callable(behaviour) else behaviour

    def __setattr__(self, name: str, value) -> None:
        self._world.check_member(self._class, name)
        self._world.calls.append((f"{self._class}.{name} =", (value,), {}))
        self._state[name] = value

    def __iter__(self):  # INetworkDefinition: `for layer in network` (it has __len__/__getitem__)
        if self._class != "INetworkDefinition":
            raise TypeError(f"'{self._class}' object is not iterable")
        return iter([self.get_layer(i) for i in range(self.num_layers)])

    def __bool__(self) -> bool:
        return True


def _class_double(name: str, world: "FakeTensorRT") -> type:
    """A real class for the TensorRT types Polygraphy subclasses or checks with isinstance."""
    return type(name, (_Double,), {"__init__": lambda self, *args, **state: _Double.__init__(self, world, name, **state)})


def _subclassable(name: str) -> type:
    """IOutputAllocator / IDebugListener / ILogger: Python subclasses them and calls Base.__init__(self)."""
    return type(name, (), {"__init__": lambda self: None})


_NUMPY_OF_TRT = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "INT8": np.int8,
                 "BOOL": np.bool_, "UINT8": np.uint8}
_TRT_OF_ONNX = {1: "FLOAT", 10: "HALF", 6: "INT32", 7: "INT64", 3: "INT8", 9: "BOOL", 2: "UINT8"}


class FakeTensorRT:
    """The `tensorrt` module for one TensorRT version, as the engine stage and Polygraphy see it."""

    def __init__(self, api: StubApi, version: str, *, dla_cores: int = 0, parse_ok: bool = True,
                 build_ok: bool = True, cache_accepted: bool = True, cache_available: bool = True,
                 inspector_json: str | None = None):
        self.api, self.__version__, self.major = api, version, int(version.split(".")[0])
        # What a real module carries (torch's import machinery asks importlib.util.find_spec("tensorrt")):
        self.__name__, self.__path__ = "tensorrt", []
        self.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
        self.version = tuple(int(part) for part in version.split(".")[:2])
        self.dla_cores, self.parse_ok, self.build_ok = dla_cores, parse_ok, build_ok
        # set_timing_cache's answer (False: device/version mismatch) and whether get_timing_cache has one
        self.cache_accepted, self.cache_available = cache_accepted, cache_available
        self.inspector_json = inspector_json or INSPECTOR_JSON
        self.calls: list[tuple[str, tuple, dict]] = []
        # TensorRT keeps the first logger given to a Builder or Runtime in a process (TensorRT#1475):
        # everything later is logged there, whatever logger a later Builder/Runtime was given.
        self.kept_logger = None
        severity = _EnumType(**{n: _Enum(f"Severity.{n}", api.enum_values.get(("Severity", n), i)) for i, n in enumerate(
            ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"])})
        # trt.ILogger.Severity.ERROR is also trt.ILogger.ERROR and trt.Logger.ERROR (the stubs' Logger docstring)
        self.ILogger = type("ILogger", (), {"Severity": severity, "__init__": lambda self: None, **vars(severity)})
        self.Logger = type("Logger", (self.ILogger,), {"__init__": lambda self, min_severity=None: None})
        self.ICudaEngine = _class_double("ICudaEngine", self)
        self.IExecutionContext = _class_double("IExecutionContext", self)
        self.IOutputAllocator = _subclassable("IOutputAllocator")
        self.IDebugListener = _subclassable("IDebugListener")

    # -- the stubs decide which names exist
    def removed(self, class_name: str, name: str) -> bool:
        if self.version < ADDED_IN.get((class_name, name), (0, 0)):
            return True  # not there yet in the version played (the stubs are 10.13)
        return self.major >= 11 and (name in REMOVED_MEMBERS.get(class_name, ()) or (class_name, name) in REMOVED_MODULE_CHAINS)

    def check_member(self, class_name: str, name: str) -> None:
        if name not in self.api.members(class_name) or self.removed(class_name, name):
            raise AttributeError(f"TensorRT {self.__version__}: '{class_name}' has no attribute '{name}'")

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if (name not in self.api.module_names or (self.major >= 11 and (name,) in REMOVED_MODULE_CHAINS)
                or self.version < ADDED_IN.get((name,), (0, 0))):
            raise AttributeError(f"module 'tensorrt' {self.__version__} has no attribute '{name}'")
        if name in ("Builder", "Runtime"):
            def construct(logger):
                self.calls.append((name, (logger,), {}))
                return _Double(self, name, logger=self.keep_logger(logger))
            return construct
        if name == "OnnxParser":
            return lambda network, logger: _Double(self, name, logger=logger, network=network)
        if name in self.api.aliases:  # trt.float32 is trt.DataType.FLOAT
            enum, member = self.api.aliases[name]
            return getattr(getattr(self, enum), member)
        if name in self.api.module_functions:
            def function(*args, **kwargs):
                self.calls.append((name, args, kwargs))
                return True
            return function
        members = self.api.classes[name].members
        return _EnumType(**{m: _Enum(f"{name}.{m}", self.api.enum_values.get((name, m), i)) for i, m in enumerate(sorted(members))
                            if m.isupper() and not self.removed(name, m)})

    def keep_logger(self, logger):
        if self.kept_logger is None:
            self.kept_logger = logger
        return self.kept_logger

    def log(self, severity: str, message: str) -> None:
        """What TensorRT logs goes to the first logger it was given, not to the caller's."""
        if self.kept_logger is not None:
            self.kept_logger.log(getattr(self.ILogger.Severity, severity), message)

    # -- parse, build, serialize
    def _parse(self, parser, data, path=None):
        if not self.parse_ok:
            self.log("ERROR", "ModelImporter.cpp:949: While parsing node number 5 [NonMaxSuppression -> \"boxes\"]: "
                              "no importer registered for op: NonMaxSuppression")
            return False
        parser._state["network"]._state["onnx"] = bytes(data)
        return True

    def _parse_from_file(self, parser, path):
        return self._parse(parser, Path(path).read_bytes(), path)

    def _network_io(self, network, inputs: bool) -> list[dict]:
        data = network._state.get("onnx")
        if data is None:  # nothing parsed: the shape the older tests assume
            return [{"name": "image", "shape": [-1, 3, 4, 4], "dtype": "FLOAT"}] if inputs else []
        import onnx

        graph = onnx.load_from_string(data).graph
        initializers = {init.name for init in graph.initializer}
        values = [v for v in graph.input if v.name not in initializers] if inputs else list(graph.output)
        return [{"name": v.name, "dtype": _TRT_OF_ONNX[v.type.tensor_type.elem_type],
                 "shape": [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]}
                for v in values]

    def _build(self, network, config):
        if not self.build_ok:
            self.log("ERROR", "[network.cpp::validate] Error Code 4: Internal Error (image: dynamic input is missing dimensions in profile 0.)")
            return None
        version_compatible = "BuilderFlag.VERSION_COMPATIBLE" in {repr(args[0]) for args in self.called("IBuilderConfig.set_flag")}
        profile = {name: [list(low), list(opt), list(high)] for name, low, opt, high in self.called("IOptimizationProfile.set_shape")}
        header = {"tensorrt": self.__version__, "inputs": self._network_io(network, True), "outputs": self._network_io(network, False),
                  "profile": profile}
        plan = (VC_PREFIX if version_compatible else b"") + PLAN_MAGIC + json.dumps(header).encode() + b"\n"
        return _HostMemory(plan + network._state.get("onnx", b""))

    def _deserialize(self, runtime, plan):
        # The runtime refuses a plan with host code (a version-compatible plan embeds the lean
        # runtime) unless runtime.engine_host_code_allowed is set (stubs 10.13: "Whether this runtime
        # is allowed to deserialize engines that contain host executable code (Default: False)";
        # Polygraphy's EngineFromBytes sets it). Like every failed deserialization it logs an
        # error and returns None; the message texts here are the fake's own.
        plan = bytes(plan)
        if plan.startswith(VC_PREFIX) and not runtime._state.get("engine_host_code_allowed"):
            self.log("ERROR", "IRuntime::deserializeCudaEngine: (fake) the plan contains host code and "
                              "engine_host_code_allowed is false")
            return None
        body = plan[len(VC_PREFIX):] if plan.startswith(VC_PREFIX) else plan
        if not body.startswith(PLAN_MAGIC):
            self.log("ERROR", "IRuntime::deserializeCudaEngine: (fake) not a serialized engine")
            return None
        header_line, onnx_bytes = body[len(PLAN_MAGIC):].split(b"\n", 1)
        header = json.loads(header_line)
        if header["tensorrt"] != self.__version__ and not plan.startswith(VC_PREFIX):
            # A plan loads only with the TensorRT version that built it, unless version-compatible.
            self.log("ERROR", f"IRuntime::deserializeCudaEngine: (fake) plan built by TensorRT {header['tensorrt']}, "
                              f"this is {self.__version__}")
            return None
        return self.ICudaEngine(header=header, onnx=onnx_bytes)

    # -- the engine and its execution
    def _io(self, engine) -> list[dict]:
        header = engine._state["header"]
        return [{**t, "input": True} for t in header["inputs"]] + [{**t, "input": False} for t in header["outputs"]]

    def _tensor(self, engine, name: str) -> dict:
        return next(t for t in self._io(engine) if t["name"] == name)

    def _profile_shape(self, engine, name: str, index: int):
        shape = self._tensor(engine, name)["shape"]
        return [tuple(s) for s in engine._state["header"]["profile"].get(name, [shape, shape, shape])]

    def _execute(self, context, stream: int) -> bool:
        """Run the plan's ONNX on the inputs bound by address; hand outputs to the output allocator (host memory)."""
        import onnxruntime as ort

        engine = context._state["engine"]
        addresses, shapes, allocators = context._state["addresses"], context._state["shapes"], context._state["allocators"]
        feed = {}
        for tensor in (t for t in self._io(engine) if t["input"]):
            dtype = np.dtype(_NUMPY_OF_TRT[tensor["dtype"]])
            shape = tuple(shapes[tensor["name"]])
            count = int(np.prod(shape))
            raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(addresses[tensor["name"]])
            feed[tensor["name"]] = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape).copy()
        if "session" not in engine._state:
            engine._state["session"] = ort.InferenceSession(engine._state["onnx"], providers=["CPUExecutionProvider"])
        results = engine._state["session"].run(None, feed)
        for tensor, value in zip((t for t in self._io(engine) if not t["input"]), results):
            value = np.ascontiguousarray(value.astype(_NUMPY_OF_TRT[tensor["dtype"]]))
            allocator = allocators[tensor["name"]]
            pointer = allocator.reallocate_output_async(tensor["name"], 0, value.nbytes, 256, stream)
            ctypes.memmove(pointer, value.ctypes.data, value.nbytes)
            allocator.notify_shape(tensor["name"], value.shape)
        return True

    def _set_timing_cache(self, config, cache, ignore_mismatch):
        config._state["timing_cache"] = cache if self.cache_accepted else None
        return self.cache_accepted

    def _get_timing_cache(self, config):
        return config._state.get("timing_cache") if self.cache_available else None

    def _set_input_shape(self, context, name, shape):
        context._state["shapes"][name] = tuple(int(d) for d in shape)
        return True

    def _set_address(self, context, name, pointer):
        context._state["addresses"][name] = int(pointer)
        return True

    def _context_shape(self, context, name):
        tensor = self._tensor(context._state["engine"], name)
        return tuple(context._state["shapes"].get(name, tensor["shape"]))

    def _set_flag(self, config, flag):
        config._state.setdefault("flags", set()).add(repr(flag))

    # -- what the doubles return
    def behaviour(self, obj: _Double, name: str):
        state = obj._state
        enum = lambda path: getattr(getattr(self, path.split(".")[0]), path.split(".")[1])  # noqa: E731
        table = {
            ("Builder", "create_network"): lambda flags=0: _Double(self, "INetworkDefinition"),
            ("Builder", "create_builder_config"): lambda: _Double(self, "IBuilderConfig", DLA_core=-1,
                                                                  default_device_type=enum("DeviceType.GPU")),
            ("Builder", "create_optimization_profile"): lambda: _Double(self, "IOptimizationProfile"),
            ("Builder", "num_DLA_cores"): self.dla_cores,
            ("Builder", "build_serialized_network"): self._build,
            ("INetworkDefinition", "num_inputs"): len(self._network_io(obj, True)) if obj._class == "INetworkDefinition" else 0,
            ("INetworkDefinition", "get_input"): lambda i: _Double(self, "ITensor", is_shape_tensor=False,
                                                                   **{k: v if k != "shape" else tuple(v) for k, v in self._network_io(obj, True)[i].items()
                                                                      if k != "dtype"}, dtype=enum("DataType." + self._network_io(obj, True)[i]["dtype"])),
            ("INetworkDefinition", "num_layers"): 2,
            ("INetworkDefinition", "get_layer"): lambda i: _Double(self, "ILayer", name=["gather", "conv"][i], precision_is_set=False,
                                                                   type=enum(["LayerType.GATHER", "LayerType.CONVOLUTION"][i])),
            ("IBuilderConfig", "can_run_on_DLA"): lambda layer: layer._state["name"] != "gather",
            ("IBuilderConfig", "create_timing_cache"): lambda data: _Double(self, "ITimingCache", data=bytes(data)),
            ("IBuilderConfig", "get_timing_cache"): lambda: self._get_timing_cache(obj),
            ("IBuilderConfig", "set_timing_cache"): lambda cache, ignore_mismatch: self._set_timing_cache(obj, cache, ignore_mismatch),
            ("IBuilderConfig", "set_flag"): lambda flag: self._set_flag(obj, flag),
            ("IBuilderConfig", "get_flag"): lambda flag: repr(flag) in state.get("flags", set()),
            ("IBuilderConfig", "get_tactic_sources"): lambda: 0,
            ("IBuilderConfig", "set_memory_pool_limit"): lambda pool, size: state.setdefault("pools", {}).__setitem__(repr(pool), size),
            ("IBuilderConfig", "get_memory_pool_limit"): lambda pool: state.get("pools", {}).get(repr(pool), 0),
            ("IBuilderConfig", "num_optimization_profiles"): 1,
            ("ITimingCache", "serialize"): lambda: _HostMemory(b"CACHE"),
            ("ITimingCache", "combine"): lambda input_cache, ignore_mismatch: True,
            ("OnnxParser", "parse"): lambda data, path=None: self._parse(obj, data, path),
            ("OnnxParser", "parse_from_file"): lambda path: self._parse_from_file(obj, path),
            ("OnnxParser", "num_errors"): 0 if self.parse_ok else 1,
            ("OnnxParser", "get_error"): lambda i: _Double(self, "ParserError"),
            ("ParserError", "node"): lambda: 5,
            ("ParserError", "node_name"): lambda: "",
            ("ParserError", "desc"): lambda: "no importer for op",
            ("ParserError", "code"): lambda: 8,
            ("Runtime", "deserialize_cuda_engine"): lambda plan: self._deserialize(obj, plan),
            ("ICudaEngine", "create_engine_inspector"): lambda: _Double(self, "EngineInspector"),
            ("ICudaEngine", "create_execution_context"): lambda *strategy: self.IExecutionContext(
                engine=obj, addresses={}, shapes={}, allocators={}, active_optimization_profile=0),
            ("ICudaEngine", "num_io_tensors"): len(self._io(obj)) if "header" in state else 0,
            ("ICudaEngine", "get_tensor_name"): lambda i: self._io(obj)[i]["name"],
            ("ICudaEngine", "get_tensor_mode"): lambda name: enum("TensorIOMode." + ("INPUT" if self._tensor(obj, name)["input"] else "OUTPUT")),
            ("ICudaEngine", "get_tensor_shape"): lambda name: tuple(self._tensor(obj, name)["shape"]),
            ("ICudaEngine", "get_tensor_dtype"): lambda name: enum("DataType." + self._tensor(obj, name)["dtype"]),
            ("ICudaEngine", "get_tensor_format"): lambda name, profile=0: enum("TensorFormat.LINEAR"),
            ("ICudaEngine", "get_tensor_profile_shape"): lambda name, index: self._profile_shape(obj, name, index),
            ("ICudaEngine", "is_shape_inference_io"): lambda name: False,
            ("IExecutionContext", "set_input_shape"): lambda name, shape: self._set_input_shape(obj, name, shape),
            ("IExecutionContext", "get_tensor_shape"): lambda name: self._context_shape(obj, name),
            ("IExecutionContext", "set_tensor_address"): lambda name, pointer: self._set_address(obj, name, pointer),
            ("IExecutionContext", "get_tensor_address"): lambda name: state["addresses"].get(name, 0),
            ("IExecutionContext", "set_output_allocator"): lambda name, allocator: state["allocators"].__setitem__(name, allocator) or True,
            ("IExecutionContext", "set_debug_listener"): lambda listener: True,
            ("IExecutionContext", "set_optimization_profile_async"): lambda index, stream: True,
            ("IExecutionContext", "execute_async_v3"): lambda stream: self._execute(obj, stream),
            ("EngineInspector", "get_engine_information"): lambda fmt: self.inspector_json,
        }
        return table.get((obj._class, name), lambda *args, **kwargs: None)

    def called(self, name: str) -> list[tuple]:
        return [args for called, args, _ in self.calls if called == name]

    def called_with(self, name: str) -> list[tuple[tuple, dict]]:
        return [(args, kwargs) for called, args, kwargs in self.calls if called == name]


class _HostMemory(bytes):
    """IHostMemory: a buffer (bytes() of it is the plan) that Polygraphy also uses as a context manager."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


# ------------------------------------------------------------------ a CUDA runtime on host memory


class FakeCudaRuntime:
    """The libcudart calls Polygraphy's `cuda.Cuda` wrapper makes (polygraphy/cuda/cuda.py), on host memory.

    "Device" pointers are host addresses of buffers kept here; copies are memmoves.
    Enough for Polygraphy's TrtRunner to bind inputs, receive outputs through the
    output allocator and copy them back, with the fake engine reading and writing
    the same host memory.
    """

    def __init__(self) -> None:
        self.buffers: dict[int, Any] = {}
        self.streams: set[int] = set()
        self._next_stream = 0x1000

    def cudaMalloc(self, pointer_ref, nbytes) -> int:  # noqa: N802 (CUDA's names)
        size = max(int(getattr(nbytes, "value", nbytes)), 1)
        buffer = ctypes.create_string_buffer(size)
        address = ctypes.addressof(buffer)
        self.buffers[address] = buffer
        pointer_ref._obj.value = address
        return 0

    def cudaFree(self, pointer) -> int:  # noqa: N802
        self.buffers.pop(pointer.value, None)
        return 0

    def _copy(self, dst, src, nbytes) -> int:
        if int(nbytes.value):
            ctypes.memmove(dst.value, src.value, nbytes.value)
        return 0

    def cudaMemcpy(self, dst, src, nbytes, kind) -> int:  # noqa: N802
        return self._copy(dst, src, nbytes)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream) -> int:  # noqa: N802
        return self._copy(dst, src, nbytes)

    def cudaStreamCreate(self, pointer_ref) -> int:  # noqa: N802
        self._next_stream += 16
        self.streams.add(self._next_stream)
        pointer_ref._obj.value = self._next_stream
        return 0

    def cudaStreamSynchronize(self, stream) -> int:  # noqa: N802
        return 0

    def cudaStreamDestroy(self, stream) -> int:  # noqa: N802
        self.streams.discard(stream.value)
        return 0


# ------------------------------------------------------------------ installing it


def reset_polygraphy_tensorrt() -> None:
    """Make Polygraphy import `tensorrt` again and make a new process logger, as in a fresh process."""
    import importlib

    from polygraphy.backend.trt import util as trt_util

    for module_name in ("polygraphy.backend.trt.loader", "polygraphy.backend.trt.config", "polygraphy.backend.trt.util",
                        "polygraphy.backend.trt.runner", "polygraphy.backend.trt.profile", "polygraphy.backend.trt.file_reader",
                        "polygraphy.backend.trt.calibrator", "polygraphy.backend.trt.algorithm_selector",
                        "polygraphy.datatype.tensorrt"):
        module = importlib.import_module(module_name)
        lazy = getattr(module, "trt", None)
        if lazy is not None and type(lazy).__name__ == "LazyModule":
            object.__setattr__(lazy, "module", None)
    trt_util.TRT_LOGGER = None


def install(monkeypatch, api: StubApi, version: str, *, gpu: tuple[str, str] = ("Orin (nvgpu)", "8.7"),
            **options) -> FakeTensorRT:
    """sys.modules['tensorrt'] = a fake of this version; a fake GPU (name, compute capability) and CUDA runtime.

    `tensorrt_status()` and `local_tensorrt()` then run for real against them:
    only the GPU query (libcuda) and libcudart are replaced.
    """
    from polygraphy.cuda import cuda as polygraphy_cuda

    from pipeline.trt import engine as engine_module

    fake = FakeTensorRT(api, version, **options)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(engine_module, "local_gpu", lambda: gpu)
    wrapper = polygraphy_cuda.Cuda.__new__(polygraphy_cuda.Cuda)
    wrapper.handle = FakeCudaRuntime()
    monkeypatch.setattr(polygraphy_cuda, "G_CUDA", wrapper)
    reset_polygraphy_tensorrt()
    monkeypatch.setattr(engine_module.TensorRTLog, "_instance", None)
    return fake
