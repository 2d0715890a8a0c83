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

The stub parsing and the per-version fake TensorRT live in tests/trt_fake.py
(shared with tests/test_engine_stage.py). The stub files have syntax slips (e.g. a non-default argument after a default
one), so they are parsed tolerantly: a line that does not parse is replaced
by a neutral stand-in and parsing retried; failing that, names are pulled out
with regular expressions.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from trt_fake import (REMOVED_MEMBERS, REMOVED_MODULE_CHAINS, ClassInfo, StubApi, api_from_regex,  # noqa: F401  (tests/ is on sys.path)
                      find_stub_files, load_stub_api, load_stub_file, parse_tolerantly)

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
LEGACY_PREFIX = "_legacy_"
# A legacy function may be called only under `if uses_weak_typing(...)` or `if major < N` (N <= 11).
GUARD_PATTERN = re.compile(r"^(uses_weak_typing\(.*\)|major\s*<\s*(\d+))$")




@pytest.fixture(scope="module")
def stub_api() -> StubApi:
    api = load_stub_api()
    if api is None:
        pytest.skip("tensorrt-stubs not installed: pip install --no-deps tensorrt-stubs==10.13.0.35.1")
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
    """Guards the scanner itself: if variable names drift, uses would silently go unchecked.

    Since the build and the runner went through Polygraphy, these are the TensorRT calls our own code
    still makes; the calls Polygraphy makes are checked at run time instead, against the same stubs, by
    the fake TensorRT (tests/trt_fake.py) every build below runs through.
    """
    seen = {(use.owner, use.chain[0]) for scanner in scans.values() for use in scanner.uses if use.kind == "member"}
    seen |= {("trt", ".".join(use.chain)) for scanner in scans.values() for use in scanner.uses if use.kind == "module"}
    expected = {
        ("Builder", "num_DLA_cores"), ("IBuilderConfig", "create_timing_cache"), ("IBuilderConfig", "set_timing_cache"),
        ("IBuilderConfig", "get_timing_cache"), ("IBuilderConfig", "DLA_core"), ("IBuilderConfig", "can_run_on_DLA"),
        ("OnnxParser", "parse_from_file"), ("OnnxParser", "get_error"), ("ParserError", "desc"),
        ("ICudaEngine", "create_engine_inspector"), ("EngineInspector", "get_engine_information"),
        ("ICudaEngine", "get_tensor_profile_shape"), ("ICudaEngine", "get_tensor_shape"), ("ITimingCache", "combine"),
        ("trt", "ProfilingVerbosity.DETAILED"), ("trt", "MemoryPoolType.WORKSPACE"), ("trt", "LayerInformationFormat.JSON"),
        ("trt", "TensorIOMode.OUTPUT"), ("trt", "init_libnvinfer_plugins"), ("trt", "OnnxParser"),
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


def test_legacy_functions_hold_the_removed_flags():
    """The precision flags TensorRT 11 removed are asked of Polygraphy's CreateConfig (int8=, fp16=) only in a
    _legacy_* function; EXPLICIT_BATCH is Polygraphy's CreateNetwork's (set before 10 only, loader.py)."""
    tree = ast.parse((REPO / "pipeline" / "trt" / "engine.py").read_text())
    asked: dict[str, set[str]] = {}
    for function in (node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)):
        for node in ast.walk(function):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant)] if isinstance(node, ast.Dict) else []
            keys += [k.arg for k in node.keywords] if isinstance(node, ast.Call) else []
            for key in keys:
                if key in ("int8", "fp16", "bf16", "fp8"):
                    asked.setdefault(function.name, set()).add(key)
    assert asked and all(name.startswith(LEGACY_PREFIX) for name in asked), asked
    assert {"int8", "fp16"} <= asked["_legacy_precision_flags"]


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
# build_engine's call sequence through Polygraphy, run against a recording double of TensorRT
# (tests/trt_fake.py). The double is built from the stubs: touching a name the stubs (10.13) do not
# declare, or one TensorRT 11 removed when it plays 11.x, raises AttributeError.
# It checks the orchestration per major version; TensorRT itself runs only in
# tests/test_trt_runner.py, which skips without TensorRT and a GPU.

import json as _json  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as _np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import trt_fake  # noqa: E402
from trt_fake import INSPECTOR_JSON, FakeTensorRT  # noqa: E402

from pipeline.errors import InputError  # noqa: E402
from pipeline.trt import engine as engine_module  # noqa: E402
from pipeline.targets import resolve_target  # noqa: E402

# Names the fake hides before the TensorRT version that introduced them (the stubs are 10.13):


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
    """install(version, **options): the fake TensorRT of that version, a fake Orin GPU (8.7) and CUDA runtime."""
    yield lambda version, **options: trt_fake.install(monkeypatch, stub_api, version, **options)
    trt_fake.reset_polygraphy_tensorrt()  # Polygraphy must not keep the fake after the test


def _flags(fake: FakeTensorRT) -> set[str]:
    """The builder flags set, less TF32: TensorRT's default, which the build keeps on every version (Polygraphy
    would clear it unless asked, config.py)."""
    flags = {repr(args[0]) for args in fake.called("IBuilderConfig.set_flag")}
    assert "BuilderFlag.TF32" in flags
    return flags - {"BuilderFlag.TF32"}


def _network_flags(fake: FakeTensorRT) -> list[int]:
    """The flags of each create_network call (Polygraphy's CreateNetwork passes them by keyword)."""
    return [kwargs.get("flags", args[0] if args else 0) for args, kwargs in fake.called_with("Builder.create_network")]


def test_double_build_on_10x_is_weakly_typed_with_int8_and_fp16(tmp_path, fake_tensorrt):
    fake = fake_tensorrt("10.3.0.30")
    result = engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), resolve_target("jetson"), tmp_path / "w", tmp_path / "cache")
    assert _network_flags(fake) == [0]
    assert _flags(fake) == {"BuilderFlag.INT8", "BuilderFlag.FP16"}
    assert fake.called("IBuilderConfig.set_memory_pool_limit") == [(fake.MemoryPoolType.WORKSPACE, 1024 << 20)]
    assert fake.called("IBuilderConfig.builder_optimization_level =") == [(3,)]
    assert [repr(a[0]) for a in fake.called("IBuilderConfig.profiling_verbosity =")] == ["ProfilingVerbosity.DETAILED"]
    assert fake.called("IOptimizationProfile.set_shape") == [("image", (1, 3, 4, 4), (8, 3, 4, 4), (32, 3, 4, 4))]
    assert result.plan_path.read_bytes().startswith(trt_fake.PLAN_MAGIC)  # the plan as TensorRT serialized it, no header of ours
    sidecar = _json.loads(result.metadata_path.read_text())
    assert sidecar["tensorrt_version"] == "10.3.0.30" and sidecar["typing"] == "weak"
    assert set(sidecar["precisions_built"]) == {"int8", "fp16", "fp32"}
    assert sidecar["layer_precisions"] == {"int8": 1, "fp16": 1, "fp32": 1}
    assert result.float_compute_layers == ("text_head",)
    assert result.timing_cache_path.read_bytes() == b"CACHE"
    assert "trt-10.3.0.30" in result.timing_cache_path.name and "orin" in result.timing_cache_path.name


def test_double_build_on_11x_sets_no_precision_flag(tmp_path, fake_tensorrt):
    fake = fake_tensorrt("11.4.1")  # BuilderFlag.INT8/FP16, EXPLICIT_BATCH, calibrators... raise here
    result = engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), _jetson(fp16_fallback=False), tmp_path / "w", None)
    assert _network_flags(fake) == [0]
    assert _flags(fake) == set()
    assert set(result.metadata["precisions_built"]) == {"int8", "fp32"}
    assert result.typing == "strong" and result.timing_cache_path is None


def test_double_build_on_10x_opting_into_strong_typing(tmp_path, fake_tensorrt):
    fake = fake_tensorrt("10.13.0.35")
    target = resolve_target("jetson-thor")
    target = dataclasses_replace_builder(target, network_typing="strong", fp16_fallback=False)
    engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), target, tmp_path / "w", None)
    strongly_typed = int(fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert _network_flags(fake) == [1 << strongly_typed]
    assert _flags(fake) == set()


def test_double_build_on_8x_uses_explicit_batch(tmp_path, fake_tensorrt):
    fake = fake_tensorrt("8.5.2.2")
    result = engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), resolve_target("jetson-xavier-nx"), tmp_path / "w", None)
    explicit = int(fake.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    assert _network_flags(fake) == [1 << explicit]
    assert _flags(fake) == {"BuilderFlag.INT8", "BuilderFlag.FP16"}
    assert any("optimization level" in note for note in result.notes)


def test_double_build_for_dla(tmp_path, fake_tensorrt):
    fake = fake_tensorrt("10.3.0.30", dla_cores=2)
    result = engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), resolve_target("jetson-agx-orin"), tmp_path / "w", None)
    assert [repr(a[0]) for a in fake.called("IBuilderConfig.default_device_type =")] == ["DeviceType.DLA"]
    assert fake.called("IBuilderConfig.DLA_core =")[-1] == (0,)
    assert "BuilderFlag.GPU_FALLBACK" in _flags(fake)
    assert fake.called("IOptimizationProfile.set_shape") == [("image", (8, 3, 4, 4), (8, 3, 4, 4), (8, 3, 4, 4))]
    assert result.gpu_fallback_layers == ("gather",)


def test_double_build_for_dla_uses_the_targets_core(tmp_path, fake_tensorrt):
    fake = fake_tensorrt("10.3.0.30", dla_cores=2)
    target = dataclasses_replace_builder(resolve_target("jetson-agx-orin"), dla_core=1)
    engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), target, tmp_path / "w", None)
    assert fake.called("IBuilderConfig.DLA_core =")[-1] == (1,)  # Polygraphy's CreateConfig picks core 0; the target says 1


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
    assert result.plan_path.read_bytes().startswith(trt_fake.VC_PREFIX) and result.metadata["version_compatible"] is True


def test_double_fake_runtime_refuses_a_version_compatible_plan_without_host_code(tmp_path, fake_tensorrt):
    fake = fake_tensorrt("10.3.0.30")
    plan = engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), _jetson(version_compatible=True), tmp_path / "w", None).plan_path
    runtime = fake.Runtime(None)
    assert runtime.deserialize_cuda_engine(plan.read_bytes()) is None
    runtime.engine_host_code_allowed = True
    assert runtime.deserialize_cuda_engine(plan.read_bytes()) is not None


def test_double_plan_of_another_version_does_not_load(tmp_path, fake_tensorrt, stub_api):
    fake_tensorrt("10.3.0.30")
    plan = engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), resolve_target("jetson"), tmp_path / "w", None).plan_path
    newer = FakeTensorRT(stub_api, "10.13.0.35")
    runtime = newer.Runtime(None)
    runtime.engine_host_code_allowed = True
    assert runtime.deserialize_cuda_engine(plan.read_bytes()) is None  # a plan is tied to its TensorRT version


def test_double_rejected_timing_cache_is_reported_and_the_build_goes_on(tmp_path, fake_tensorrt):
    fake = fake_tensorrt("10.3.0.30", cache_accepted=False)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    name = engine_module.timing_cache_name(resolve_target("jetson").name, "10.3.0.30", "Orin (nvgpu)", "8.7")
    (cache_dir / name).write_bytes(b"FROM-ANOTHER-DEVICE")
    result = engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), resolve_target("jetson"), tmp_path / "w", cache_dir)
    assert result.plan_path.read_bytes().startswith(trt_fake.PLAN_MAGIC)
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
    # Polygraphy's LockFile (the lock `polygraphy convert --save-timing-cache` takes on the same file) uses lockf
    real_lockf, real_atomic = _fcntl.lockf, engine_module.atomic_write_bytes
    monkeypatch.setattr(_fcntl, "lockf", lambda fd, op: (events.append(("flock", op)), real_lockf(fd, op))[1])
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


def test_runner_loads_a_version_compatible_plan_with_host_code_allowed(tmp_path, fake_tensorrt):
    import shutil

    from pipeline.runners import OrtRunner
    from pipeline.trt import runner as runner_module

    fake = fake_tensorrt("10.3.0.30")
    model = _tiny_onnx(tmp_path / "m.onnx")
    result = engine_module.build_engine(model, _jetson(version_compatible=True), tmp_path / "w", None)
    inputs = {"image": _np.random.default_rng(0).standard_normal((40, 3, 4, 4)).astype(_np.float32)}
    runner = runner_module.TrtRunner(result.plan_path)
    # Through Polygraphy's TrtRunner and its CUDA wrapper (host memory here): the fake runs the plan's ONNX, so this
    # proves the binding, the split into the profile's max batch (32) and the copy back, not TensorRT's numerics.
    _np.testing.assert_allclose(runner.predict(inputs), OrtRunner(model).predict(inputs), rtol=1e-6)
    assert len(fake.called("IExecutionContext.execute_async_v3")) == 2  # 40 samples: 32 + 8
    assert fake.called("Runtime.engine_host_code_allowed =") == [(True,), (True,)]  # the build's check, then the runner
    bare = tmp_path / "bare" / "model.plan"  # the same plan without its sidecar (as trtexec leaves it): loads too now
    bare.parent.mkdir()
    shutil.copy(result.plan_path, bare)
    assert runner_module.TrtRunner(bare).predict({"image": inputs["image"][:3]}).shape == (3, 3)
    # one logger in the process: every Builder/Runtime got the build's (TensorRT keeps the first anyway)
    given = [args[0] for name, args, _ in fake.calls if name in ("Builder", "Runtime")]
    assert len(given) == 4 and all(logger is fake.kept_logger for logger in given)
    runner.close()


def test_runner_needs_no_torch(tmp_path, fake_tensorrt, monkeypatch):
    """Defect 12: the runner's device buffers are Polygraphy's (libcudart), not torch CUDA tensors."""
    from pipeline.trt import runner as runner_module

    fake_tensorrt("10.3.0.30")
    result = engine_module.build_engine(_tiny_onnx(tmp_path / "m.onnx"), resolve_target("jetson"), tmp_path / "w", None)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    assert runner_module.trt_runner_status() == (True, "")
    logits = runner_module.TrtRunner(result.plan_path).predict({"image": _np.ones((2, 3, 4, 4), _np.float32)})
    _np.testing.assert_allclose(logits, _np.full((2, 3), 48.0))


def test_fp16_fallback_under_strong_typing_is_refused_naming_the_target_key(tmp_path, fake_tensorrt):
    """Defect 8: strongly typed builds have no FP16 flag; fp16_fallback would silently build INT8 + FP32."""
    fake = fake_tensorrt("11.4.1")
    model = _tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(InputError, match=r"builder\.fp16_fallback = true.*TensorRT 11\.x builds strongly typed"):
        engine_module.build_engine(model, resolve_target("jetson"), tmp_path / "w", None)
    assert not fake.called("Builder.build_serialized_network")
    fake_tensorrt("10.13.0.35")
    strong = dataclasses_replace_builder(resolve_target("jetson-thor"), network_typing="strong")
    with pytest.raises(InputError, match=r"builder\.fp16_fallback = true but builder\.network_typing = 'strong'"):
        engine_module.build_engine(model, strong, tmp_path / "w", None)
    import dataclasses

    with pytest.raises(InputError, match=r"precision = 'fp16'"):
        engine_module.build_engine(model, dataclasses.replace(dataclasses_replace_builder(strong, fp16_fallback=False),
                                                              precision="fp16"), tmp_path / "w", None)
    weak = engine_module.build_engine(model, resolve_target("jetson-thor"), tmp_path / "w", None)  # 10.13, weakly typed
    assert weak.metadata["precisions_built"]["fp16"].startswith("BuilderFlag.FP16")
