"""The output directory: atomic writes, content hashes, the stage cache, a lock.

Everything a stage writes lands in a temporary directory first and is renamed
into place only when complete, so a killed build never leaves a half-written
artifact that a later run would trust. A cache entry is found by a key that
hashes everything that changes the stage's output (its config, its input,
the tool versions and the code it runs); on a hit the artifact's sha256 is
checked again before it is reused, and so are the cached logits the gates read.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from pipeline.artifacts import Artifact
from pipeline.distributed import World, barrier, broadcast_object
from pipeline.errors import PipelineError

ARTIFACT_RECORD = "artifact.json"
LOCK_FILE = ".lock"  # flock()ed by the build using the directory; holds its pid while it does


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(stage: str, settings: Mapping[str, Any], input_sha: str, versions: Mapping[str, str]) -> str:
    """The key of a stage's output: its settings, its input's content and the tool versions."""
    payload = {"stage": stage, "settings": settings, "input": input_sha, "versions": versions}
    return sha256_bytes(canonical_json(payload).encode())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data to path through a temp file, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


class Store:
    """out/<target>/: the manifest, the reports, the bundle; and the stage cache (entries and cached eval outputs).

    The cache lives in the out directory itself unless `cache` names another: the targets of a fleet
    build, or a CI's successive runs, share one cache, and a stage whose key is the same runs once.

    Under torchrun (world.active) every process builds, and only rank 0 (the writer) writes: it holds
    the locks, commits the entries and saves the measured outputs; the others run each stage's work
    beside it (their trainings meet rank 0's in the all-reduce), discard what they made, and read
    rank 0's entry once it is committed. Every method a build calls is called by every process in the
    same order, so the meetings (a broadcast of rank 0's cache verdict, a barrier after each write)
    pair up; the out directory and the cache must be on a file system every process sees.
    """

    def __init__(self, root: Path, cache: Path | None = None, world: World = World()):
        self.root = Path(root)
        self.cache_root = Path(cache) if cache is not None else self.root
        self.world = world

    def solo(self) -> "Store":
        """This store for rank 0 alone (the deploy step, which the other processes do not take part in)."""
        return Store(self.root, self.cache_root if self.cache_root != self.root else None)

    def relative(self, path: Path) -> str:
        """path as the manifest writes it: relative to the out directory (a shared cache's entries start with ..)."""
        return os.path.relpath(path, self.root)

    @contextlib.contextmanager
    def lock(self, wait: bool = True, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold an exclusive lock on the output directory (and on a cache kept elsewhere, taken first) for one build.

        The lock file records the holder's pid. When another build holds the lock, wait for it
        (on_wait hears one line naming the directory and the holder first), or with wait=False
        raise PipelineError at once, having changed nothing in the directory. A shared cache is
        locked for the whole build too: the sweep of a killed build's debris must never meet
        another build's work in progress. Under torchrun only rank 0 locks and sweeps.
        """
        if not self.world.is_writer:
            yield
            return
        with contextlib.ExitStack() as held:
            if self.cache_root != self.root:
                held.enter_context(_locked(self.cache_root, "stage cache", wait, on_wait))
            held.enter_context(_locked(self.root, "output directory", wait, on_wait))
            self.sweep_leftovers()
            yield

    def sweep_leftovers(self) -> list[Path]:
        """Remove what a killed build left half-written: temp entries and temp files (their names start with a dot).

        Only the build holding the lock writes here, so any such entry is debris: a signal or SIGKILL that
        arrived between a temp directory's creation and its rename. Finished entries are never touched.
        """
        debris = [p for p in (self.cache_root / "stages").glob("*/.*") if p.is_dir()]
        debris += [p for p in self.root.glob(".bundle.*") if p.is_dir()]  # write_bundle's work and swap directories
        debris += [p for p in (*(self.cache_root / "outputs").glob(".*.tmp"), *self.root.glob(".*.tmp")) if p.is_file()]
        for path in debris:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return debris

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.cache_root / "stages" / stage / key[:16]

    def cached(self, stage: str, key: str) -> Artifact | None:
        """The artifact stored under key, if present and its bytes still match (rank 0's verdict, for every process)."""
        found = self._entry(stage, key)
        if not self.world.active:
            return found
        if not broadcast_object(found is not None):
            return None
        return found if found is not None else self._missing(stage)

    def _missing(self, stage: str) -> Artifact:
        raise PipelineError(f"rank {self.world.rank}: rank 0's '{stage}' entry is not in {self.cache_root / 'stages'} as this process sees it: "
                            "under torchrun the out directory (and --cache) must be on a file system every process sees")

    def _entry(self, stage: str, key: str) -> Artifact | None:
        entry = self.stage_dir(stage, key)
        record = entry / ARTIFACT_RECORD
        if not record.is_file():
            return None
        try:
            data = json.loads(record.read_text())
            if data.get("key") != key:
                return None
            artifact = Artifact.from_json(data["artifact"], relative_to=entry)
        except (ValueError, KeyError, TypeError):
            return None
        if not artifact.path.exists() or artifact_digest(artifact.path) != artifact.sha256:
            return None
        return artifact

    def commit(self, stage: str, key: str, produce: Callable[[Path], Artifact]) -> Artifact:
        """Run produce(workdir) in a temp dir, then move the finished entry into place (rank 0's, for every process)."""
        if not self.world.is_writer:
            return self._follow(stage, key, produce)
        artifact = self._commit(stage, key, produce)
        barrier()  # the others read it now
        return artifact

    def _follow(self, stage: str, key: str, produce: Callable[[Path], Artifact]) -> Artifact:
        """A process other than rank 0: do the stage's work beside rank 0 (its trainings need every process), keep rank 0's entry."""
        work = Path(tempfile.mkdtemp(prefix=f"edgepipe-rank{self.world.rank}-{stage}-"))
        try:
            produce(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        barrier()  # rank 0 has committed
        return self._entry(stage, key) or self._missing(stage)

    def _commit(self, stage: str, key: str, produce: Callable[[Path], Artifact]) -> Artifact:
        final = self.stage_dir(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        os.chmod(work, 0o755)  # mkdtemp makes it private; artifacts are meant to be shared
        try:
            artifact = produce(work)
            relative = artifact.path.relative_to(work)
            record = {"key": key, "stage": stage, "artifact": artifact.to_json(relative_to=work)}
            (work / ARTIFACT_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
            fsync_tree(work)
            if final.exists():
                shutil.rmtree(final)
            os.replace(work, final)
            _fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return Artifact(kind=artifact.kind, path=final / relative, sha256=artifact.sha256, meta=artifact.meta)

    def stored_array(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The array under key, computed (by rank 0 alone) and saved when absent: every process gets rank 0's."""
        if self.world.is_writer:
            array = self.cached_array(key)
            if array is None:
                array = compute()
                self.save_array(key, array)
        barrier()
        if self.world.is_writer:
            return array
        found = self.cached_array(key)
        if found is None:
            raise PipelineError(f"rank {self.world.rank}: rank 0's outputs are not in {self.cache_root / 'outputs'} as this process sees it: "
                                "under torchrun the out directory (and --cache) must be on a file system every process sees")
        return found

    def stored_json(self, key: str, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """The JSON value under key and whether an earlier build stored it; computed by rank 0 alone and saved when absent."""
        value = self.cached_json(key) if self.world.is_writer else None
        found = value is not None
        if self.world.is_writer and value is None:
            value = compute()
            self.save_json(key, value)
        barrier()
        if not self.world.is_writer:
            value = self.cached_json(key)
        return value, found

    def cached_array(self, key: str) -> np.ndarray | None:
        """The array stored under key, if present and its bytes still match the sha256 written beside it."""
        path = self.cache_root / "outputs" / f"{key[:32]}.npy"
        digest = path.with_suffix(".npy.sha256")
        try:
            data = path.read_bytes()
            if sha256_bytes(data) != digest.read_text().strip():
                return None
            return np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError):
            return None

    def save_array(self, key: str, array: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        path = self.cache_root / "outputs" / f"{key[:32]}.npy"
        atomic_write_bytes(path, buffer.getvalue())
        atomic_write_text(path.with_suffix(".npy.sha256"), sha256_bytes(buffer.getvalue()) + "\n")  # written last: its presence vouches

    def cached_json(self, key: str) -> Any | None:
        path = self.cache_root / "outputs" / f"{key[:32]}.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (ValueError, OSError):
            return None

    def save_json(self, key: str, value: Any) -> None:
        atomic_write_json(self.cache_root / "outputs" / f"{key[:32]}.json", value)


@contextlib.contextmanager
def _locked(directory: Path, what: str, wait: bool, on_wait: Callable[[str], None] | None) -> Iterator[None]:
    """flock() directory/.lock exclusively, writing this process's pid into it while held."""
    directory.mkdir(parents=True, exist_ok=True)
    # O_RDWR without O_TRUNC: a build that waits (or gives up) leaves the holder's pid in place
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(handle)
            if not wait:
                raise PipelineError(f"{directory}: another build ({holder}) is using this {what}; "
                                    "without --no-wait this build would wait for it") from None
            if on_wait is not None:
                on_wait(f"waiting for {directory}: another build ({holder}) is using this {what}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _lock_holder(handle: io.TextIOBase) -> str:
    """Who holds the lock, as the lock file says ("pid N"); the holder may not have written its pid yet."""
    handle.seek(0)
    text = handle.read(64).strip()
    return f"pid {text}" if text.isdigit() else "pid unknown"


def artifact_digest(path: Path) -> str:
    """sha256 of a file, or of a directory's files (names and bytes, in sorted order)."""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(item.relative_to(path)).encode())
        digest.update(sha256_file(item).encode())
    return digest.hexdigest()
