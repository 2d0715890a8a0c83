"""The dataset contract: samples with stable ids in named, frozen splits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from PIL import Image, UnidentifiedImageError

from pipeline.errors import InputError

SPLITS = ("train", "calib", "eval")


@dataclass(frozen=True)
class Sample:
    """One paired image+text example. id is stable across runs and versions of this tool."""

    id: str
    image: Path
    text: str
    label: int


@dataclass(frozen=True)
class Dataset:
    """A labelled image+text data set, already split.

    fingerprint: sha256 over everything that defines the samples (ids, texts,
    labels, image bytes or the versions of the packages they come from); it is
    part of the cache key of every stage that reads the data.
    """

    name: str
    classes: tuple[str, ...]
    splits: Mapping[str, tuple[Sample, ...]]
    fingerprint: str
    source: str

    def split(self, name: str) -> tuple[Sample, ...]:
        if name not in self.splits:
            raise InputError(f"data set '{self.name}' has no split '{name}' (it has: {', '.join(self.splits)})")
        return self.splits[name]


def load_rgb(path: Path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB, transparency composited on white."""

    try:
        with Image.open(path) as image:
            image.load()
            rgba = image.convert("RGBA")
    except FileNotFoundError:
        raise InputError(f"{path}: image file not found")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read image: {error}")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
