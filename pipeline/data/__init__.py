"""Data sets: a registry of named ones, and the user folder format.

    load_dataset("emoji")          the bundled Twemoji data set
    load_dataset("path/to/dir")    a folder with samples.jsonl (see folder.py)

A registered name wins over a directory of the same name; write "./emoji" to
mean the directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.data.base import SPLITS, Dataset, Sample, load_rgb
from pipeline.data.emoji import load_emoji
from pipeline.data.folder import load_folder
from pipeline.errors import InputError

DatasetLoader = Callable[[int], Dataset]

# name -> loader(seed); register more by adding an entry.
DATASETS: dict[str, DatasetLoader] = {
    "emoji": load_emoji,
}


def load_dataset(name_or_dir: str, seed: int = 0) -> Dataset:
    """A registered data set by name, or a data folder by path, split with seed."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"data seed must be a non-negative integer, got {seed!r}")
    if name_or_dir in DATASETS:
        return DATASETS[name_or_dir](seed)
    path = Path(name_or_dir)
    if path.is_dir():
        return load_folder(path, seed)
    if path.exists():
        raise InputError(f"{path}: not a directory (a data folder is a directory with samples.jsonl)")
    raise InputError(
        f"unknown data set '{name_or_dir}': not a known name ({', '.join(sorted(DATASETS))}) "
        "and not an existing directory"
    )


__all__ = ["DATASETS", "SPLITS", "Dataset", "DatasetLoader", "Sample", "load_dataset", "load_rgb"]
