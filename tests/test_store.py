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
