"""Static check of every TensorRT name the engine stage and the TensorRT runner use.

TensorRT cannot be installed here, so its calls are checked against the API
that tensorrt-stubs 10.13 describes (install: pip install --no-deps
tensorrt-stubs==10.13.0.35.1) and against the names TensorRT 11 removed
(NVIDIA's "Migrating from TensorRT 10.x to 11.x", removed Python APIs).

What is checked:
- every attribute chain on the tensorrt module (`trt.BuilderFlag.INT8`, `trt.ILogger.Severity.ERROR`);
- every attribute or method used on a variable whose name says which TensorRT
  object it holds (VARIABLE_TYPES: `builder`, `config`, `network`, `engine`,
  `context`, ... and `self._engine` style attributes), including the names
  probed with hasattr(obj, "name");
- that names removed in 11.x appear only in `_legacy_*` functions, and that
  those are called only under a weak-typing / pre-11 guard.

The stub files have syntax slips (e.g. a non-default argument after a default
one), so they are parsed tolerantly: a line that does not parse is replaced
by a neutral stand-in and parsing retried; failing that, names are pulled out
with regular expressions.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHECKED_FILES = (REPO / "pipeline" / "trt" / "engine.py", REPO / "pipeline" / "trt" / "runner.py")
MODULE_ALIASES = frozenset({"trt", "tensorrt"})

# Which TensorRT class a variable (or self._attribute) of this name holds.
VARIABLE_TYPES = {
    "builder": "Builder",
    "network": "INetworkDefinition",
    "config": "IBuilderConfig",
    "parser": "OnnxParser",
    "parser_error": "ParserError",
    "profile": "IOptimizationProfile",
    "runtime": "Runtime",
    "engine": "ICudaEngine",
    "context": "IExecutionContext",
    "inspector": "EngineInspector",
    "timing_cache": "ITimingCache",
    "serialized": "IHostMemory",
    "layer": "ILayer",
    "tensor": "ITensor",
}

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
LEGACY_PREFIX = "_legacy_"
# A legacy function may be called only under `if uses_weak_typing(...)` or `if major < N` (N <= 11).
GUARD_PATTERN = re.compile(r"^(uses_weak_typing\(.*\)|major\s*<\s*(\d+))$")


# --------------------------------------------------------------- stub API


@dataclass
class ClassInfo:
    name: str
    bases: list[str] = field(default_factory=list)
    members: set[str] = field(default_factory=set)
    nested: dict[str, "ClassInfo"] = field(default_factory=dict)


@dataclass
class StubApi:
    module_names: set[str] = field(default_factory=set)
    classes: dict[str, ClassInfo] = field(default_factory=dict)

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


IVAR = re.compile(r":ivar\s+(\w+)\s*:")


def _class_from_ast(node: ast.ClassDef) -> ClassInfo:
    info = ClassInfo(name=node.name, bases=[_base_name(base) for base in node.bases])
    info.members |= set(IVAR.findall(ast.get_docstring(node) or ""))
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            info.members.add(item.name)
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
    if tree is None:
        return api_from_regex(text), "regex"
    return _api_from_ast(tree), "ast" if repairs == 0 else f"ast+{repairs} repairs"


def find_stub_files() -> list[Path] | None:
    for entry in map(Path, sys.path):
        bindings = entry / "tensorrt_bindings" / "tensorrt.pyi"
        if bindings.is_file():
            files = [bindings, entry / "tensorrt_bindings" / "__init__.pyi", entry / "tensorrt" / "__init__.pyi"]
            return [f for f in files if f.is_file()]
    return None


@pytest.fixture(scope="module")
def stub_api() -> StubApi:
    files = find_stub_files()
    if files is None:
        pytest.skip("tensorrt-stubs not installed: pip install --no-deps tensorrt-stubs==10.13.0.35.1")
    api = StubApi()
    for path in files:
        api.merge(load_stub_file(path)[0])
    return api


# ----------------------------------------------------------- code scanner


@dataclass(frozen=True)
class Use:
    kind: str  # "module" (chain on trt) or "member" (attribute of a typed object)
    owner: str  # "" for module uses, else the TensorRT class
    chain: tuple[str, ...]
    line: int
    function: str

    def describe(self, path: str) -> str:
        name = "trt." + ".".join(self.chain) if self.kind == "module" else f"{self.owner}.{self.chain[0]}"
        return f"{path}:{self.line} in {self.function or '<module>'}: {name}"


def _attribute_chain(node: ast.Attribute) -> tuple[str, tuple[str, ...]] | None:
    """("trt", ("BuilderFlag", "INT8")) for trt.BuilderFlag.INT8; None unless rooted at a plain name."""
    parts = []
    current: ast.expr = node
    while isinstance(current, ast.Attribute):
        parts.append(current.attr)
        current = current.value
    if isinstance(current, ast.Name):
        return current.id, tuple(reversed(parts))
    return None


def _typed_owner(node: ast.expr) -> str | None:
    """The TensorRT class a name (or self._name) holds, from VARIABLE_TYPES."""
    if isinstance(node, ast.Name):
        return VARIABLE_TYPES.get(node.id)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return VARIABLE_TYPES.get(node.attr.lstrip("_"))
    return None


class _Scanner(ast.NodeVisitor):
    def __init__(self) -> None:
        self.uses: list[Use] = []
        self.legacy_calls: list[tuple[str, int, str | None]] = []  # (callee, line, guard)
        self._function: list[str] = []
        self._guards: list[str] = []

    @property
    def function(self) -> str:
        return self._function[-1] if self._function else ""

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._function.append(node.name)
        self.generic_visit(node)
        self._function.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_If(self, node: ast.If) -> None:
        self.visit(node.test)
        self._guards.append(ast.unparse(node.test))
        for statement in node.body:
            self.visit(statement)
        self._guards.pop()
        for statement in node.orelse:
            self.visit(statement)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        rooted = _attribute_chain(node)
        if rooted and rooted[0] in MODULE_ALIASES:
            self.uses.append(Use("module", "", rooted[1], node.lineno, self.function))
            return  # the chain is recorded whole; do not record its prefixes again
        owner = _typed_owner(node.value)
        if owner:
            self.uses.append(Use("member", owner, (node.attr,), node.lineno, self.function))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("hasattr", "getattr") and len(node.args) >= 2:
            probed, name = node.args[0], node.args[1]
            owner = _typed_owner(probed)
            if owner and isinstance(name, ast.Constant) and isinstance(name.value, str):
                self.uses.append(Use("member", owner, (name.value,), node.lineno, self.function))
        if isinstance(func, ast.Name) and func.id.startswith(LEGACY_PREFIX):
            self.legacy_calls.append((func.id, node.lineno, self._guards[-1] if self._guards else None))
        self.generic_visit(node)


def scan_source(source: str) -> _Scanner:
    scanner = _Scanner()
    scanner.visit(ast.parse(source))
    return scanner


# ---------------------------------------------------------------- checks


def resolve_module_chain(api: StubApi, chain: tuple[str, ...]) -> str | None:
    """None when trt.<chain> exists in the stubs, else what is missing."""
    head, rest = chain[0], chain[1:]
    if head not in api.module_names:
        return f"tensorrt has no '{head}'"
    info = api.classes.get(head)
    for attr in rest:
        if info is None:
            return None  # an attribute of a non-class value: beyond what the stubs type
        if attr in info.nested:
            info = info.nested[attr]
            continue
        if attr not in api.members(info.name) | set(info.members):
            return f"'{info.name}' has no '{attr}'"
        info = None
    return None


def _nested_members(api: StubApi, info: ClassInfo) -> set[str]:
    return api.members(info.name) | set(info.members) | set(info.nested)


def check_uses(api: StubApi, scanner: _Scanner) -> list[tuple[Use, str]]:
    """Uses of names the stubs do not declare."""
    problems = []
    for use in scanner.uses:
        if use.kind == "module":
            missing = resolve_module_chain(api, use.chain)
        else:
            missing = None if use.chain[0] in api.members(use.owner) else f"'{use.owner}' has no '{use.chain[0]}'"
            if use.owner not in api.classes:
                missing = f"no class '{use.owner}' in the stubs (fix VARIABLE_TYPES)"
        if missing:
            problems.append((use, missing))
    return problems


def removed_in_11(use: Use) -> bool:
    if use.kind == "module":
        return any(use.chain[: len(removed)] == removed for removed in REMOVED_MODULE_CHAINS)
    return use.chain[0] in REMOVED_MEMBERS.get(use.owner, frozenset())


def check_removed_names(scanner: _Scanner) -> list[Use]:
    """Uses of 11.x-removed names outside the legacy (8.x/10.x-only) functions."""
    return [use for use in scanner.uses if removed_in_11(use) and not use.function.startswith(LEGACY_PREFIX)]


def check_legacy_guards(scanner: _Scanner) -> list[tuple[str, int, str | None]]:
    """Calls of legacy functions not under a weak-typing or pre-11 guard."""
    bad = []
    for callee, line, guard in scanner.legacy_calls:
        match = GUARD_PATTERN.match(guard or "")
        if not match or (match.group(2) is not None and int(match.group(2)) > 11):
            bad.append((callee, line, guard))
    return bad


# ----------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def scans() -> dict[str, _Scanner]:
    return {str(path.relative_to(REPO)): scan_source(path.read_text()) for path in CHECKED_FILES}


def test_stubs_are_read_despite_their_syntax_slips():
    files = find_stub_files()
    if files is None:
        pytest.skip("tensorrt-stubs not installed: pip install --no-deps tensorrt-stubs==10.13.0.35.1")
    api, how = load_stub_file(files[0])
    assert how != "regex", "the line-repair parser should cope with the stub's slips"
    assert {"Builder", "IBuilderConfig", "OnnxParser", "ICudaEngine", "IExecutionContext"} <= set(api.classes)
    assert "set_memory_pool_limit" in api.members("IBuilderConfig")
    assert "num_DLA_cores" in api.members("Builder")  # declared only as :ivar / property


def test_regex_fallback_reads_an_unparseable_stub():
    text = (
        "class Good:\n"
        '    """\n        :ivar depth: :class:`int` how deep\n    """\n'
        "    width: int\n"
        "    def method(self, a: int = 1, b) -> None:\n        ...\n"
        "    class Inner:\n        VALUE: int\n"
        "def f(x = 1, y)\n"  # missing colon too: not repairable line by line
        "class Child(Good):\n    def extra(self) -> None: ...\n"
    )
    assert parse_tolerantly(text)[0] is None
    api = api_from_regex(text)
    assert {"depth", "width", "method"} <= api.members("Good")
    assert "VALUE" in api.classes["Good"].nested["Inner"].members
    assert {"extra", "method"} <= api.members("Child")
    assert "f" in api.module_names


def test_every_tensorrt_name_used_exists_in_the_stubs(stub_api, scans):
    problems = [f"{use.describe(path)}: {why}" for path, scanner in scans.items() for use, why in check_uses(stub_api, scanner)]
    assert not problems, "TensorRT names not in tensorrt-stubs 10.13:\n" + "\n".join(problems)


def test_the_scan_sees_the_calls_that_matter(scans):
    """Guards the scanner itself: if variable names drift, uses would silently go unchecked."""
    seen = {(use.owner, use.chain[0]) for scanner in scans.values() for use in scanner.uses if use.kind == "member"}
    seen |= {("trt", ".".join(use.chain)) for scanner in scans.values() for use in scanner.uses if use.kind == "module"}
    expected = {
        ("Builder", "build_serialized_network"), ("Builder", "create_network"), ("Builder", "num_DLA_cores"),
        ("IBuilderConfig", "set_memory_pool_limit"), ("IBuilderConfig", "builder_optimization_level"),
        ("IBuilderConfig", "create_timing_cache"), ("IBuilderConfig", "set_timing_cache"),
        ("IBuilderConfig", "profiling_verbosity"), ("IBuilderConfig", "DLA_core"), ("IBuilderConfig", "can_run_on_DLA"),
        ("OnnxParser", "parse"), ("OnnxParser", "get_error"), ("ParserError", "desc"),
        ("IOptimizationProfile", "set_shape"), ("ICudaEngine", "create_engine_inspector"),
        ("EngineInspector", "get_engine_information"), ("IExecutionContext", "set_input_shape"),
        ("IExecutionContext", "set_tensor_address"), ("IExecutionContext", "execute_async_v3"),
        ("ICudaEngine", "get_tensor_profile_shape"), ("Runtime", "deserialize_cuda_engine"),
        ("trt", "BuilderFlag.INT8"), ("trt", "BuilderFlag.FP16"), ("trt", "BuilderFlag.GPU_FALLBACK"),
        ("trt", "NetworkDefinitionCreationFlag.STRONGLY_TYPED"), ("trt", "ProfilingVerbosity.DETAILED"),
        ("trt", "MemoryPoolType.WORKSPACE"), ("trt", "DeviceType.DLA"), ("trt", "LayerInformationFormat.JSON"),
    }
    assert not expected - seen, f"not found by the scan: {sorted(expected - seen)}"


def test_the_11x_path_uses_no_name_tensorrt_11_removed(scans):
    problems = [use.describe(path) for path, scanner in scans.items() for use in check_removed_names(scanner)]
    assert not problems, "names removed in TensorRT 11 outside _legacy_* functions:\n" + "\n".join(problems)


def test_legacy_functions_run_only_under_a_version_guard(scans):
    calls = [(path, call) for path, scanner in scans.items() for call in scanner.legacy_calls]
    assert calls, "expected the 8.x/10.x precision flags to live in _legacy_* functions"
    bad = [f"{path}:{line} {callee}() under {guard!r}" for path, scanner in scans.items()
           for callee, line, guard in check_legacy_guards(scanner)]
    assert not bad, "legacy (weak typing / explicit batch) calls reachable on TensorRT 11:\n" + "\n".join(bad)


def test_legacy_functions_hold_the_removed_flags(scans):
    engine_scan = scans["pipeline/trt/engine.py"]
    legacy = {".".join(use.chain) for use in engine_scan.uses if use.function.startswith(LEGACY_PREFIX)}
    assert {"BuilderFlag.INT8", "BuilderFlag.FP16", "NetworkDefinitionCreationFlag.EXPLICIT_BATCH"} <= legacy


MISSPELLED = '''
def build(trt, builder, network):
    config = builder.create_builder_config()
    config.set_memry_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
    config.set_flag(trt.BuilderFlag.INT9)
    parser = trt.OnnxParsr(network, None)
    engine = builder.build_serialized_network(network, config)
    context = engine.create_execution_context()
    context.execute_async_v4(0)
    return hasattr(config, "builder_optimisation_level")
'''


def test_the_checker_catches_misspelled_names(stub_api):
    problems = {why for _, why in check_uses(stub_api, scan_source(MISSPELLED))}
    assert problems == {
        "'IBuilderConfig' has no 'set_memry_pool_limit'",
        "'BuilderFlag' has no 'INT9'",
        "tensorrt has no 'OnnxParsr'",
        "'IExecutionContext' has no 'execute_async_v4'",
        "'IBuilderConfig' has no 'builder_optimisation_level'",
    }


REMOVED_USE = '''
def configure(trt, config, major):
    config.set_flag(trt.BuilderFlag.FP16)
    config.int8_calibrator = None
    if major < 12:
        _legacy_flags(trt, config)
    _legacy_flags(trt, config)

def _legacy_flags(trt, config):
    config.set_flag(trt.BuilderFlag.INT8)
'''


def test_the_checker_catches_removed_names_and_unguarded_legacy_calls():
    scanner = scan_source(REMOVED_USE)
    removed = {(use.owner or "trt", ".".join(use.chain)) for use in check_removed_names(scanner)}
    assert removed == {("trt", "BuilderFlag.FP16"), ("IBuilderConfig", "int8_calibrator")}
    assert [(callee, guard) for callee, _, guard in check_legacy_guards(scanner)] == [
        ("_legacy_flags", "major < 12"), ("_legacy_flags", None)]


# ------------------------------------------------------------------------
# build_engine's call sequence, run against a recording double of TensorRT.
# The double is built from the stubs: touching a name the stubs (10.13) do not
# declare, or one TensorRT 11 removed when it plays 11.x, raises AttributeError.
# It checks the orchestration per major version; TensorRT itself runs only in
# tests/test_trt_runner.py, which skips without TensorRT and a GPU.

import json as _json  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as _np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pipeline.errors import InputError  # noqa: E402
from pipeline.trt import engine as engine_module  # noqa: E402
from pipeline.targets import resolve_target  # noqa: E402

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
}

INSPECTOR_JSON = _json.dumps({"Layers": [
    {"Name": "image_head", "LayerType": "CaskGemmMatrixMultiply", "Inputs": [{"Name": "x", "Format/Datatype": "Int8"}],
     "Outputs": [{"Name": "y", "Format/Datatype": "Row major linear FP32"}]},
    {"Name": "text_head", "LayerType": "CaskGemmMatrixMultiply", "Inputs": [{"Name": "t", "Format/Datatype": "Half"}]},
    {"Name": "fuse", "LayerType": "PointWiseV2", "Inputs": [{"Name": "a", "DataType": "Float"}]},
], "Bindings": ["image", "logits"]})


class _Enum:
    def __init__(self, path: str, value: int):
        self.path, self.value = path, value

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return self.path

    def __eq__(self, other) -> bool:
        return isinstance(other, _Enum) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)


class _Double:
    """An instance of a TensorRT class: attributes checked against the stubs, calls recorded."""

    def __init__(self, world: "_FakeTensorRT", class_name: str, **state):
        object.__setattr__(self, "_world", world)
        object.__setattr__(self, "_class", class_name)
        object.__setattr__(self, "_state", state)

    def __getattr__(self, name: str):
        world, class_name = self._world, self._class
        world.check_member(class_name, name)
        behaviour = world.behaviour(self, name)
        if callable(behaviour):
            def call(*args, **kwargs):
                world.calls.append((f"{class_name}.{name}", args, kwargs))
                return behaviour(*args, **kwargs)
            return call
        return behaviour

    def __setattr__(self, name: str, value) -> None:
        self._world.check_member(self._class, name)
        self._world.calls.append((f"{self._class}.{name} =", (value,), {}))
        self._state[name] = value


class _FakeTensorRT:
    """The `tensorrt` module as the engine stage sees it, for one TensorRT version."""

    def __init__(self, api: StubApi, version: str, *, dla_cores: int = 0, parse_ok: bool = True,
                 build_ok: bool = True, cache_accepted: bool = True, cache_available: bool = True,
                 inspector_json: str | None = None):
        self.api, self.__version__, self.major = api, version, int(version.split(".")[0])
        self.version = tuple(int(part) for part in version.split(".")[:2])
        self.dla_cores, self.parse_ok, self.build_ok = dla_cores, parse_ok, build_ok
        # set_timing_cache's answer (False: device/version mismatch) and whether get_timing_cache has one
        self.cache_accepted, self.cache_available = cache_accepted, cache_available
        self.inspector_json = inspector_json or INSPECTOR_JSON
        self.calls: list[tuple[str, tuple, dict]] = []
        # TensorRT keeps the first logger given to a Builder or Runtime in a process (TensorRT#1475):
        # everything later is logged there, whatever logger a later Builder/Runtime was given.
        self.kept_logger = None
        severity = SimpleNamespace(**{n: _Enum(f"Severity.{n}", i) for i, n in enumerate(
            ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"])})
        self.ILogger = type("ILogger", (), {"Severity": severity, "__init__": lambda self: None})

    # -- the stubs decide which names exist
    def removed(self, class_name: str, name: str) -> bool:
        if self.version < ADDED_IN.get((class_name, name), (0, 0)):
            return True  # not there yet in the version played (the stubs are 10.13)
        return self.major >= 11 and (name in REMOVED_MEMBERS.get(class_name, ()) or (class_name, name) in REMOVED_MODULE_CHAINS)

    def check_member(self, class_name: str, name: str) -> None:
        if name not in self.api.members(class_name) or self.removed(class_name, name):
            raise AttributeError(f"TensorRT {self.__version__}: '{class_name}' has no attribute '{name}'")

    def __getattr__(self, name: str):
        if (name not in self.api.module_names or (self.major >= 11 and (name,) in REMOVED_MODULE_CHAINS)
                or self.version < ADDED_IN.get((name,), (0, 0))):
            raise AttributeError(f"module 'tensorrt' {self.__version__} has no attribute '{name}'")
        if name in ("Builder", "Runtime"):
            def construct(logger):
                self.calls.append((name, (logger,), {}))
                return _Double(self, name, logger=self.keep_logger(logger))
            return construct
        if name == "OnnxParser":
            return lambda network, logger: _Double(self, name, logger=logger)
        members = self.api.classes[name].members
        return SimpleNamespace(**{m: _Enum(f"{name}.{m}", i) for i, m in enumerate(sorted(members))
                                  if m.isupper() and not self.removed(name, m)})

    def keep_logger(self, logger):
        if self.kept_logger is None:
            self.kept_logger = logger
        return self.kept_logger

    def log(self, severity: str, message: str) -> None:
        """What TensorRT logs goes to the first logger it was given, not to the caller's."""
        if self.kept_logger is not None:
            self.kept_logger.log(getattr(self.ILogger.Severity, severity), message)

    def _build(self, network, config):
        if not self.build_ok:
            self.log("ERROR", "[network.cpp::validate] Error Code 4: Internal Error (image: dynamic input is missing dimensions in profile 0.)")
            return None
        if "BuilderFlag.VERSION_COMPATIBLE" in {repr(args[0]) for args in self.called("IBuilderConfig.set_flag")}:
            return b"VC-PLAN-BYTES"  # embeds the lean runtime (host code)
        return b"PLAN-BYTES"

    def _deserialize(self, runtime, plan):
        # The runtime refuses a plan with host code (a version-compatible plan embeds the lean
        # runtime) unless runtime.engine_host_code_allowed is set (stubs 10.13: "Whether this runtime
        # is allowed to deserialize engines that contain host executable code (Default: False)";
        # Polygraphy's EngineFromBytes sets it for version-compatible plans). Like every failed
        # deserialization it logs an error and returns None; the message text here is the fake's own.
        if bytes(plan).startswith(b"VC-") and not runtime._state.get("engine_host_code_allowed"):
            self.log("ERROR", "IRuntime::deserializeCudaEngine: (fake) the plan contains host code and "
                              "engine_host_code_allowed is false")
            return None
        return _Double(self, "ICudaEngine")

    def _parse(self, data, path=None):
        if not self.parse_ok:
            self.log("ERROR", "ModelImporter.cpp:949: While parsing node number 5 [NonMaxSuppression -> \"boxes\"]: "
                              "no importer registered for op: NonMaxSuppression")
        return self.parse_ok

    def _set_timing_cache(self, config, cache, ignore_mismatch):
        config._state["timing_cache"] = cache if self.cache_accepted else None
        return self.cache_accepted

    def _get_timing_cache(self, config):
        return config._state.get("timing_cache") if self.cache_available else None

    # -- what the doubles return
    def behaviour(self, obj: _Double, name: str):
        state = obj._state
        table = {
            ("Builder", "create_network"): lambda flags=0: _Double(self, "INetworkDefinition"),
            ("Builder", "create_builder_config"): lambda: _Double(self, "IBuilderConfig"),
            ("Builder", "create_optimization_profile"): lambda: _Double(self, "IOptimizationProfile"),
            ("Builder", "num_DLA_cores"): self.dla_cores,
            ("Builder", "build_serialized_network"): self._build,
            ("INetworkDefinition", "num_inputs"): 1,
            ("INetworkDefinition", "get_input"): lambda i: _Double(self, "ITensor", name="image", shape=(-1, 3, 4, 4)),
            ("INetworkDefinition", "num_layers"): 2,
            ("INetworkDefinition", "get_layer"): lambda i: _Double(self, "ILayer", name=["gather", "conv"][i]),
            ("ITensor", "name"): state.get("name"),
            ("ITensor", "shape"): state.get("shape"),
            ("ILayer", "name"): state.get("name"),
            ("IBuilderConfig", "can_run_on_DLA"): lambda layer: layer._state["name"] != "gather",
            ("IBuilderConfig", "create_timing_cache"): lambda data: _Double(self, "ITimingCache", data=bytes(data)),
            ("IBuilderConfig", "get_timing_cache"): lambda: self._get_timing_cache(obj),
            ("IBuilderConfig", "set_timing_cache"): lambda cache, ignore_mismatch: self._set_timing_cache(obj, cache, ignore_mismatch),
            ("ITimingCache", "serialize"): lambda: b"CACHE",
            ("ITimingCache", "combine"): lambda input_cache, ignore_mismatch: True,
            ("OnnxParser", "parse"): self._parse,
            ("OnnxParser", "num_errors"): 1,
            ("OnnxParser", "get_error"): lambda i: _Double(self, "ParserError"),
            ("ParserError", "node"): lambda: 5,
            ("ParserError", "node_name"): lambda: "",
            ("ParserError", "desc"): lambda: "no importer for op",
            ("ParserError", "code"): lambda: 8,
            ("Runtime", "deserialize_cuda_engine"): lambda plan: self._deserialize(obj, plan),
            ("ICudaEngine", "create_engine_inspector"): lambda: _Double(self, "EngineInspector"),
            ("ICudaEngine", "num_io_tensors"): 0,
            ("EngineInspector", "get_engine_information"): lambda fmt: self.inspector_json,
        }
        return table.get((obj._class, name), lambda *args, **kwargs: None)

    def called(self, name: str) -> list[tuple]:
        return [args for called, args, _ in self.calls if called == name]


def _tiny_onnx(path: Path) -> Path:
    weight = numpy_helper.from_array(_np.ones((48, 3), _np.float32), "w")
    nodes = [helper.make_node("Flatten", ["image"], ["flat"], name="flatten"),
             helper.make_node("MatMul", ["flat", "w"], ["logits"], name="image_head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def fake_tensorrt(stub_api, monkeypatch):
    def install(version: str, **options) -> _FakeTensorRT:
        fake = _FakeTensorRT(stub_api, version, **options)
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        monkeypatch.setattr(engine_module, "local_tensorrt", lambda: engine_module.LocalTensorRT(
            tensorrt_version=version, device_name="Orin (nvgpu)", compute_capability="8.7"))
        return fake
    return install


def _flags(fake: _FakeTensorRT) -> set[str]:
    return {repr(args[0]) for args in fake.called("IBuilderConfig.set_flag")}


def test_double_build_on_10x_is_weakly_typed_with_int8_and_fp16(tmp_path, fake_tensorrt):
    fake = fake_tensorrt("10.3.0.30")
    result = engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), resolve_target("jetson"), tmp_path / "w", tmp_path / "cache")
    assert fake.called("Builder.create_network") == [(0,)]
    assert _flags(fake) == {"BuilderFlag.INT8", "BuilderFlag.FP16"}
    assert fake.called("IBuilderConfig.set_memory_pool_limit") == [(fake.MemoryPoolType.WORKSPACE, 1024 << 20)]
    assert fake.called("IBuilderConfig.builder_optimization_level =") == [(3,)]
    assert [repr(a[0]) for a in fake.called("IBuilderConfig.profiling_verbosity =")] == ["ProfilingVerbosity.DETAILED"]
    assert fake.called("IOptimizationProfile.set_shape") == [("image", (1, 3, 4, 4), (8, 3, 4, 4), (32, 3, 4, 4))]
    assert result.plan_path.read_bytes() == b"PLAN-BYTES"  # plain plan, no header
    sidecar = _json.loads(result.metadata_path.read_text())
    assert sidecar["tensorrt_version"] == "10.3.0.30" and sidecar["typing"] == "weak"
    assert sidecar["layer_precisions"] == {"int8": 1, "fp16": 1, "fp32": 1}
    assert result.float_compute_layers == ("text_head",)
    assert result.timing_cache_path.read_bytes() == b"CACHE"
    assert "trt-10.3.0.30" in result.timing_cache_path.name and "orin" in result.timing_cache_path.name


def test_double_build_on_11x_sets_no_precision_flag(tmp_path, fake_tensorrt):
    fake = fake_tensorrt("11.4.1")  # BuilderFlag.INT8/FP16, EXPLICIT_BATCH, calibrators... raise here
    result = engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), resolve_target("jetson"), tmp_path / "w", None)
    assert fake.called("Builder.create_network") == [(0,)]
    assert _flags(fake) == set()
    assert result.typing == "strong" and result.timing_cache_path is None


def test_double_build_on_10x_opting_into_strong_typing(tmp_path, fake_tensorrt):
    fake = fake_tensorrt("10.13.0.35")
    target = resolve_target("jetson-thor")
    target = dataclasses_replace_builder(target, network_typing="strong")
    engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), target, tmp_path / "w", None)
    strongly_typed = int(fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert fake.called("Builder.create_network") == [(1 << strongly_typed,)]
    assert _flags(fake) == set()


def test_double_build_on_8x_uses_explicit_batch(tmp_path, fake_tensorrt):
    fake = fake_tensorrt("8.5.2.2")
    result = engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), resolve_target("jetson-xavier-nx"), tmp_path / "w", None)
    explicit = int(fake.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    assert fake.called("Builder.create_network") == [(1 << explicit,)]
    assert _flags(fake) == {"BuilderFlag.INT8", "BuilderFlag.FP16"}
    assert any("optimization level" in note for note in result.notes)


def test_double_build_for_dla(tmp_path, fake_tensorrt):
    fake = fake_tensorrt("10.3.0.30", dla_cores=2)
    result = engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), resolve_target("jetson-agx-orin"), tmp_path / "w", None)
    assert [repr(a[0]) for a in fake.called("IBuilderConfig.default_device_type =")] == ["DeviceType.DLA"]
    assert fake.called("IBuilderConfig.DLA_core =") == [(0,)]
    assert "BuilderFlag.GPU_FALLBACK" in _flags(fake)
    assert fake.called("IOptimizationProfile.set_shape") == [("image", (8, 3, 4, 4), (8, 3, 4, 4), (8, 3, 4, 4))]
    assert result.gpu_fallback_layers == ("gather",)


def test_double_build_for_dla_on_a_device_without_it(tmp_path, fake_tensorrt):
    fake_tensorrt("10.3.0.30", dla_cores=0)
    with pytest.raises(InputError, match="DLA core 0 but this device reports 0"):
        engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), resolve_target("jetson-agx-orin"), tmp_path / "w", None)


def test_double_parser_error_names_the_onnx_node(tmp_path, fake_tensorrt):
    fake_tensorrt("10.3.0.30", parse_ok=False)
    model = _tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(InputError, match=r"node 5 .*no importer for op"):
        engine_module.build_engine(model, resolve_target("jetson"), tmp_path / "w", None)
    # node 5 is out of range for this 2-node model; index 1 is named from the ONNX file:
    assert "image_head (MatMul)" in engine_module._describe_parser_error(
        SimpleNamespace(node=lambda: 1, desc=lambda: "bad", code=lambda: 1), engine_module._onnx_node_labels(model))


def test_inspector_json_of_10x_and_11x():
    layers = engine_module.parse_engine_information(INSPECTOR_JSON)
    assert [(info.name, info.precision) for info in layers] == [("image_head", "int8"), ("text_head", "fp16"), ("fuse", "fp32")]
    names_only = engine_module.parse_engine_information(_json.dumps({"Layers": ["a", "b"]}))
    assert [info.precision for info in names_only] == ["unknown", "unknown"]


def dataclasses_replace_builder(target, **changes):
    import dataclasses

    return dataclasses.replace(target, builder=dataclasses.replace(target.builder, **changes))


# ------------------------------------------------------------------------
# Versions, version-compatible plans, timing cache, the process logger, real inspector dumps.

import copy as _copy  # noqa: E402
import fcntl as _fcntl  # noqa: E402

from pipeline.errors import PipelineError  # noqa: E402

from trex_engine_excerpt import MOBILENET_QAT_EXCERPT  # noqa: E402  (tests/ is on sys.path)


def _jetson(**builder_changes):
    return dataclasses_replace_builder(resolve_target("jetson"), **builder_changes)


def test_double_same_compute_capability_on_10_3_is_refused_naming_the_target_key(tmp_path, fake_tensorrt):
    fake_tensorrt("10.3.0.30")  # JetPack 6: HardwareCompatibilityLevel has NONE and AMPERE_PLUS only
    with pytest.raises(InputError, match=r"builder\.hardware_compatibility.*same_compute_capability.*10\.3\.0\.30"):
        engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), _jetson(hardware_compatibility="same_compute_capability"),
                                   tmp_path / "w", None)


def test_double_hardware_compatibility_levels_per_version(tmp_path, fake_tensorrt):
    fake = fake_tensorrt("10.3.0.30")
    engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), _jetson(hardware_compatibility="ampere_plus"), tmp_path / "a", None)
    assert [repr(a[0]) for a in fake.called("IBuilderConfig.hardware_compatibility_level =")] == ["HardwareCompatibilityLevel.AMPERE_PLUS"]
    fake = fake_tensorrt("10.13.0.35")
    engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), _jetson(hardware_compatibility="same_compute_capability"),
                               tmp_path / "b", None)
    assert [repr(a[0]) for a in fake.called("IBuilderConfig.hardware_compatibility_level =")] == [
        "HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY"]


def test_double_8_5_refuses_compatibility_settings_it_lacks(tmp_path, fake_tensorrt):
    fake_tensorrt("8.5.2.2")  # JetPack 5: no hardware or version compatibility (both 8.6)
    model = _tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(InputError, match=r"builder\.hardware_compatibility.*8\.5\.2\.2"):
        engine_module.build_engine(model, _jetson(hardware_compatibility="ampere_plus"), tmp_path / "w", None)
    with pytest.raises(InputError, match=r"builder\.version_compatible.*8\.5\.2\.2"):
        engine_module.build_engine(model, _jetson(version_compatible=True), tmp_path / "w", None)


def test_double_version_compatible_plan_is_loaded_back_with_host_code_allowed(tmp_path, fake_tensorrt):
    fake = fake_tensorrt("10.3.0.30")
    result = engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), _jetson(version_compatible=True), tmp_path / "w", None)
    assert "BuilderFlag.VERSION_COMPATIBLE" in _flags(fake)
    assert fake.called("Runtime.engine_host_code_allowed =") == [(True,)]
    assert result.plan_path.read_bytes() == b"VC-PLAN-BYTES" and result.metadata["version_compatible"] is True


def test_double_fake_runtime_refuses_a_version_compatible_plan_without_host_code(fake_tensorrt):
    fake = fake_tensorrt("10.3.0.30")
    runtime = fake.Runtime(None)
    assert runtime.deserialize_cuda_engine(b"VC-PLAN-BYTES") is None
    runtime.engine_host_code_allowed = True
    assert runtime.deserialize_cuda_engine(b"VC-PLAN-BYTES") is not None


def test_double_rejected_timing_cache_is_reported_and_the_build_goes_on(tmp_path, fake_tensorrt):
    fake = fake_tensorrt("10.3.0.30", cache_accepted=False)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    name = engine_module.timing_cache_name(resolve_target("jetson").name, "10.3.0.30", "Orin (nvgpu)", "8.7")
    (cache_dir / name).write_bytes(b"FROM-ANOTHER-DEVICE")
    result = engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), resolve_target("jetson"), tmp_path / "w", cache_dir)
    assert result.plan_path.read_bytes() == b"PLAN-BYTES"
    assert any("timing cache" in w and "rejected" in w for w in result.metadata["warnings"]), result.metadata["warnings"]
    assert any("rejected" in w for w in _json.loads(result.metadata_path.read_text())["warnings"])
    assert fake.called("Builder.build_serialized_network")


def test_double_missing_timing_cache_after_the_build_is_not_written(tmp_path, fake_tensorrt):
    fake_tensorrt("10.3.0.30", cache_available=False)  # config.get_timing_cache() returns None
    result = engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), resolve_target("jetson"), tmp_path / "w", tmp_path / "cache")
    assert not result.timing_cache_path.exists()
    assert any("timing cache" in w for w in result.metadata["warnings"])


def test_double_timing_cache_is_combined_with_the_file_under_a_lock_and_written_atomically(tmp_path, fake_tensorrt, monkeypatch):
    fake = fake_tensorrt("10.3.0.30")
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    cache_file = cache_dir / engine_module.timing_cache_name(resolve_target("jetson").name, "10.3.0.30", "Orin (nvgpu)", "8.7")
    cache_file.write_bytes(b"OLD")
    events = []
    real_flock, real_atomic = _fcntl.flock, engine_module.atomic_write_bytes
    monkeypatch.setattr(_fcntl, "flock", lambda fd, op: (events.append(("flock", op)), real_flock(fd, op))[1])
    monkeypatch.setattr(engine_module, "atomic_write_bytes",
                        lambda path, data: (events.append(("write", Path(path).name)), real_atomic(path, data))[1])
    engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), resolve_target("jetson"), tmp_path / "w", cache_dir)
    combined = fake.called("ITimingCache.combine")
    assert len(combined) == 1 and combined[0][0]._state["data"] == b"OLD"  # the file as it was at save time
    assert cache_file.read_bytes() == b"CACHE"
    cache_events = [e for e in events if e[0] == "flock" or e[1] == cache_file.name]
    assert cache_events[0] == ("flock", _fcntl.LOCK_EX) and ("write", cache_file.name) in cache_events
    assert cache_events.index(("write", cache_file.name)) < cache_events.index(("flock", _fcntl.LOCK_UN))


def test_double_second_build_in_a_process_reports_what_tensorrt_logged(tmp_path, fake_tensorrt):
    fake = fake_tensorrt("10.3.0.30")
    model = _tiny_onnx(tmp_path / "m.onnx")
    engine_module.build_engine(model, resolve_target("jetson"), tmp_path / "a", None)  # TensorRT keeps this logger
    fake.parse_ok = False
    with pytest.raises(InputError) as parse_error:
        engine_module.build_engine(model, resolve_target("jetson"), tmp_path / "b", None)
    assert "While parsing node number 5 [NonMaxSuppression" in str(parse_error.value)
    fake.parse_ok, fake.build_ok = True, False
    with pytest.raises(PipelineError) as build_error:
        engine_module.build_engine(model, resolve_target("jetson"), tmp_path / "c", None)
    assert "Error Code 4" in str(build_error.value) and "logged no error" not in str(build_error.value)
    # one logger object for the process: every Builder/Runtime got the same one
    loggers = {id(args[0]) for name, args, _ in fake.calls if name in ("Builder", "Runtime")} | {id(fake.kept_logger)}
    assert len(loggers) == 1


def _trex_layers():
    return _json.loads(MOBILENET_QAT_EXCERPT)["Layers"]


def test_real_trex_dump_is_read_by_parameter_type():
    layers = engine_module.parse_engine_information(MOBILENET_QAT_EXCERPT)
    assert [(info.type, info.precision) for info in layers] == [
        ("Reformat", "fp32"), ("Convolution", "int8"), ("Reformat", "fp16"), ("Convolution", "int8"),
        ("Reformat", "fp16"), ("Pooling", "fp16"), ("Reformat", "fp16"), ("Convolution", "int8"), ("NoOp", "fp32")]
    assert not [info.name for info in layers if engine_module._is_float_compute(info)]


def test_reformat_named_after_a_conv_is_not_a_float_convolution():
    # The TREx Reformat entry (QuantizeLinear_2, FP32 in) under the name TensorRT gives a reformat in front of a
    # conv ("Reformatting CopyNode for Input Tensor 0 to Conv_0", as in TensorRT's layer-information logs).
    reformat = _copy.deepcopy(_trex_layers()[0])
    reformat["Name"] = "Reformatting CopyNode for Input Tensor 0 to Conv_0"
    # The TREx conv entry with its input in half: a convolution the engine really runs in float.
    conv = _copy.deepcopy(_trex_layers()[1])
    conv["Inputs"][0]["Format/Datatype"] = "Thirty-two wide channel vectorized row major FP16 format"
    conv["Weights"]["Type"] = "Half"
    layers = engine_module.parse_engine_information(_json.dumps({"Layers": [reformat, conv]}))
    assert [engine_module._is_float_compute(info) for info in layers] == [False, True]


def test_inspector_11x_keys_are_read():
    # TensorRT 11 ("Migrating IEngineInspector Usage from TensorRT 10.x to 11.x"): "Bindings" became "I/O Tensors"
    # and "Format/DataType" was split into a data type and a format; key spellings differ ("DataType", "Datatype").
    layers = _trex_layers()[:2]
    for layer in layers:
        for tensor in layer["Inputs"] + layer["Outputs"]:
            text = tensor.pop("Format/Datatype")
            tensor["Datatype"] = "Int8" if "Int8" in text else "Float"
            tensor["Format"] = text
    dump = _json.dumps({"Layers": layers, "I/O Tensors": [{"Name": "input1", "IOMode": "Input", "DataType": "Float"}]})
    assert [(info.type, info.precision) for info in engine_module.parse_engine_information(dump)] == [
        ("Reformat", "fp32"), ("Convolution", "int8")]


def test_unreadable_precisions_are_reported_not_an_empty_report(tmp_path, fake_tensorrt):
    layers = _trex_layers()[:2]
    for layer in layers:
        for tensor in layer["Inputs"] + layer["Outputs"]:
            tensor["Format/Datatype"] = "N/A due to dynamic shapes"  # what a dynamic-shape engine reports
        layer.pop("Weights", None)
    fake_tensorrt("10.3.0.30", inspector_json=_json.dumps({"Layers": layers}))
    result = engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), resolve_target("jetson"), tmp_path / "w", None)
    assert result.float_compute_layers == ()
    assert any("precision" in w and "2" in w for w in result.metadata["warnings"]), result.metadata.get("warnings")


def test_dynamic_shape_dump_falls_back_to_the_weights_type():
    conv = _copy.deepcopy(_trex_layers()[1])
    for tensor in conv["Inputs"] + conv["Outputs"]:
        tensor["Format/Datatype"] = "N/A due to dynamic shapes"
    (info,) = engine_module.parse_engine_information(_json.dumps({"Layers": [conv]}))
    assert info.precision == "int8"


def test_runner_loads_a_version_compatible_plan_with_host_code_allowed(tmp_path, fake_tensorrt, monkeypatch):
    import shutil

    import torch

    from pipeline.trt import runner as runner_module

    fake = fake_tensorrt("10.3.0.30")
    monkeypatch.setattr(runner_module, "trt_runner_status", lambda: (True, ""))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: None)  # no GPU here; the fake engine has no I/O
    result = engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), _jetson(version_compatible=True), tmp_path / "w", None)
    with pytest.raises(PipelineError, match="no outputs"):  # i.e. it got past deserializing the plan
        runner_module.TrtRunner(result.plan_path)
    assert fake.called("Runtime.engine_host_code_allowed =") == [(True,), (True,)]  # the build's check, then the runner
    bare = tmp_path / "bare" / "model.plan"  # the same plan without its sidecar (as trtexec leaves it)
    bare.parent.mkdir()
    shutil.copy(result.plan_path, bare)
    with pytest.raises(PipelineError) as error:
        runner_module.TrtRunner(bare)
    assert "engine_host_code_allowed" in str(error.value)  # what TensorRT logged, not a guess
    # one logger in the process: the runner's Runtime got the build's (TensorRT keeps the first anyway)
    given = [args[0] for name, args, _ in fake.calls if name in ("Builder", "Runtime")]
    assert len(given) == 4 and all(logger is fake.kept_logger for logger in given)
