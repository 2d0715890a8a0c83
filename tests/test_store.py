import multiprocessing
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
        release.wait(10)


def test_second_build_on_same_directory_is_refused(tmp_path):
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(PipelineError, match="another build"):
            with Store(tmp_path).lock():
                pass
    finally:
        release.set()
        holder.join(10)


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
    debris = [tmp_path / "stages" / "prune" / ".aaaaaaaaaaaaaaaa.x1y2z3", tmp_path / "outputs" / ".0123.npy.abc.tmp"]
    debris[0].mkdir(parents=True)
    (debris[0] / "model.pt").write_bytes(b"half")
    debris[1].parent.mkdir(parents=True, exist_ok=True)
    debris[1].write_bytes(b"half")
    with store.lock():
        assert not any(p.exists() for p in debris)
    assert store.cached("prune", "a" * 64) == finished  # finished entries are untouched


def _artifact_in(workdir: Path) -> Artifact:
    path = workdir / "model.bin"
    path.write_bytes(b"complete")
    return Artifact("onnx", path, sha256_file(path))
