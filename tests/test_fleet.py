"""A fleet build through the real CLI: several targets in one run share one stage cache; one target's failed gate stops no other."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import write_target
from pipeline.cli import main

# fused-tiny without compression: the source and its export are the same for every target, so the fleet trains once and
# exports once (an export's key holds no gate); each target quantizes for itself (its form and its gate tune the fallback).
FAST = ["--model", "fused-tiny", "--no-compression", "--epochs", "2"]


def strict_target(path: Path) -> Path:
    """The jetson target under another name with an export gate no export meets (logits exact to 1e-9): it must fail."""
    write_target(path, gates={"export": {"max_abs_error": 1e-9}})
    text = path.read_text().replace('name = "jetson-orin-nano"', 'name = "jetson-strict"').replace('aliases = ["jetson"]', "aliases = []")
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    work = tmp_path_factory.mktemp("fleet")
    strict = strict_target(work / "jetson-strict.toml")
    out = work / "out"
    code = main(["build", *FAST, "--target", f"jetson,cpu,{strict}", "--out", str(out), "--json"])
    return out, code


def manifests(out: Path) -> dict[str, dict]:
    return {name: json.loads((out / name / "manifest.json").read_text()) for name in ("jetson-orin-nano", "cpu", "jetson-strict")}


def stage(manifest: dict, name: str) -> dict:
    return next(s for s in manifest["stages"] if s["name"] == name)


def test_a_stage_the_targets_share_runs_once_and_the_others_find_it_cached(fleet):
    out, _ = fleet
    built = manifests(out)
    for name in ("source", "export"):
        shas = {target: stage(m, name)["artifact"]["sha256"] for target, m in built.items()}
        assert len(set(shas.values())) == 1, shas
        assert [stage(m, name)["cached"] for m in built.values()] == [False, True, True]  # made by the first target only
    # the cpu form is its own INT8 model; jetson-strict stopped at its export gate, before quantizing
    assert not stage(built["cpu"], "quantize")["cached"]
    assert stage(built["cpu"], "quantize")["artifact"]["sha256"] != stage(built["jetson-orin-nano"], "quantize")["artifact"]["sha256"]
    assert [s["name"] for s in built["jetson-strict"]["stages"]] == ["source", "export"]
    for target, manifest in built.items():  # every artifact lives once, in the shared cache, and each manifest finds it
        assert manifest["cache"] == "../cache"
        for entry in manifest["stages"]:
            assert entry["artifact"]["path"].startswith("../cache/stages/")
            assert (out / target / entry["artifact"]["path"]).exists()
    assert not any((out / target / "stages").exists() for target in built)


def test_one_target_failing_its_gate_stops_no_other_and_the_exit_code_is_the_worst(fleet, capsys):
    out, code = fleet
    assert code == 3  # jetson-strict's gate; the others passed
    built = manifests(out)
    assert {t: m["status"] for t, m in built.items()} == {"jetson-orin-nano": "ok", "cpu": "ok", "jetson-strict": "failed"}
    assert "max abs logit error" in built["jetson-strict"]["failure"] and "at stage 'export'" in built["jetson-strict"]["failure"]
    assert built["jetson-orin-nano"]["engine"]["status"] == "deferred" and (out / "jetson-orin-nano" / "bundle" / "SHA256SUMS").is_file()
    assert not (out / "jetson-strict" / "bundle").exists()  # a failed gate ships nothing
    summary = json.loads((out / "fleet.json").read_text())
    assert summary["status"] == "failed" and summary["exit_code"] == 3
    assert [(t["target"], t["status"], t["exit_code"]) for t in summary["targets"]] == \
        [("jetson-orin-nano", "ok", 0), ("cpu", "ok", 0), ("jetson-strict", "failed", 3)]
    for entry in summary["targets"]:
        assert entry["stage"] == ("export" if entry["target"] == "jetson-strict" else "quantize")
        assert entry["accuracy"] == stage(built[entry["target"]], entry["stage"])["parity"]["accuracy"]
        assert entry["delta_ci_pts"][0] <= entry["delta_pts"] <= entry["delta_ci_pts"][1]
    assert [t["engine"]["status"] for t in summary["targets"]] == ["deferred", "not-applicable", "not-run"]
    shared = {s["stage"]: s for s in summary["shared"]}
    assert shared["source"]["made_by"] == "jetson-orin-nano" and shared["source"]["ran"] == 1 and len(shared["source"]["targets"]) == 3
    page = (out / "fleet.html").read_text()
    assert all(name in page for name in built) and "<svg" in page
    table = (out / "fleet.md").read_text()
    assert "shared: source" in table and "jetson-strict: " in table


def test_a_fleet_rebuilt_unchanged_is_all_cache_hits(fleet, tmp_path, capsys):
    built, _ = fleet
    out = tmp_path / "out"  # a copy: the other tests read the first build's files, in any order
    shutil.copytree(built, out, ignore=shutil.ignore_patterns(".lock"))
    before = json.loads((out / "fleet.json").read_text())
    capsys.readouterr()
    code = main(["build", *FAST, "--target", f"jetson,cpu,{built.parent / 'jetson-strict.toml'}", "--out", str(out), "--json"])
    assert code == 3
    again = json.loads(capsys.readouterr().out)  # --json: stdout holds the fleet summary alone
    assert again["targets"][0]["target"] == "jetson-orin-nano"
    assert all(s["cached"] for t in again["targets"] for s in t["stages"])
    assert [[s["sha256"] for s in t["stages"]] for t in again["targets"]] == [[s["sha256"] for s in t["stages"]] for t in before["targets"]]


@pytest.mark.parametrize("spec, named", [("jetson,jetson-orin-nano", "'jetson-orin-nano' names target 'jetson-orin-nano' a second time"),
                                         ("jetson,", "an empty name"), ("jetson,nope", "unknown target 'nope'")])
def test_a_bad_target_list_is_refused_before_anything_is_built(tmp_path, capsys, spec, named):
    out = tmp_path / "out"
    assert main(["build", *FAST, "--target", spec, "--out", str(out)]) == 2
    assert named in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
