"""The bad-input catalogue: every kind through the real CLI, against a real build's output directory.

Each test copies one small real build (fused-tiny, one epoch, no compression, a 36-image emoji folder),
records the sha256 of every file in it, runs one bad command and checks what the user sees: exit 2, a
message naming the file, flag or key and what is wrong, no traceback, and every file of the output
directory as it was (a new `.lock` may appear; nothing else). README.md's "Bad input: what you see"
table lists the same kinds, one row per test here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import write_emoji_folder, write_target
from pipeline import bundle as bundle_module
from pipeline.cli import main

REPO = Path(__file__).resolve().parent.parent
LENIENT = {"quantize": {"max_drop_pts": 100.0, "min_agreement": 0.0}, "prune": {"max_drop_pts": 100.0}, "factorize": {"max_drop_pts": 100.0}}
NEW_FILES_ALLOWED = {".lock"}  # the build's lock file; anything else new means something was written


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@dataclass(frozen=True)
class Base:
    work: Path
    data: Path
    target: Path
    out: Path
    args: tuple[str, ...]  # the build command that made out, without --out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    """One small real build: fused-tiny trained one epoch on 4 emoji per class, exported, quantized, bundled for jetson."""
    work = tmp_path_factory.mktemp("bad-inputs")
    data = write_emoji_folder(work / "data", per_class=4)
    target = write_target(work / "tiny-jetson.toml", gates=LENIENT)
    args = ("build", "--model", "fused-tiny", "--data", str(data), "--target", str(target), "--epochs", "1", "--no-compression")
    result = run_cli(*args, "--out", str(work / "out"), cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (work / "out" / "bundle" / "SHA256SUMS").is_file()
    return Base(work, data, target, work / "out", args)


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root (a symlink: where it points)."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[relative] = f"symlink -> {os.readlink(path)}"
            elif path.is_file():
                found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


class Case:
    """A copy of the base build in tmp_path, its files' hashes taken once the test has set up its bad input."""

    def __init__(self, base: Base, tmp_path: Path):
        self.base, self.tmp = base, tmp_path
        self.out = tmp_path / "out"
        shutil.copytree(base.out, self.out, ignore=shutil.ignore_patterns(".lock"), symlinks=True)
        self.bundle = self.out / "bundle"
        self.before: dict[str, str] | None = None

    def data(self) -> Path:
        """A copy of the data folder to break."""
        copy = self.tmp / "data"
        if not copy.exists():
            shutil.copytree(self.base.data, copy)
        return copy

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in (self.data() / "samples.jsonl").read_text().splitlines()]

    def write_lines(self, lines: list[dict]) -> Path:
        (self.data() / "samples.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        return self.data()

    def build_args(self, *extra: str, data: Path | None = None, out: Path | None = None, drop: tuple[str, ...] = ()) -> list[str]:
        args = list(self.base.args)
        if data is not None:
            args[args.index("--data") + 1] = str(data)
        for flag in drop:  # a flag and its value
            index = args.index(flag)
            del args[index:index + 2]
        return [*args, "--out", str(out or self.out), *extra]

    def resum(self) -> None:
        """Rewrite the bundle's SHA256SUMS for its files as they are now (a bundle broken past its checksums)."""
        (self.bundle / "SHA256SUMS").write_text(bundle_module.checksums_text(self.bundle))

    def freeze(self) -> None:
        self.before = snapshot(self.out)

    def check(self, code: int, err: str, *names: str) -> None:
        assert code == 2, f"exit {code}: {err[-3000:]}"
        assert "Traceback" not in err, err[-3000:]
        message = err.strip().splitlines()[-1] if err.strip() else ""
        assert message.startswith("error: "), err[-3000:]
        for name in names:
            assert name in message, f"{name!r} not in: {message}"
        assert self.before is not None
        after = snapshot(self.out)
        changed = sorted(name for name, digest in self.before.items() if after.get(name) != digest)
        assert not changed, f"changed or removed: {changed}"
        added = sorted(set(after) - set(self.before) - NEW_FILES_ALLOWED)
        assert not added, f"written: {added}"


@pytest.fixture
def case(base, tmp_path) -> Case:
    return Case(base, tmp_path)


def refused(capsys, case: Case, argv: list[str], *names: str) -> str:
    """The command in-process (pipeline.cli.main); checked as Case.check says. Returns stderr."""
    if case.before is None:
        case.freeze()
    code = main(argv)
    err = capsys.readouterr().err
    case.check(code, err, *names)
    return err


def refused_by_subprocess(case: Case, argv: list[str], *names: str) -> str:
    if case.before is None:
        case.freeze()
    result = run_cli(*argv, cwd=case.tmp)
    case.check(result.returncode, result.stderr, *names)
    return result.stderr


# ---------------------------------------------------------------- build: flags, target, weights


def test_missing_weights_file(capsys, case):
    refused(capsys, case, case.build_args("--weights", str(case.tmp / "none.pt")), "none.pt", "weights file not found", "--weights")


def test_corrupt_checkpoint(capsys, case):
    weights = case.tmp / "broken.pt"
    weights.write_bytes(b"this is not a checkpoint")
    refused(capsys, case, case.build_args("--weights", str(weights)), "broken.pt", "not a readable PyTorch checkpoint")


def test_weights_that_do_not_fit_the_model(capsys, case):
    import torch

    weights = case.tmp / "other.pt"
    torch.save({"layer.weight": torch.zeros(3, 3)}, weights)
    refused(capsys, case, case.build_args("--weights", str(weights)), "other.pt", "do not match the model")


def tiny_state(num_classes: int) -> dict:
    import torch

    from pipeline.models import build_model, default_config

    torch.manual_seed(0)
    return build_model(default_config("fused-tiny", num_classes), pretrained=False).state_dict()


def test_weights_trained_with_another_label_set(capsys, case):
    """A checkpoint whose head has 5 classes, for data with 9."""
    import torch

    weights = case.tmp / "five-classes.pt"
    torch.save(tiny_state(5), weights)
    refused(capsys, case, case.build_args("--weights", str(weights)), "five-classes.pt", "'classifier.weight' has 5 outputs",
            "9 classes", "another label set")


def test_weights_holding_nan(capsys, case):
    import torch

    state = tiny_state(9)
    state["classifier.weight"][0, 0] = float("nan")
    weights = case.tmp / "nan.pt"
    torch.save(state, weights)
    refused(capsys, case, case.build_args("--weights", str(weights)), "nan.pt", "'classifier.weight'", "NaN or infinite")


@pytest.mark.parametrize("epochs", ["0", "-2"])
def test_epochs_below_one(capsys, case, epochs):
    args = case.build_args()
    args[args.index("--epochs") + 1] = epochs
    refused(capsys, case, args, "--epochs must be at least 1", f"got {epochs}")


def test_unknown_target(capsys, case):
    args = case.build_args()
    args[args.index("--target") + 1] = "jetson-nope"
    refused(capsys, case, args, "unknown target 'jetson-nope'", "jetson-orin-nano")


def test_target_file_with_bad_toml_syntax(case):
    target = case.tmp / "broken.toml"
    target.write_text(case.base.target.read_text().replace('name = "', 'name = "unterminated\n', 1))
    args = case.build_args()
    args[args.index("--target") + 1] = str(target)
    refused_by_subprocess(case, args, "broken.toml", "not valid TOML", "line 1")


def test_target_file_with_an_unknown_key(capsys, case):
    target = case.tmp / "typo.toml"
    target.write_text(case.base.target.read_text().replace("[builder]\n", "[builder]\nworkspac_mb = 12\n", 1))
    args = case.build_args()
    args[args.index("--target") + 1] = str(target)
    refused(capsys, case, args, "typo.toml", "unknown key 'workspac_mb'")


def test_prune_ratio_out_of_range(capsys, case):
    refused(capsys, case, case.build_args("--prune-image", "1.5"), "compression.prune_image = 1.5", "[0, 1)")


def test_unknown_calibration_set(capsys, case):
    refused(capsys, case, case.build_args("--calibration", "nope"), "unknown calibration set 'nope'", "--calibration", "emoji-default")


def test_unknown_model(capsys, case):
    args = case.build_args()
    args[args.index("--model") + 1] = "fused-huge"
    refused(capsys, case, args, "unknown model 'fused-huge'", "package.module:factory")


# ---------------------------------------------------------------- build: the user's own model (package.module:factory)


USER_MODEL = '''
import torch
from torch import nn


class Small(nn.Module):
    input_spec = {"image_size": 24, "max_tokens": 8}

    def __init__(self, num_classes, outputs=None, poison=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(4, outputs or num_classes)
        self.poison = poison

    def forward(self, image, input_ids, attention_mask):
        logits = self.head(torch.relu(self.conv(image)).mean(dim=(2, 3)))
        return logits + float("nan") if self.poison else logits


def make(num_classes):
    return Small(num_classes)


def nan_outputs(num_classes):
    return Small(num_classes, poison=True)


def three_outputs(num_classes):
    return Small(num_classes, outputs=3)


def raises(num_classes):
    raise ValueError("no such backbone: resnet-9000")


def not_a_module(num_classes):
    return {"layers": 3}


NOT_CALLABLE = 3
'''


@pytest.fixture
def user_models(case, monkeypatch) -> str:
    """A module of user factories, importable under a name of its own per test."""
    name = f"bad_input_models_{abs(hash(str(case.tmp))) % 10**8}"
    (case.tmp / f"{name}.py").write_text(USER_MODEL)
    (case.tmp / f"{name}_broken.py").write_text("import torch\nraise RuntimeError('the config file models.yaml is missing')\n")
    monkeypatch.syspath_prepend(str(case.tmp))
    return name


def user_weights(case: Case, module: str, factory: str) -> Path:
    import importlib

    import torch

    torch.manual_seed(0)
    weights = case.tmp / f"{factory}.pt"
    torch.save(getattr(importlib.import_module(module), factory)(9).state_dict(), weights)
    return weights


def user_model_args(case: Case, reference: str, *extra: str) -> list[str]:
    args = case.build_args(*extra)
    args[args.index("--model") + 1] = reference
    return args


@pytest.mark.parametrize("kind, factory, expected", [
    ("module missing", "no_such_package_xyz.models:make", ["--model 'no_such_package_xyz.models:make'", "cannot import module"]),
    ("attribute missing", "{m}:build_it", ["--model '{m}:build_it'", "has no callable 'build_it'"]),
    ("attribute not callable", "{m}:NOT_CALLABLE", ["--model '{m}:NOT_CALLABLE'", "has no callable 'NOT_CALLABLE'"]),
    ("module raises on import", "{m}_broken:make", ["--model '{m}_broken:make'", "importing module", "RuntimeError: the config file models.yaml",
                                                    "_broken.py:2"]),
    ("factory raises", "{m}:raises", ["--model '{m}:raises'", "the factory raised ValueError: no such backbone", ".py:"]),
    ("factory returns no nn.Module", "{m}:not_a_module", ["--model '{m}:not_a_module'", "returned dict, not a torch.nn.Module"]),
    ("not package.module:factory", ":make", ["--model ':make'", "expected package.module:factory"]),
])
def test_bad_factory(capsys, case, user_models, kind, factory, expected):
    reference = factory.format(m=user_models)
    refused(capsys, case, user_model_args(case, reference), *(e.format(m=user_models) for e in expected))


@pytest.mark.parametrize("loaded", [True, False], ids=["weights", "trained"])
def test_nan_in_the_models_outputs(capsys, case, user_models, loaded):
    """A user model whose logits are NaN: refused inside the source pass, before its artifact exists."""
    reference = f"{user_models}:nan_outputs"
    extra = ("--weights", str(user_weights(case, user_models, "nan_outputs"))) if loaded else ()
    err = refused(capsys, case, user_model_args(case, reference, *extra), "NaN or infinite logits", "calib samples")
    assert ("nan_outputs.pt: with these weights" in err) if loaded else (f"--model '{reference}': the untrained model" in err)


def test_model_returning_the_wrong_number_of_logits(capsys, case, user_models):
    reference = f"{user_models}:three_outputs"
    weights = user_weights(case, user_models, "three_outputs")
    refused(capsys, case, user_model_args(case, reference, "--weights", str(weights)), "three_outputs.pt", "logits of shape", ", 3)",
            "one logit per class")


def test_fusion_flag_with_a_users_model(capsys, case, user_models):
    weights = user_weights(case, user_models, "make")
    refused(capsys, case, user_model_args(case, f"{user_models}:make", "--weights", str(weights), "--fusion", "concat"),
            "--fusion applies to the built-in models only")


# ---------------------------------------------------------------- build: --out


def test_out_under_a_regular_file_dev_null(case):
    """/dev/null/sub: ended in NotADirectoryError and exit 1."""
    refused_by_subprocess(case, case.build_args(out=Path("/dev/null/sub")), "--out /dev/null/sub", "/dev/null, which is not a directory")
    assert Path("/dev/null").is_char_device()


def test_out_under_a_file_of_the_build(capsys, case):
    manifest = case.out / "manifest.json"
    refused(capsys, case, case.build_args(out=manifest / "sub"), f"--out {manifest}/sub", "which is not a directory")


def test_out_is_a_file_of_the_build(capsys, case):
    manifest = case.out / "manifest.json"
    refused(capsys, case, case.build_args(out=manifest), f"--out {manifest}", "is not a directory")


def unwritable_place() -> Path:
    """A directory even root cannot create anything in (sysfs, procfs); proven here, not assumed."""
    for parent in (Path("/sys"), Path("/proc")):
        probe = parent / "edgepipe-bad-input-probe"
        try:
            probe.mkdir()
        except OSError:
            return parent / "edgepipe-out"
        probe.rmdir()
    pytest.skip("no directory here that this user cannot write to")


def test_out_where_nothing_can_be_written(case):
    out = unwritable_place()
    refused_by_subprocess(case, case.build_args(out=out), f"--out {out}", "cannot write there")
    assert not out.exists()


# ---------------------------------------------------------------- build: the data folder


def test_data_folder_without_samples_jsonl(capsys, case):
    empty = case.tmp / "nodata"
    empty.mkdir()
    refused(capsys, case, case.build_args(data=empty), "nodata", "no samples.jsonl")


def test_data_is_a_regular_file(capsys, case):
    refused(capsys, case, case.build_args(data=case.base.target), "tiny-jetson.toml", "not a directory")


def test_malformed_jsonl_line(capsys, case):
    data = case.data()
    lines = (data / "samples.jsonl").read_text().splitlines()
    lines[2] = '{"image": "images/x.png", "text": '
    (data / "samples.jsonl").write_text("\n".join(lines) + "\n")
    refused(capsys, case, case.build_args(data=data), "samples.jsonl: line 3", "not valid JSON")


def test_samples_jsonl_not_utf8(capsys, case):
    data = case.data()
    text = (data / "samples.jsonl").read_text()
    (data / "samples.jsonl").write_bytes(text.replace('"text": "', '"text": "caf\xe9 ', 1).encode("latin-1"))
    refused(capsys, case, case.build_args(data=data), "samples.jsonl", "not UTF-8 text")


def test_empty_samples_jsonl(capsys, case):
    data = case.data()
    (data / "samples.jsonl").write_text("\n  \n")
    refused(capsys, case, case.build_args(data=data), "samples.jsonl", "no samples (the file is empty)")


def test_unknown_key_in_a_line(capsys, case):
    lines = case.lines()
    lines[4]["spilt"] = "train"
    refused(capsys, case, case.build_args(data=case.write_lines(lines)), "samples.jsonl: line 5", "unknown key 'spilt'")


def test_duplicate_sample_id(capsys, case):
    lines = case.lines()
    lines[1]["id"] = lines[6]["id"] = "same"
    refused(capsys, case, case.build_args(data=case.write_lines(lines)), "samples.jsonl: line 7", "duplicate id 'same'")


@pytest.mark.parametrize("text", ["", "   \t "], ids=["empty", "whitespace"])
def test_empty_or_whitespace_text(capsys, case, text):
    lines = case.lines()
    lines[3]["text"] = text
    refused(capsys, case, case.build_args(data=case.write_lines(lines)), "samples.jsonl: line 4", "'text' is empty")


def test_empty_calibration_split(capsys, case):
    """Every line names its split and none says calib: nothing to calibrate INT8 on."""
    lines = case.lines()
    for number, line in enumerate(lines):
        line["split"] = "eval" if number % 4 == 0 else "train"
    refused(capsys, case, case.build_args(data=case.write_lines(lines)), "samples.jsonl", "calib=0", "every split needs at least one sample")


def test_absolute_image_path(capsys, case):
    lines = case.lines()
    lines[0]["image"] = str(case.data() / lines[0]["image"])  # the file exists, but the path is absolute
    refused(capsys, case, case.build_args(data=case.write_lines(lines)), "samples.jsonl: line 1", "escapes the data directory")


def test_image_path_with_dot_dot(capsys, case):
    lines = case.lines()
    lines[0]["image"] = "../elsewhere.png"
    refused(capsys, case, case.build_args(data=case.write_lines(lines)), "samples.jsonl: line 1", "'../elsewhere.png' escapes")


def test_symlinked_image_that_leaves_the_data_folder(capsys, case):
    lines = case.lines()
    outside = case.tmp / "outside.png"
    shutil.copyfile(case.data() / lines[2]["image"], outside)
    (case.data() / "images" / "link.png").symlink_to(outside)
    lines[2]["image"] = "images/link.png"
    refused(capsys, case, case.build_args(data=case.write_lines(lines)), "samples.jsonl: line 3", "'images/link.png' escapes the data directory")


def test_missing_image(capsys, case):
    lines = case.lines()
    lines[5]["image"] = "images/gone.png"
    refused(capsys, case, case.build_args(data=case.write_lines(lines)), "samples.jsonl: line 6", "image not found", "gone.png")


def test_undecodable_image(capsys, case):
    lines = case.lines()
    (case.data() / lines[5]["image"]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    refused(capsys, case, case.build_args(data=case.write_lines(lines)), "samples.jsonl: line 6", "cannot read image", lines[5]["image"],
            "not an image format PIL recognizes")


def test_sixteen_bit_grayscale_image(capsys, case):
    """Values up to 65535 that an 8-bit conversion would clip to 255 without a word."""
    lines = case.lines()
    deep = (np.arange(72 * 72).reshape(72, 72) * 12).astype(np.uint16)
    Image.fromarray(deep).save(case.data() / lines[7]["image"])
    assert Image.open(case.data() / lines[7]["image"]).mode == "I;16"
    refused(capsys, case, case.build_args(data=case.write_lines(lines)), "samples.jsonl: line 8", lines[7]["image"], "16-bit grayscale",
            "clipped")


@pytest.mark.parametrize("content, expected", [
    ('["animal", ', "not valid JSON"),
    ('{"classes": ["a"]}', "expected a non-empty JSON list of class names"),
    ("[]", "expected a non-empty JSON list of class names"),
    ('["Activities", "Activities"]', "class 'Activities' is listed twice"),
], ids=["invalid-json", "not-a-list", "empty-list", "duplicate"])
def test_bad_labels_json(capsys, case, content, expected):
    data = case.data()
    (data / "labels.json").write_text(content)
    refused(capsys, case, case.build_args(data=data), "labels.json", expected)


def test_label_not_in_labels_json(capsys, case):
    lines = case.lines()
    classes = sorted({line["label"] for line in lines})
    (case.data() / "labels.json").write_text(json.dumps(classes[1:]))
    first = next(number for number, line in enumerate(lines, start=1) if line["label"] == classes[0])
    refused(capsys, case, case.build_args(data=case.data()), f"samples.jsonl: line {first}", f"unknown label '{classes[0]}'", "labels.json")


# ---------------------------------------------------------------- report and bench


def test_report_with_a_truncated_manifest(case):
    manifest = case.out / "manifest.json"
    manifest.write_text(manifest.read_text()[:200])
    refused_by_subprocess(case, ["report", "--out", str(case.out)], "manifest.json", "not a readable manifest")


@pytest.mark.parametrize("content, expected", [("[]", "a JSON list, not an object"), ('{"status": "ok"}', "no key 'target'"),
                                               ('{"status": "ok", "target": {"name": "x"}, "data": {}, "stages": [3], "engine": {}, '
                                                '"wall_s": 1}', "stages[0]")],
                         ids=["list", "missing-keys", "bad-stage"])
def test_report_with_json_that_is_not_a_manifest(capsys, case, content, expected):
    (case.out / "manifest.json").write_text(content)
    refused(capsys, case, ["report", "--out", str(case.out)], "manifest.json", "not a build manifest", expected)


def test_bench_with_a_corrupt_manifest(capsys, case):
    (case.out / "manifest.json").write_bytes(b"\xff\xfe{")
    refused(capsys, case, ["bench", "--out", str(case.out), "--rounds", "1", "--runs", "1"], "manifest.json", "not a readable manifest")


def test_bench_with_a_stage_artifact_missing(capsys, case):
    export = json.loads((case.out / "manifest.json").read_text())["stages"][1]
    shutil.rmtree((case.out / export["artifact"]["path"]).parent)
    refused(capsys, case, ["bench", "--out", str(case.out), "--rounds", "1", "--runs", "1"], "model.fp32.onnx", "the export stage's artifact",
            "is missing")


@pytest.mark.parametrize("flag, value", [("--rounds", "0"), ("--runs", "0"), ("--threads", "0"), ("--warmup", "-1")])
def test_bench_counts_below_their_floor(capsys, case, flag, value):
    refused(capsys, case, ["bench", "--out", str(case.out), flag, value], f"{flag} must be at least")


# ---------------------------------------------------------------- on the device: inspect, verify, engine


def test_inspect_a_truncated_onnx(capsys, case):
    model = case.bundle / "model.int8.onnx"
    truncated = case.tmp / "truncated.onnx"
    truncated.write_bytes(model.read_bytes()[:4000])
    refused(capsys, case, ["inspect", str(truncated), "--target", str(case.base.target)], "truncated.onnx", "not a readable ONNX model")


def test_inspect_a_missing_onnx(capsys, case):
    refused(capsys, case, ["inspect", str(case.tmp / "nowhere.onnx")], "nowhere.onnx", "ONNX model not found")


def verify_args(case: Case) -> list[str]:
    return ["verify", "--bundle", str(case.bundle), "--runtime", "ort"]


def test_verify_refuses_a_sha256sums_entry_with_dot_dot(case):
    """An entry outside the bundle whose hash matches (here the build's own manifest) must not pass."""
    outside = case.out / "manifest.json"
    sums = case.bundle / "SHA256SUMS"
    sums.write_text(sums.read_text() + f"{hashlib.sha256(outside.read_bytes()).hexdigest()}  ../manifest.json\n")
    refused_by_subprocess(case, verify_args(case), "SHA256SUMS:", "'../manifest.json' points outside the bundle")


def test_verify_refuses_a_sha256sums_entry_with_an_absolute_path(capsys, case):
    outside = case.out / "manifest.json"
    sums = case.bundle / "SHA256SUMS"
    sums.write_text(sums.read_text() + f"{hashlib.sha256(outside.read_bytes()).hexdigest()}  {outside}\n")
    refused(capsys, case, verify_args(case), "SHA256SUMS:", f"'{outside}' points outside the bundle")


def test_verify_refuses_a_symlink_in_the_bundle(capsys, case):
    """The model replaced by a link to a file of the same bytes outside the bundle, the checksums rewritten: still refused."""
    model = case.bundle / "model.int8.onnx"
    outside = case.tmp / "elsewhere.onnx"
    shutil.copyfile(model, outside)
    model.unlink()
    model.symlink_to(outside)
    case.resum()
    refused(capsys, case, verify_args(case), "model.int8.onnx", "a symbolic link", "regular files only")


def test_verify_refuses_a_tampered_file(capsys, case):
    lint = case.bundle / "lint.json"
    lint.write_text(lint.read_text() + " ")
    refused(capsys, case, verify_args(case), "lint.json", "checksum mismatch")


def test_verify_refuses_a_file_not_in_sha256sums(capsys, case):
    (case.bundle / "notes.txt").write_text("added by hand\n")
    refused(capsys, case, verify_args(case), "notes.txt", "not listed in SHA256SUMS")


def test_verify_refuses_a_malformed_sha256sums_line(capsys, case):
    sums = case.bundle / "SHA256SUMS"
    sums.write_text(sums.read_text() + "deadbeef  model.int8.onnx\n")
    refused(capsys, case, verify_args(case), "SHA256SUMS:", "not a sha256sum line")


def test_verify_of_a_missing_bundle(capsys, case):
    refused(capsys, case, ["verify", "--bundle", str(case.tmp / "no-bundle"), "--runtime", "ort"], "no-bundle", "bundle directory not found")


@pytest.mark.parametrize("damage", ["truncated", "not-a-zip", "member-missing"])
def test_verify_refuses_a_corrupt_golden_npz(capsys, case, damage):
    """Damaged past the checksums (SHA256SUMS rewritten for it): the golden set itself must be refused clearly."""
    golden = case.bundle / "golden.npz"
    data = golden.read_bytes()
    if damage == "truncated":
        golden.write_bytes(data[: len(data) // 2])
    elif damage == "not-a-zip":
        golden.write_bytes(b"\x93NUMPY" + b"\0" * 100)
    else:
        with np.load(golden) as arrays:
            kept = {name: arrays[name] for name in arrays.files if name != "int8_logits"}
        np.savez_compressed(golden, **kept)
    case.resum()
    refused(capsys, case, verify_args(case), "golden.npz", "not a readable golden set")


def test_verify_refuses_an_oversized_golden_npz(capsys, case):
    """A golden file whose arrays unpack to over GOLDEN_MAX_BYTES (5 MB on disk, zeros): refused before it is read."""
    golden = case.bundle / "golden.npz"
    shape = (128, 3, 1024, bundle_module.GOLDEN_MAX_BYTES // (128 * 3 * 1024 * 4) + 1)
    with zipfile.ZipFile(golden, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("image.npy", "w", force_zip64=True) as handle:
            np.lib.format.write_array_header_2_0(handle, {"descr": "<f4", "fortran_order": False, "shape": shape})
            chunk, left = bytes(1 << 24), int(np.prod(shape)) * 4
            while left > 0:
                handle.write(chunk[:left])
                left -= len(chunk)
    case.resum()
    refused(capsys, case, verify_args(case), "golden.npz", "MiB unpacked", "over the 1024 MiB")


@pytest.mark.parametrize("name, content, expected", [("thresholds.json", "{", "not readable JSON"),
                                                     ("thresholds.json", '{"compared_with": "int8_onnx"}', "no valid 'gate'"),
                                                     ("target.json", '["jetson"]', "expected a JSON object")],
                         ids=["thresholds-corrupt", "thresholds-no-gate", "target-not-object"])
def test_verify_refuses_a_broken_bundle_file(capsys, case, name, content, expected):
    (case.bundle / name).write_text(content)
    case.resum()
    refused(capsys, case, verify_args(case), name, expected)


def test_engine_for_a_bundle_built_for_another_target(capsys, case, monkeypatch):
    """The jetson bundle on an x86 host with an H200 and TensorRT 10.3: the engine would not load on the Jetson."""
    from pipeline import device_commands
    from pipeline.trt.engine import LocalTensorRT

    monkeypatch.setattr(device_commands, "local_tensorrt", lambda: LocalTensorRT("10.3.0.30", "NVIDIA H200", "9.0"))
    err = refused(capsys, case, ["engine", "--bundle", str(case.bundle)], "differs from the bundle's target 'jetson-orin-nano'",
                  "--allow-mismatch")
    assert "mismatch: the GPU here is NVIDIA H200 (compute capability 9.0)" in err


# ---------------------------------------------------------------- odd image modes that are accepted, converted the way load_rgb converts


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")  # PIL's advice to convert to RGBA, which load_rgb does
def test_cmyk_and_palette_with_transparency_are_converted_deterministically(case):
    """Not refused: 8 bits per channel, so nothing is clipped. A palette image's transparent entries are composited on
    white like the bundled RGBA emoji; CMYK goes through PIL's fixed CMYK->RGB conversion, the same on every run."""
    from pipeline.data import load_dataset
    from pipeline.data.base import load_rgb

    lines, data = case.lines(), case.data()
    indices = np.zeros((72, 72), dtype=np.uint8)
    indices[20:50, 10:60] = 1  # a blue bar on a transparent red background
    palette = Image.fromarray(indices, mode="P")
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * (3 * 254))
    palette.save(data / "images" / "palette.png", transparency=0)
    cmyk = Image.open(data / lines[1]["image"]).convert("RGB").convert("CMYK")
    cmyk.save(data / "images" / "cmyk.tif")
    assert Image.open(data / "images" / "palette.png").mode == "P" and Image.open(data / "images" / "cmyk.tif").mode == "CMYK"
    lines[0]["image"], lines[1]["image"] = "images/palette.png", "images/cmyk.tif"
    dataset = load_dataset(str(case.write_lines(lines)))  # accepted by the folder checks
    assert sum(len(split) for split in dataset.splits.values()) == len(lines)
    expected = np.where(indices[..., None] == 1, np.array([0, 0, 255], np.uint8), np.array([255, 255, 255], np.uint8))
    assert np.array_equal(load_rgb(data / "images" / "palette.png"), expected)
    assert np.array_equal(load_rgb(data / "images" / "cmyk.tif"), np.asarray(cmyk.convert("RGB")))
