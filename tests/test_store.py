import multiprocessing
import os
from pathlib import Path

import pytest

from pipeline.artifacts import Artifact
from pipeline.errors import PipelineError
from pipeline.store import Store, atomic_write_bytes, cache_key, sha256_file


def _produce(text: str):
    def produce(workdir: Path) -> Artifact:
        path = workdir / "model.bin"
        path.write_text(text)
        return Artifact("onnx", path, sha256_file(path), {"n": 1})
    return produce


def test_commit_then_cached_returns_same_artifact(tmp_path):
    store = Store(tmp_path)
    key = cache_key("export", {"a": 1}, "input-sha", {"torch": "x"})
    assert store.cached("export", key) is None
    made = store.commit("export", key, _produce("hello"))
    assert made.path.read_text() == "hello"
    again = store.cached("export", key)
    assert again == made


def test_key_changes_with_settings_input_and_versions():
    base = cache_key("s", {"a": 1}, "x", {"torch": "1"})
    assert base != cache_key("s", {"a": 2}, "x", {"torch": "1"})
    assert base != cache_key("s", {"a": 1}, "y", {"torch": "1"})
    assert base != cache_key("s", {"a": 1}, "x", {"torch": "2"})
    assert base == cache_key("s", {"a": 1}, "x", {"torch": "1"})


def test_tampered_artifact_is_not_trusted(tmp_path):
    store = Store(tmp_path)
    key = cache_key("export", {}, "x", {})
    made = store.commit("export", key, _produce("hello"))
    made.path.write_text("hellO")
    assert store.cached("export", key) is None


def test_failed_stage_leaves_nothing_behind(tmp_path):
    store = Store(tmp_path)
    key = cache_key("export", {}, "x", {})

    def broken(workdir: Path) -> Artifact:
        (workdir / "half.onnx").write_text("half")
        raise RuntimeError("killed mid-way")

    with pytest.raises(RuntimeError):
        store.commit("export", key, broken)
    assert store.cached("export", key) is None
    assert list((tmp_path / "stages" / "export").iterdir()) == []


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "manifest.json"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def _hold_lock(root, ready, release):
    with Store(Path(root)).lock():
        ready.set()
        release.wait(30)


@pytest.fixture
def held(tmp_path):
    """Another process holding the lock on tmp_path until release is set; yields (process, release)."""
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        yield holder, release
    finally:
        release.set()
        holder.join(30)


def test_without_waiting_a_second_build_is_refused_naming_the_directory_and_the_holder(tmp_path, held):
    holder, _ = held
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")}
    with pytest.raises(PipelineError, match="another build") as refused:
        with Store(tmp_path).lock(wait=False):
            pytest.fail("the lock was granted while another process held it")
    assert str(tmp_path) in str(refused.value) and f"pid {holder.pid}" in str(refused.value)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")} == before  # the holder's pid stays


def test_a_second_build_waits_for_the_lock_and_says_so_once(tmp_path, held):
    holder, release = held
    said = []

    def on_wait(message):  # the holder finishes only once the waiter has said it waits: no timing guessed
        said.append(message)
        release.set()

    with Store(tmp_path).lock(on_wait=on_wait):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    assert len(said) == 1 and str(tmp_path) in said[0] and f"pid {holder.pid}" in said[0]
    assert (tmp_path / ".lock").read_text() == ""  # released: no holder named


def test_an_uncontended_lock_does_not_wait(tmp_path):
    with Store(tmp_path).lock(wait=False, on_wait=lambda message: pytest.fail(message)):
        pass
    with Store(tmp_path).lock(on_wait=lambda message: pytest.fail(message)):
        pass


def test_cached_logits_are_checked_like_artifacts(tmp_path):
    import numpy as np

    store = Store(tmp_path)
    logits = np.arange(12, dtype=np.float32).reshape(3, 4)
    store.save_array("k" * 64, logits)
    assert np.array_equal(store.cached_array("k" * 64), logits)
    path = next((tmp_path / "outputs").glob("*.npy"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one logit's last byte: still a loadable array, no longer the one measured
    path.write_bytes(bytes(data))
    assert store.cached_array("k" * 64) is None
    store.save_array("k" * 64, logits)
    path.with_suffix(".npy.sha256").unlink()  # an array without its checksum (a write cut short) is not trusted either
    assert store.cached_array("k" * 64) is None


def test_the_next_build_sweeps_what_a_killed_one_left_half_written(tmp_path):
    store = Store(tmp_path)
    finished = store.commit("prune", "a" * 64, lambda wd: _artifact_in(wd))
    debris = [tmp_path / "stages" / "prune" / ".aaaaaaaaaaaaaaaa.x1y2z3", tmp_path / "outputs" / ".0123.npy.abc.tmp",
              tmp_path / ".bundle.k3j2", tmp_path / ".bundle.old.9x8y"]  # write_bundle's work and swap directories
    for path in (debris[0], debris[2], debris[3]):
        path.mkdir(parents=True)
        (path / "model.int8.onnx").write_bytes(b"half")
    debris[1].parent.mkdir(parents=True, exist_ok=True)
    debris[1].write_bytes(b"half")
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "SHA256SUMS").write_text("finished\n")
    with store.lock():
        assert not any(p.exists() for p in debris)
    assert store.cached("prune", "a" * 64) == finished  # finished entries are untouched
    assert (tmp_path / "bundle" / "SHA256SUMS").read_text() == "finished\n"


def _artifact_in(workdir: Path) -> Artifact:
    path = workdir / "model.bin"
    path.write_bytes(b"complete")
    return Artifact("onnx", path, sha256_file(path))
