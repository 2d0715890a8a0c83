"""report.html: written beside report.md by a real build (ok and failed), self-contained, and rendered by headless Chromium."""

from __future__ import annotations

import copy
import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers import write_emoji_folder, write_target
from pipeline.report_html import fleet_html, report_html

REPO = Path(__file__).resolve().parent.parent
# fused-tiny on a few eval samples: one sample is many points, so the accuracy gates are opened (as tests/test_cli.py's LENIENT)
LENIENT = {"quantize": {"max_drop_pts": 100.0, "min_agreement": 0.0}, "prune": {"max_drop_pts": 100.0}, "factorize": {"max_drop_pts": 100.0}}
STRICT = {**LENIENT, "quantize": {"min_agreement": 1.0, "max_drop_pts": 0.0, "max_abs_error": 1e-9}}  # INT8 exact: fails
# an attribute that makes a browser fetch something, unless it points inside the page (#id)
FETCHING = re.compile(r"""\b(?:src|href|action|srcset|poster|data)\s*=\s*["']?(?![#"'])""", re.I)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    """One real build (fused-tiny, 1 epoch, every stage, latency measured), and the same build from its cache with an impossible INT8 gate."""
    work = tmp_path_factory.mktemp("report-html")
    data = write_emoji_folder(work / "emoji-small", per_class=4)
    args = ["build", "--model", "fused-tiny", "--data", str(data), "--epochs", "1", "--latency"]
    target = write_target(work / "lenient.toml", gates=LENIENT, compression={"recovery_epochs": 1})
    ok = run_cli(*args, "--target", str(target), "--out", str(work / "ok"), cwd=work)
    assert ok.returncode == 0, ok.stderr[-3000:]
    shutil.copytree(work / "ok", work / "failed", ignore=shutil.ignore_patterns(".lock"))
    strict = write_target(work / "strict.toml", gates=STRICT, compression={"recovery_epochs": 1})
    failed = run_cli(*args, "--target", str(strict), "--out", str(work / "failed"), cwd=work)
    assert failed.returncode == 3, failed.stderr[-3000:]
    return {"ok": work / "ok", "failed": work / "failed"}


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def expected_plots(manifest: dict) -> int:
    """accuracy, agreement, size, latency where any stage was timed, and one sensitivity plot per stage that measured some."""
    stages = manifest["stages"]
    timed = any((s.get("footprint") or {}).get("latency_ms") for s in stages)
    return 3 + timed + sum(bool((s.get("facts") or {}).get("sensitivity")) for s in stages)


def assert_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert FETCHING.findall(page) == []
    assert not re.search(r"<script|<link|<iframe|<img|@import|url\((?!#)", page, re.I)
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # the plots' ids are prefixed: no two plots share one


def test_a_build_writes_report_html_beside_report_md(builds):
    out = builds["ok"]
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    page = (out / "report.html").read_text()
    manifest = manifest_of(out)
    assert page == report_html(manifest)  # written from the manifest beside it, and the same bytes every time
    assert_self_contained(page)
    assert len(manifest["stages"]) == 5 and expected_plots(manifest) == 6  # prune and factorize each measured their units' sensitivity
    assert page.count("<svg") == expected_plots(manifest)
    for stage in manifest["stages"]:
        assert f"<td>{stage['name']}</td>" in page
    assert "OK: every gate held" in page
    assert "engine: deferred" in page and "bundle: <code>bundle</code>" in page
    assert "not measured" not in page  # --latency timed every stage
    for heading in ("Where accuracy went", "Where size and latency went", "Sensitivity of each compressed unit", "INT8: what stayed in float"):
        assert heading in page
    prune = next(s for s in manifest["stages"] if s["name"] == "prune")
    for unit in prune["facts"]["sensitivity"]:  # each pruned unit, per branch, in the table under its plot
        assert f">{unit['name']}<" in page


def test_a_failed_build_writes_its_page_with_the_failure_on_top(builds):
    out = builds["failed"]
    manifest = manifest_of(out)
    assert manifest["status"] == "failed"
    page = (out / "report.html").read_text()
    assert_self_contained(page)
    assert page.count("<svg") == expected_plots(manifest)
    status = page[page.index('<p class="status"'):]
    assert status.split("</p>")[0].endswith("FAILED: " + html.escape(manifest["failure"]))
    assert f"<td>{manifest['stages'][-1]['name']} (gate failed)</td>" in page
    quantize = next(s for s in manifest["stages"] if s["name"] == "quantize")["facts"]
    for region in quantize["float_regions"] + quantize["fallback_tried"]:  # what the INT8 fallback kept in float, or tried to
        assert f'<td class="text">{region["name"]}</td>' in page


def test_manifests_of_builds_that_stopped_early_render(builds):
    """An error before any stage, a stage with no parity or footprint, and hostile text: the page renders and escapes."""
    manifest = manifest_of(builds["ok"])
    error = copy.deepcopy(manifest)
    error.update(status="error", failure="InputError: <b>bad</b> & worse", error={"type": "InputError", "message": "<b>bad</b> & worse"},
                 engine={"status": "not-run"})
    error["stages"] = error["stages"][:2]
    error["stages"][1].update(parity=None, footprint=None, facts={}, gate=None)
    page = report_html(error)
    assert_self_contained(page)
    assert "ERROR: InputError: &lt;b&gt;bad&lt;/b&gt; &amp; worse" in page and "<b>bad</b>" not in page
    assert "<td>prune</td>" in page and "not measured" in page
    nothing = {**copy.deepcopy(manifest), "status": "interrupted", "failure": "interrupted by SIGINT", "stages": []}
    page = report_html(nothing)
    assert "INTERRUPTED" in page and "No stage finished" in page and "<svg" not in page
    assert "<h1>" in report_html({"status": "error"})  # not even a skeleton: still a page


def test_the_fleet_page_compares_targets(builds):
    ok, failed = manifest_of(builds["ok"]), manifest_of(builds["failed"])
    page = fleet_html({"jetson <lenient>": ok, "jetson-strict": failed})
    assert_self_contained(page)
    assert page.count("<svg") == 1  # one plot comparing the targets
    assert "edgepipe fleet: 2 targets, 1 ok" in page
    assert "<h2>jetson &lt;lenient&gt;</h2>" in page and "<h2>jetson-strict</h2>" in page
    assert "OK: every gate held" in page and "FAILED: " in page
    assert page.count("<table>") == 3  # the fleet's rows, then a table per target
    assert "<h1>" in fleet_html({})


def chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = shutil.which("chromium")
    if command is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium): the page is not rendered in a browser")
    return subprocess.run([command, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", f"--user-data-dir={cwd / 'profile'}",
                           "--window-size=1200,3000", *args], cwd=cwd, capture_output=True, text=True, timeout=180)


def test_chromium_renders_the_page_with_its_plots(builds, tmp_path):
    out = builds["ok"]
    page = out / "report.html"
    dom = chromium("--dump-dom", page.as_uri(), cwd=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    manifest = manifest_of(out)
    assert dom.stdout.count("<svg") == expected_plots(manifest)  # parsed as inline SVG, after rendering
    assert dom.stdout.count("<text") > 50 and "Accuracy per stage" in dom.stdout  # the plots' words are text, not paths
    shot = tmp_path / "report.png"
    result = chromium(f"--screenshot={shot}", page.as_uri(), cwd=tmp_path)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 3000)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # text, tables and plots, not a blank page
    banner = image.crop((0, 0, 1200, 300))  # the status bar in the build's colour (ok: green) near the top
    assert sum(count for count, rgb in banner.getcolors(maxcolors=1 << 20) if rgb == (0x1A, 0x7F, 0x37)) > 5000


def test_the_report_command_writes_the_page_again_for_an_existing_build(builds, tmp_path, capsys):
    """A build made before report.html existed (the page removed here) gets it from its manifest: the same bytes a build writes."""
    from pipeline.cli import main

    out = tmp_path / "ok"
    shutil.copytree(builds["ok"], out, ignore=shutil.ignore_patterns(".lock"))
    (out / "report.html").unlink()
    assert main(["report", "--out", str(out), "--html"]) == 0
    assert (out / "report.html").read_bytes() == (builds["ok"] / "report.html").read_bytes()
    assert "wrote" in capsys.readouterr().err
