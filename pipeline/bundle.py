"""The device bundle: everything a device needs to build the engine and prove it matches.

Written where no TensorRT engine can be built (CI, a laptop): `out/<target>/bundle/`
holds the INT8 Q/DQ ONNX, the resolved target, a frozen golden subset of the
eval split (inputs, labels, the reference model's logits and the INT8 ONNX's
logits), the parity thresholds, the readiness lint, SHA256SUMS and a README
with the device commands. On the device, `python -m pipeline engine
--bundle DIR` builds the plan and `python -m pipeline verify --bundle DIR`
checks it against the golden outputs (pipeline.device_commands). For a device
with JetPack and nothing else the bundle also carries `build_engine.sh` (the
same build as one trtexec command, pipeline.trtexec), the golden set in
Polygraphy's format (`golden_inputs.json`, `golden_outputs.json`,
pipeline.polygraphy_golden) and a Triton model repository (`triton/`,
pipeline.triton).

The bundle is built in a temporary directory beside the final one, fsynced,
then moved into place, so a failed write never leaves a half bundle and
leaves the previous one as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shlex
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import numpy as np

import onnx

from pipeline import polygraphy_golden, trtexec, triton
from pipeline.errors import InputError
from pipeline.onnx_io import graph_io
from pipeline.parity import Gate
from pipeline.store import fsync_tree, sha256_file
from pipeline.targets import Target, target_from_mapping

BUNDLE_DIR = "bundle"
MODEL_FILE = "model.int8.onnx"
TARGET_FILE = "target.json"
GOLDEN_FILE = "golden.npz"
THRESHOLDS_FILE = "thresholds.json"
LINT_FILE = "lint.json"
README_FILE = "README.md"
CHECKSUMS_FILE = "SHA256SUMS"
BUILD_SCRIPT_FILE = trtexec.SCRIPT_NAME
POLYGRAPHY_INPUTS_FILE = polygraphy_golden.INPUTS_FILE
POLYGRAPHY_OUTPUTS_FILE = polygraphy_golden.OUTPUTS_FILE
# The device install (README): what `engine` and `verify` import, without torch; pyproject.toml's `device` extra,
# read from the installed metadata so the README cannot drift from it (the fallback is the same list).
DEVICE_EXTRA = "device"
DEVICE_REQUIREMENTS = ("numpy>=2.0,<3", "onnx==1.23.2", "onnxruntime==1.32.0", "polygraphy>=0.49")


def device_requirements() -> list[str]:
    """The `device` extra's requirements, e.g. ["numpy>=2.0,<3", "onnx==1.23.2", ...]."""
    import importlib.metadata

    try:
        requires = importlib.metadata.requires("edgepipe") or []
    except importlib.metadata.PackageNotFoundError:
        return list(DEVICE_REQUIREMENTS)
    found = [req.split(";")[0].strip() for req in requires
             if ";" in req and req.split(";", 1)[1].replace("'", '"').replace(" ", "") == f'extra=="{DEVICE_EXTRA}"']
    return found or list(DEVICE_REQUIREMENTS)


def device_requirements_line() -> str:
    return " ".join(shlex.quote(req) for req in device_requirements())
TRITON_DIR = triton.TRITON_DIR
# What the device writes into the bundle (plan, sidecar, timing cache) goes
# here; it is not part of the shipped bundle, so the checksums ignore it.
DEVICE_DIR = trtexec.DEVICE_DIR


def _device_written(relative: PurePosixPath) -> bool:
    """Files the device writes: device/..., and the plan build_engine.sh copies into triton/<model>/1/model.plan."""
    parts = relative.parts
    return parts[0] == DEVICE_DIR or (len(parts) == 4 and parts[0] == TRITON_DIR and parts[2] == triton.VERSION
                                      and parts[3] == triton.PLAN_NAME)


_GOLDEN_KEYS = ("ids", "labels", "reference_logits", "int8_logits", "input_names")
# The most `verify` reads into memory from golden.npz (a Jetson has a few GiB): the build writes at most 128
# samples (pipeline.build.GOLDEN_SAMPLES), whose 3x192x192 float32 images take 54 MiB for the default model.
GOLDEN_MAX_BYTES = 1 << 30


# ----------------------------------------------------------------- golden


def _frozen(array: Any) -> np.ndarray:
    copy = np.array(array, copy=True)
    copy.setflags(write=False)
    return copy


@dataclass(frozen=True)
class Golden:
    """A frozen eval subset with the outputs the device must reproduce.

    ids: stable sample ids; inputs: named model inputs ([N, ...] each, named as
    the ONNX graph names them); labels: [N] ints; reference_logits: the
    original model's [N, C]; int8_logits: the INT8 ONNX's [N, C] (ONNX Runtime).
    """

    ids: np.ndarray
    inputs: Mapping[str, np.ndarray]
    labels: np.ndarray
    reference_logits: np.ndarray
    int8_logits: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", _frozen(np.asarray(self.ids).astype(str)))
        object.__setattr__(self, "labels", _frozen(np.asarray(self.labels).astype(np.int64)))
        object.__setattr__(self, "reference_logits", _frozen(np.asarray(self.reference_logits, dtype=np.float32)))
        object.__setattr__(self, "int8_logits", _frozen(np.asarray(self.int8_logits, dtype=np.float32)))
        object.__setattr__(self, "inputs", {name: _frozen(value) for name, value in self.inputs.items()})
        self._check_shapes()

    def _check_shapes(self) -> None:
        count = len(self.ids)
        if count == 0:
            raise InputError("golden set is empty: the bundle needs at least one sample")
        if not self.inputs:
            raise InputError("golden set has no inputs")
        reserved = sorted(set(self.inputs) & set(_GOLDEN_KEYS))
        if reserved:
            raise InputError(f"golden input name(s) {reserved} clash with the bundle's own keys {_GOLDEN_KEYS}")
        lengths = {"labels": len(self.labels), "reference_logits": len(self.reference_logits), "int8_logits": len(self.int8_logits)}
        lengths.update({f"inputs['{name}']": len(value) for name, value in self.inputs.items()})
        wrong = {name: n for name, n in lengths.items() if n != count}
        if wrong:
            raise InputError(f"golden set: {count} ids but {wrong}")
        if self.reference_logits.shape != self.int8_logits.shape or self.reference_logits.ndim != 2:
            raise InputError(f"golden logits must both be [N, C]: reference {self.reference_logits.shape}, int8 {self.int8_logits.shape}")

    def to_npz_bytes(self) -> bytes:
        arrays = {name: np.ascontiguousarray(value) for name, value in self.inputs.items()}
        arrays.update(ids=self.ids, labels=self.labels, reference_logits=self.reference_logits,
                      int8_logits=self.int8_logits, input_names=np.array(sorted(self.inputs), dtype=str))
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()

    @staticmethod
    def load(path: Path) -> "Golden":
        try:
            with zipfile.ZipFile(path) as archive:  # the sizes its arrays declare, before any is read into memory
                unpacked = sum(info.file_size for info in archive.infolist())
        except (OSError, zipfile.BadZipFile) as error:
            raise InputError(f"{path}: not a readable golden set ({error})")
        if unpacked > GOLDEN_MAX_BYTES:
            raise InputError(f"{path}: the golden set's arrays take {unpacked / 2**20:.0f} MiB unpacked, over the "
                             f"{GOLDEN_MAX_BYTES / 2**20:.0f} MiB a bundle's golden set may hold (a build writes at most 128 samples: was the file replaced?)")
        try:
            with np.load(path, allow_pickle=False) as data:
                names = [str(n) for n in data["input_names"]]
                return Golden(ids=data["ids"], inputs={name: data[name] for name in names}, labels=data["labels"],
                              reference_logits=data["reference_logits"], int8_logits=data["int8_logits"])
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            raise InputError(f"{path}: not a readable golden set ({type(error).__name__}: {error})")


# ----------------------------------------------------------------- writing


def _shell(argv: list[str]) -> str:
    return " ".join(shlex.quote(arg) for arg in argv)


def device_readme(target: Target, triton_model: triton.TritonModel | None = None,
                  ort_session_config: Mapping[str, str] | None = None, golden_iterations: tuple[int, int] | None = None) -> str:
    """README.md of the bundle: what it is and the ways to use it on the device.

    golden_iterations: (iterations, samples per iteration) of the Polygraphy golden files.
    """
    software = target.software
    tensorrt = software.runtime == "tensorrt"
    ships = f"TensorRT {software.tensorrt}" + (f" (JetPack {software.jetpack})" if software.jetpack else "")
    session = dict(ort_session_config or {})
    model = triton_model
    text = f"""# Device bundle for target `{target.name}`

{target.description}

This folder holds everything the device needs: the INT8 Q/DQ ONNX model
(`{MODEL_FILE}`), the resolved target (`{TARGET_FILE}`), a frozen golden set of
eval samples with the reference and INT8 ONNX outputs (`{GOLDEN_FILE}`, and the
same inputs with the INT8 ONNX outputs in Polygraphy's format:
`{POLYGRAPHY_INPUTS_FILE}`, `{POLYGRAPHY_OUTPUTS_FILE}`), the parity thresholds
(`{THRESHOLDS_FILE}`), the TensorRT readiness report (`{LINT_FILE}`),
""" + (f"`{BUILD_SCRIPT_FILE}` (the engine build as one trtexec command), " if tensorrt else "") + \
        f"""a Triton model repository (`{TRITON_DIR}/`) and checksums of all of them (`{CHECKSUMS_FILE}`).
"""
    if tensorrt:
        text += f"""
The device should have {ships} and a GPU of compute capability
{target.device.compute_capability or '-'} ({target.device.name}).
"""
    else:
        text += f"""
The target runs the INT8 ONNX with ONNX Runtime ({target.device.name}): no TensorRT engine is built.
"""
    text += f"""
## 1. With this project (`python -m pipeline`)

```
pip install --no-deps edgepipe  # this project without its training stack (torch, transformers, the data sets)
pip install {device_requirements_line()}  # its `device` extra; TensorRT from JetPack or NVIDIA's index
python -m pipeline engine --bundle .          # checks checksums and versions, builds device/model.plan
python -m pipeline verify --bundle .          # runs the golden set through the plan, exits 0 or 3
```

(`pip install 'edgepipe[device]'` alone would also pull the training stack: an extra adds to the
dependencies, it cannot remove them. From a checkout: `pip install --no-deps .`)

`verify --runtime ort` runs the same check with ONNX Runtime on the CPU (no
GPU needed). `sha256sum -c {CHECKSUMS_FILE}` checks the files by hand.
Files the device writes go to `{DEVICE_DIR}/`, which the checksums ignore.
"""
    if tensorrt:
        text += f"""
## 2. With trtexec only (`{BUILD_SCRIPT_FILE}`)

On a device with JetPack and nothing else installed:

```
./{BUILD_SCRIPT_FILE}          # or: bash {BUILD_SCRIPT_FILE}; TRTEXEC=/path/to/trtexec overrides PATH, then {trtexec.JETPACK_TRTEXEC}
```

It checks `{CHECKSUMS_FILE}`, then runs the same build as `python -m pipeline engine`
(the target's precision flags for TensorRT {software.tensorrt}, workspace, batch profile
{target.builder.batch.min}/{target.builder.batch.opt}/{target.builder.batch.max}, optimization level"""
        text += (f", DLA core {target.builder.dla_core}" + (" with GPU fallback" if target.builder.gpu_fallback else "")
                 if target.builder.use_dla else "")
        text += f"""), writing `{DEVICE_DIR}/model.plan`,
`{DEVICE_DIR}/{trtexec.TIMING_CACHE_NAME}` (reused by the next build) and `{DEVICE_DIR}/{trtexec.LAYER_INFO_NAME}` (each
layer's precision and device), and copies the plan into the Triton repository
(`{model.model_path if model else TRITON_DIR}`). `python -m pipeline verify --bundle .` checks that plan too.
"""
    iterations = (f" ({golden_iterations[0]} iteration(s) of {golden_iterations[1]} samples, the target's optimal batch"
                  + (": with a static batch the samples past the last whole batch are left out" if target.builder.batch.min == target.builder.batch.max else "")
                  + ")") if golden_iterations else ""
    ort_command = _shell(polygraphy_golden.polygraphy_ort_command(MODEL_FILE, session))
    text += f"""
## {3 if tensorrt else 2}. With Polygraphy (`pip install polygraphy`)

`{POLYGRAPHY_INPUTS_FILE}` holds the golden inputs{iterations} as `--load-inputs` reads
them, `{POLYGRAPHY_OUTPUTS_FILE}` the INT8 ONNX's outputs on them as ONNX Runtime
computed them when the bundle was written (CPU, session config {json.dumps(session, sort_keys=True)}), as
`--load-outputs` reads them:

```
{ort_command}
"""
    if tensorrt:
        text += f"{_shell(polygraphy_golden.polygraphy_trt_command(DEVICE_DIR + '/model.plan'))}\n"
    text += "```\n\n"
    ort = polygraphy_golden.ort_tolerances(session)
    text += (f"Tolerances (an element passes when |diff| <= atol or |diff|/|golden| <= rtol): ONNX Runtime against "
             f"the golden outputs atol {ort['atol']:g}, rtol {ort['rtol']:g}. ")
    if session.get("session.disable_quant_qdq") == "1":
        text += ("The golden outputs were computed with `session.disable_quant_qdq = 1` (no QDQ fusion: dequantize, "
                 "then the float op, as TensorRT computes). Polygraphy's ONNX Runtime runner takes no session config "
                 "entries; `--graph-optimization-level ORT_DISABLE_ALL` (in Polygraphy 0.53.6, not yet in 0.49.27) "
                 "is the nearest, but it also turns off ONNX Runtime's float fusions, and those small float "
                 "differences now and then move a value across a quantization step: on the default model the "
                 "logits differed by up to 0.063 (every argmax the same), hence the loose tolerances. Without the "
                 "option ONNX Runtime fuses the Q/DQ pairs into integer kernels (x86 kernels without VNNI saturate "
                 "S8 x S8 sums) and the logits differed by up to 1.9. ")
    elif session:
        text += (f"Polygraphy's ONNX Runtime runner cannot set the session config entries {sorted(session)}: "
                 "expect differences beyond these tolerances. ")
    else:
        text += "On the default model Polygraphy's ONNX Runtime run reproduced the golden outputs bit for bit. "
    if tensorrt:
        trt_tol = polygraphy_golden.TRT_TOLERANCES
        text += (f"The TensorRT plan against them: atol {trt_tol['atol']:g}, rtol {trt_tol['rtol']:g}, a coarse "
                 "elementwise check not yet measured on a device (TensorRT picks its own kernels and FP16 for "
                 "unquantized layers); "
                 f"the gate that decides is `python -m pipeline verify` (agreement, cosine: `{THRESHOLDS_FILE}`).")
    text = text.rstrip(" ") + "\n"
    if model is not None:
        text += f"""
## Triton Inference Server (`{TRITON_DIR}/`)

```
{TRITON_DIR}/
  {model.name}/
    config.pbtxt          # platform "{model.platform}", inputs/outputs from the ONNX graph
    {triton.VERSION}/
      {model.model_file}"""
        if tensorrt:
            text += f"""            # written by ./{BUILD_SCRIPT_FILE} (or copy device/model.plan here); README.md says so
```

Build the plan first (section 2), then serve it:
"""
        else:
            text += f"""            # the INT8 ONNX, a copy of {MODEL_FILE}
```
"""
            if session:
                text += (f"\nThe golden outputs were computed with the session config {json.dumps(session, sort_keys=True)}; "
                         "Triton's ONNX Runtime backend documents no parameter for arbitrary session config entries "
                         "(UNCONFIRMED), so it may run the model without them.\n")
        text += f"""
```
tritonserver --model-repository=$PWD/{TRITON_DIR}
```
"""
        if tensorrt:
            text += (f"\nThe checksums leave `{TRITON_DIR}/<model>/{triton.VERSION}/model.plan` out, like `{DEVICE_DIR}/`: "
                     "the device writes it.\n")
        if model.max_batch_size:
            text += (f"\nTriton batches requests up to {model.max_batch_size} (the target's batch max), preferring "
                     f"{target.builder.batch.opt}.\n")
        else:
            text += ("\n`max_batch_size: 0`: the batch is static (or the graph has no dynamic first axis), so each request "
                     "carries the whole batch dimension and Triton does not batch requests.\n")
    return text


def _checked_extra_name(name: str) -> str:
    path = PurePosixPath(name)
    reserved = {MODEL_FILE, TARGET_FILE, GOLDEN_FILE, THRESHOLDS_FILE, LINT_FILE, README_FILE, CHECKSUMS_FILE,
                BUILD_SCRIPT_FILE, POLYGRAPHY_INPUTS_FILE, POLYGRAPHY_OUTPUTS_FILE}
    if path.is_absolute() or ".." in path.parts or not path.parts or path.parts[0] in (DEVICE_DIR, TRITON_DIR, ".") \
            or str(path) in reserved:
        raise InputError(f"bundle extra file name {name!r} must be a relative path inside the bundle, not {sorted(reserved)}, "
                         f"{DEVICE_DIR}/ or {TRITON_DIR}/")
    return str(path)


def thresholds_json(thresholds: Gate, ort_session_config: Mapping[str, str] | None = None) -> dict[str, Any]:
    # ort_session_config: how ONNX Runtime ran the INT8 ONNX when the golden
    # outputs were made; `verify --runtime ort` must run it the same way.
    return {"compared_with": "int8_onnx", "gate": dataclasses.asdict(thresholds),
            "ort_session_config": dict(ort_session_config or {})}


def _ensure_self_contained(onnx_path: Path) -> None:
    """The bundle carries one ONNX file: weights in external data files would be left behind."""

    model = onnx.load(str(onnx_path), load_external_data=False)
    external = [init.name for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise InputError(f"{onnx_path}: {len(external)} initializer(s) keep their data in external files "
                         f"(e.g. '{external[0]}'); save the model as one file for the bundle")


def write_bundle(out_dir: Path, qdq_onnx: Path, target: Target, golden: Golden, thresholds: Gate,
                 lint_report: Mapping[str, Any], extra_files: Mapping[str, Path] | None = None,
                 ort_session_config: Mapping[str, str] | None = None,
                 triton_model_name: str = triton.DEFAULT_MODEL_NAME) -> Path:
    """Write out_dir/bundle atomically and return its path.

    thresholds: the gate the device's outputs must meet against the golden
    INT8 ONNX outputs (normally target.gates.engine). lint_report: the
    readiness lint as JSON (LintReport.to_json()). extra_files: more files to
    ship, by name inside the bundle. ort_session_config: how ONNX Runtime ran
    the INT8 ONNX for the golden outputs (the Polygraphy golden outputs are
    computed with it too). triton_model_name: the model's name (and directory)
    in the Triton repository.
    """
    out_dir, qdq_onnx = Path(out_dir), Path(qdq_onnx)
    if not qdq_onnx.is_file():
        raise InputError(f"{qdq_onnx}: INT8 ONNX model not found")
    _ensure_self_contained(qdq_onnx)
    io_spec = graph_io(qdq_onnx)
    tensorrt = target.software.runtime == "tensorrt"
    extras = {_checked_extra_name(name): Path(path) for name, path in (extra_files or {}).items()}
    missing = [str(path) for path in extras.values() if not path.is_file()]
    if missing:
        raise InputError(f"bundle extra file(s) not found: {missing}")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{BUNDLE_DIR}.", dir=out_dir))
    os.chmod(work, 0o755)  # mkdtemp makes it private; the bundle is copied to devices and shared
    try:
        shutil.copyfile(qdq_onnx, work / MODEL_FILE)
        _write_json(work / TARGET_FILE, target.to_json())
        (work / GOLDEN_FILE).write_bytes(golden.to_npz_bytes())
        _write_json(work / THRESHOLDS_FILE, thresholds_json(thresholds, ort_session_config))
        # the lint read the build's own copy (a path under its out directory); the bundle's copy is MODEL_FILE, and its bytes
        # must not depend on where the build ran
        _write_json(work / LINT_FILE, {**lint_report, "model": MODEL_FILE})
        feeds, _ = polygraphy_golden.write_golden_files(work, qdq_onnx, golden.inputs, io_spec, target, ort_session_config)
        model = triton.write_triton_repository(work, io_spec, target, qdq_onnx, triton_model_name)
        if tensorrt:
            script = work / BUILD_SCRIPT_FILE
            script.write_text(trtexec.build_engine_script(target, io_spec.inputs, MODEL_FILE, model.version_dir), encoding="utf-8")
            os.chmod(script, 0o755)
        readme = device_readme(target, model, ort_session_config, (len(feeds), len(next(iter(feeds[0].values())))))
        (work / README_FILE).write_text(readme, encoding="utf-8")
        for name, source in extras.items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, work / name)
        (work / CHECKSUMS_FILE).write_text(checksums_text(work), encoding="utf-8")
        fsync_tree(work)
        return _move_into_place(work, out_dir / BUNDLE_DIR)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def _move_into_place(work: Path, final: Path) -> Path:
    """Swap the finished bundle in; the old one is removed only after the new one is in place."""
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(work, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------- checking


def _bundle_files(bundle_dir: Path) -> list[str]:
    """Relative POSIX names of the shipped files (SHA256SUMS, device/ and the Triton plan excluded), sorted."""
    names = []
    for path in bundle_dir.rglob("*"):
        relative = PurePosixPath(path.relative_to(bundle_dir).as_posix())
        if path.is_file() and not _device_written(relative) and str(relative) != CHECKSUMS_FILE:
            names.append(relative.as_posix())
    return sorted(names)


def checksums_text(bundle_dir: Path) -> str:
    """SHA256SUMS in `sha256sum` format ("<hex>  <name>"), so `sha256sum -c` checks it too."""
    return "".join(f"{sha256_file(bundle_dir / name)}  {name}\n" for name in _bundle_files(bundle_dir))


def _parse_checksums(path: Path) -> list[tuple[str, str]]:
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep:  # sha256sum's binary-mode marker: "<hex> *<name>"
            digest, sep, name = line.partition(" *")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
            raise InputError(f"{path}:{number}: not a sha256sum line: {line!r}")
        entries.append((digest.lower(), _checked_entry_name(name, path, number)))
    return entries


def _checked_entry_name(name: str, sums: Path, number: int) -> str:
    """An entry of SHA256SUMS must name a file inside the bundle: never an absolute path, a '..' or a backslash."""
    relative = PurePosixPath(name)
    if not name or relative.is_absolute() or ".." in relative.parts or "\\" in name:
        raise InputError(f"{sums}:{number}: entry {name!r} points outside the bundle; SHA256SUMS names the bundle's own files "
                         "by relative path (was it edited?)")
    return name


def _symlinks(bundle_dir: Path) -> list[Path]:
    """Symbolic links among the shipped files and folders (what the device writes, device/ and the Triton plan, aside)."""
    found = []
    for root, dirs, files in os.walk(bundle_dir):  # does not follow links to folders: a linked folder is listed, not entered
        for name in sorted(dirs + files):
            path = Path(root) / name
            if path.is_symlink() and not _device_written(PurePosixPath(path.relative_to(bundle_dir).as_posix())):
                found.append(path)
        dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink()]
    return sorted(found)


def verify_bundle_checksums(bundle_dir: Path) -> None:
    """InputError naming the first file that is missing, changed, or not listed in SHA256SUMS."""
    bundle_dir = Path(bundle_dir)
    sums = bundle_dir / CHECKSUMS_FILE
    if not bundle_dir.is_dir():
        raise InputError(f"{bundle_dir}: bundle directory not found")
    if not sums.is_file():
        raise InputError(f"{sums}: missing; is {bundle_dir} a bundle written by `python -m pipeline build`?")
    links = _symlinks(bundle_dir)
    if links:
        raise InputError(f"{links[0]}: a symbolic link (to {os.readlink(links[0])}) in the bundle; a bundle ships regular files "
                         f"only, so that the checksums vouch for what is read (copy the file in instead)")
    entries = _parse_checksums(sums)
    for digest, name in entries:
        path = bundle_dir / name
        if not path.is_file():
            raise InputError(f"{path}: listed in {CHECKSUMS_FILE} but missing from the bundle")
        actual = sha256_file(path)
        if actual != digest:
            raise InputError(f"{path}: checksum mismatch (expected {digest[:16]}..., found {actual[:16]}...): "
                             "the file changed after the bundle was written")
    listed = {name for _, name in entries}
    extra = [name for name in _bundle_files(bundle_dir) if name not in listed]
    if extra:
        raise InputError(f"{bundle_dir / extra[0]}: not listed in {CHECKSUMS_FILE} (files the device writes belong in {DEVICE_DIR}/)")


@dataclass(frozen=True)
class Bundle:
    """A checked bundle, read back: what `engine` and `verify` work from."""

    path: Path
    model: Path
    target: Target
    golden: Golden
    thresholds: Gate
    lint: Mapping[str, Any]
    ort_session_config: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def device_dir(self) -> Path:
        return self.path / DEVICE_DIR


def load_bundle(bundle_dir: Path) -> Bundle:
    """Verify the checksums, then read the bundle's target, golden set and thresholds."""
    bundle_dir = Path(bundle_dir)
    verify_bundle_checksums(bundle_dir)
    target = target_from_json(_read_json(bundle_dir / TARGET_FILE), bundle_dir / TARGET_FILE)
    thresholds = _read_json(bundle_dir / THRESHOLDS_FILE)
    try:
        gate = Gate.from_mapping(thresholds["gate"])
    except (KeyError, TypeError) as error:
        raise InputError(f"{bundle_dir / THRESHOLDS_FILE}: no valid 'gate' ({error})")
    return Bundle(path=bundle_dir, model=bundle_dir / MODEL_FILE, target=target,
                  golden=Golden.load(bundle_dir / GOLDEN_FILE), thresholds=gate,
                  lint=_read_json(bundle_dir / LINT_FILE),
                  ort_session_config={str(k): str(v) for k, v in (thresholds.get("ort_session_config") or {}).items()})


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not readable JSON ({error})")


def target_from_json(data: Mapping[str, Any], where: Path) -> Target:
    """A Target from target.json (Target.to_json()), validated like a TOML file."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object")
    return target_from_mapping(_drop_nones(data), str(where))


def _drop_nones(value: Any) -> Any:
    """JSON null stands for a key left at its default (TOML has no null)."""
    if isinstance(value, dict):
        return {key: _drop_nones(item) for key, item in value.items() if item is not None}
    return value


def sha256_of_bundle(bundle_dir: Path) -> str:
    """One digest for the whole bundle: the sha256 of its SHA256SUMS file."""
    return hashlib.sha256((Path(bundle_dir) / CHECKSUMS_FILE).read_bytes()).hexdigest()
