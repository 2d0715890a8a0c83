"""Reliability through the CLI: a build SIGKILLed at a known point and rerun gives the bytes of one never stopped;
two builds into one out directory take turns (or the second, with --no-wait, fails at once and touches nothing).

The stop points are deterministic: the killed (or held) build runs with a hook from tests/kill_hooks.py that
SIGKILLs its own process at the chosen place, after writing a marker that says where it was; every test checks
the exit status (-9), the marker and what the kill left in the out directory before it reruns the same command.
The kill inside the source training is also the suite's determinism check: its rerun builds every stage from nothing
and must give the uninterrupted build's bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import write_emoji_folder, write_target
from pipeline.store import artifact_digest, sha256_file
from pipeline.training import TrainSettings

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
# fused-tiny on a 9-sample eval split: accuracy gates are opened; what is compared here is bytes.
LENIENT = {"quantize": {"max_drop_pts": 100.0, "min_agreement": 0.0}, "prune": {"max_drop_pts": 100.0}, "factorize": {"max_drop_pts": 100.0}}
COMPRESSION = {"prune_image": 0.5, "prune_text": 0.5, "prune_fusion": 0.5, "text_depth": 1, "embedding_energy": 0.8, "recovery_epochs": 1}
STAGES = ["source", "prune", "factorize", "export", "quantize"]
HOOKED = "import kill_hooks; kill_hooks.main()"
TIMEOUT = 600


@pytest.fixture(scope="module")
def build_args(tmp_path_factory) -> list[str]:
    """The one build command of this module; --out is relative, so bundle files that name paths match between runs."""
    inputs = tmp_path_factory.mktemp("inputs")
    data = write_emoji_folder(inputs / "emoji-small", per_class=4)
    target = write_target(inputs / "tiny-jetson.toml", gates=LENIENT, compression=COMPRESSION)
    return ["build", "--model", "fused-tiny", "--data", str(data), "--target", str(target), "--epochs", "2", "--out", "out", "--json"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}


def start(args: list[str], cwd: Path, hook: str | None = None, marker: Path | None = None) -> subprocess.Popen:
    """The CLI (python -m pipeline), or with a hook from kill_hooks installed (python -c ...)."""
    command = [sys.executable, "-m", "pipeline", *args] if hook is None else [sys.executable, "-c", HOOKED, hook, str(marker), *args]
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(args: list[str], cwd: Path, hook: str | None = None, marker: Path | None = None) -> subprocess.CompletedProcess:
    process = start(args, cwd, hook, marker)
    out, err = process.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def digests(out: Path) -> dict[str, str]:
    """sha256 of every stage artifact, as the manifest records it and as the files are now, and of every bundle file."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "ok" and [s["name"] for s in manifest["stages"]] == STAGES
    found = {}
    for stage in manifest["stages"]:
        assert artifact_digest(out / stage["artifact"]["path"]) == stage["artifact"]["sha256"], stage["name"]
        found[f"stages/{stage['name']}"] = stage["artifact"]["sha256"]
    bundle = out / manifest["engine"]["bundle"]
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    assert len(files) > 5, files
    found.update({f"bundle/{p.relative_to(bundle)}": sha256_file(p) for p in files})
    return found


def debris(out: Path) -> list[Path]:
    """Everything under out with a temp name (a dot first), the lock file apart: what a killed build leaves half-written."""
    return sorted(p for p in out.rglob(".*") if p != out / ".lock")


@dataclass(frozen=True)
class Reference:
    out: Path
    digests: dict[str, str]


@pytest.fixture(scope="module")
def reference(build_args, tmp_path_factory) -> Reference:
    """One uninterrupted build of the module's inputs: the bytes every resumed build must reproduce."""
    work = tmp_path_factory.mktemp("reference")
    result = run(build_args, work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not any(s["cached"] for s in json.loads(result.stdout)["stages"])
    return Reference(work / "out", digests(work / "out"))


def entries(out: Path, stage: str) -> tuple[list[str], list[str]]:
    """A stage's finished cache entries and its temp entries."""
    names = sorted(p.name for p in (out / "stages" / stage).iterdir()) if (out / "stages" / stage).is_dir() else []
    return [n for n in names if not n.startswith(".")], [n for n in names if n.startswith(".")]


KILLS = {  # point -> (stages finished before the kill, the stage killed mid-way)
    "training": ([], "source"),
    "onnx-write": (["source", "prune", "factorize"], "export"),
    "quantizer": (["source", "prune", "factorize", "export"], "quantize"),
}


@pytest.mark.parametrize("point", list(KILLS))
def test_a_build_killed_and_rerun_gives_the_bytes_of_an_uninterrupted_one(build_args, reference, tmp_path, point):
    finished, killed_in = KILLS[point]
    out, marker = tmp_path / "out", tmp_path / "killed.json"
    process = start(build_args, tmp_path, hook=point, marker=marker)
    _, err = process.communicate(timeout=TIMEOUT)

    # The kill happened, where the hook says, and in the stage it says.
    assert process.returncode == -signal.SIGKILL, err[-3000:]
    fact = json.loads(marker.read_text())
    assert fact["point"] == point and fact["pid"] == process.pid
    assert [line for line in err.splitlines() if line.startswith("[")][-1] == f"[{killed_in}] running", err[-3000:]
    assert not (out / "manifest.json").exists()  # SIGKILL: no chance to write one
    for stage in STAGES:
        done, temp = entries(out, stage)
        if stage in finished:
            assert len(done) == 1 and not temp, (stage, done, temp)
        elif stage == killed_in:
            assert not done and len(temp) == 1, (stage, done, temp)  # the entry's temp dir, never renamed into place
        else:
            assert not done and not temp, (stage, done, temp)
    work = (out / "stages" / killed_in / entries(out, killed_in)[1][0]).resolve()
    if point == "training":
        assert fact["batches_done"] == 1  # one optimizer step taken, killed as the next batch began
        assert not any(work.iterdir())  # the checkpoint is written only after training
    elif point == "onnx-write":
        half, complete = Path(fact["path"]), next((reference.out / "stages" / "export").glob("*/model.fp32.onnx"))
        assert half.parent == work and half.name == complete.name
        assert fact["size"] == complete.stat().st_size and half.stat().st_size == fact["written"] == fact["size"] // 2 > 0
        assert half.read_bytes() == complete.read_bytes()[:fact["written"]]  # the first half of the very bytes
    else:
        candidate = Path(fact["candidate"])
        assert candidate.is_file() and candidate.parent == work / "scratch" / "candidates"
        assert (work / "scratch" / "prepared.onnx").is_file() and not (work / "model.int8.onnx").exists()
    assert debris(out), "the kill left nothing half-written: it did not happen mid-stage"

    # The same command again, without the hook: the finished stages come from the cache, the rest is made anew, the same.
    resumed = run(build_args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [s["cached"] for s in json.loads(resumed.stdout)["stages"]] == [name in finished for name in STAGES]
    assert digests(out) == reference.digests
    assert not debris(out), "half-written debris survived the rerun"


# ---------------------------------------------------------------- two builds, one out directory


def held_build(args: list[str], cwd: Path, marker: Path) -> subprocess.Popen:
    """A build that has taken the out directory's lock and keeps it until marker.release appears (kill_hooks' hold point)."""
    first = start(args, cwd, hook="hold", marker=marker)
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists():  # a handshake, not a guessed delay: the hook writes the marker with the lock held
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the first build never took the lock"
        time.sleep(0.05)
    fact = json.loads(marker.read_text())
    assert fact["point"] == "hold" and fact["pid"] == first.pid and fact["lock"] == f"{first.pid}\n"  # the lock file names its holder
    return first


def release(first: subprocess.Popen, marker: Path) -> subprocess.CompletedProcess:
    marker.with_name(marker.name + ".release").touch()
    out, err = first.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(first.args, first.returncode, out, err)


def with_out(args: list[str], out: Path) -> list[str]:
    return [str(out) if a == "out" else a for a in args]


def test_a_second_build_waits_for_the_first_says_so_and_finds_its_stages_cached(build_args, reference, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "hold.json"
    args = with_out(build_args, out)
    first = held_build(args, tmp_path, marker)
    try:
        second = start(args, tmp_path)  # the same build, started while the first holds the lock
        said = []
        for line in second.stderr:
            said.append(line)
            assert not line.startswith("["), "".join(said)  # no stage may start while the first build holds the lock
            if line.startswith("waiting for"):
                break
        assert said and said[-1] == f"waiting for {out}: another build (pid {first.pid}) is using this output directory\n", "".join(said)
        assert second.poll() is None  # it waits
        assert not (out / "manifest.json").exists() and not (out / "stages").exists()  # the first, held, has made nothing yet
        done = release(first, marker)
    finally:
        if first.poll() is None:
            first.kill()
    assert done.returncode == 0, done.stderr[-3000:]
    rest_out, rest_err = second.communicate(timeout=TIMEOUT)
    assert second.returncode == 0, rest_err[-3000:]
    assert "waiting for" not in rest_err  # said once
    first_stages, second_stages = json.loads(done.stdout)["stages"], json.loads(rest_out)["stages"]
    assert not any(s["cached"] for s in first_stages) and all(s["cached"] for s in second_stages)
    assert [s["sha256"] for s in second_stages] == [s["sha256"] for s in first_stages] \
        == [reference.digests[f"stages/{name}"] for name in STAGES]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root (root too): its kind, its bytes if a file, its mtime."""
    return {str(p.relative_to(root)): (p.is_dir(), None if p.is_dir() else p.read_bytes(), p.stat().st_mtime_ns)
            for p in [root, *root.rglob("*")]}


def test_with_no_wait_a_second_build_fails_at_once_and_changes_nothing(build_args, reference, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "hold.json"
    shutil.copytree(reference.out, out, ignore=shutil.ignore_patterns(".lock"))  # a warm out directory: plenty to disturb
    args = with_out(build_args, out)
    first = held_build(args, tmp_path, marker)
    try:
        before = snapshot(out)
        started = time.monotonic()
        refused = run([*args, "--no-wait"], tmp_path)
        refused_in = time.monotonic() - started
        after = snapshot(out)
        done = release(first, marker)
    finally:
        if first.poll() is None:
            first.kill()
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr == f"error: {out}: another build (pid {first.pid}) is using this output directory; " \
                             "without --no-wait this build would wait for it\n"
    assert refused.stdout == ""  # no summary: there is no manifest of this build
    assert after == before, "the refused build changed the out directory"
    assert refused_in < TIMEOUT / 2
    assert done.returncode == 0, done.stderr[-3000:]  # the first build, undisturbed, finishes (from the cache)
    assert all(s["cached"] for s in json.loads(done.stdout)["stages"])


def test_naming_the_default_recovery_seed_finds_the_compression_cached_and_another_seed_retrains(build_args, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference.out, out, ignore=shutil.ignore_patterns(".lock"))
    args = with_out(build_args, out)
    same = run([*args, "--recovery-seed", str(TrainSettings().seed)], tmp_path)  # what the build resolves no flag to
    assert same.returncode == 0, same.stderr[-3000:]
    assert [(s["name"], s["cached"]) for s in json.loads(same.stdout)["stages"]] == [(name, True) for name in STAGES]
    other = run([*args, "--recovery-seed", str(TrainSettings().seed + 1)], tmp_path)
    assert other.returncode == 0, other.stderr[-3000:]
    cached = {s["name"]: s["cached"] for s in json.loads(other.stdout)["stages"]}
    assert (cached["source"], cached["prune"], cached["factorize"]) == (True, False, False)
