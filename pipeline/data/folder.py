"""The user folder format: a directory with samples.jsonl (and optionally labels.json).

    my-data/
      samples.jsonl   one JSON object per line:
                      {"image": "img/cat.png", "text": "a cat", "label": "animal"}
                      optional keys: "id" (default: derived from image path and
                      text) and "split" ("train", "calib" or "eval"; on every
                      line or on none)
      labels.json     optional: ["animal", "vehicle", ...], the classes in order

Everything is validated before a Dataset is built, and every problem names the
file and line, so a bad folder fails at once with one clear message instead of
half-way through a build.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from PIL import Image, UnidentifiedImageError

from pipeline.data.base import SPLITS, Dataset, Sample
from pipeline.data.emoji import splits_of, stratified_split
from pipeline.errors import InputError
from pipeline.store import canonical_json, sha256_bytes

SAMPLES_FILE = "samples.jsonl"
LABELS_FILE = "labels.json"
REQUIRED_KEYS = ("image", "text", "label")
OPTIONAL_KEYS = ("id", "split")
MIN_SAMPLES = 3
# Grayscale modes deeper than 8 bits, refused: converting them to RGB clips (odd but 8-bit modes such as CMYK,
# palette with transparency or grayscale with alpha are converted the way load_rgb converts every image).
DEEP_MODES = {"I;16": "16-bit grayscale", "I;16L": "16-bit grayscale", "I;16B": "16-bit grayscale", "I;16N": "16-bit grayscale",
              "I": "32-bit integer grayscale", "F": "32-bit float grayscale"}


@dataclass(frozen=True)
class Row:
    """One validated line of samples.jsonl."""

    line: int
    id: str
    image: str
    text: str
    label: str
    split: str | None


def default_id(image: str, text: str) -> str:
    """Stable whatever the line order: the same image and text always get the same id."""
    return sha256_bytes(f"{image}\n{text}".encode())[:16]


def _string_field(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise InputError(f"{where}: '{key}' must be a string, got {type(value).__name__} {json.dumps(value)}")
    if not value.strip():
        raise InputError(f"{where}: '{key}' is empty")
    return value


def normalized_image_path(raw: str, where: str) -> str:
    """The image path as a relative POSIX path that stays inside the folder."""
    path = PurePosixPath(raw.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise InputError(f"{where}: image path '{raw}' escapes the data directory (give a path relative to it)")
    return str(path)


def parse_row(text: str, line: int, where: str) -> Row:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: not valid JSON ({error.msg} at column {error.colno})")
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object like {{\"image\": ..., \"text\": ..., \"label\": ...}}")
    missing = [key for key in REQUIRED_KEYS if key not in obj]
    if missing:
        raise InputError(f"{where}: missing key {', '.join(repr(k) for k in missing)} (each line needs {', '.join(REQUIRED_KEYS)})")
    # A misspelt optional key ("spilt") would otherwise be ignored without a word.
    unknown = sorted(set(obj) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise InputError(f"{where}: unknown key '{unknown[0]}' (allowed: {', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)})")
    image = normalized_image_path(_string_field(obj, "image", where), where)
    sample_text = _string_field(obj, "text", where)
    split = _string_field(obj, "split", where) if "split" in obj else None
    if split is not None and split not in SPLITS:
        raise InputError(f"{where}: split '{split}' is not one of {', '.join(SPLITS)}")
    return Row(
        line=line,
        id=_string_field(obj, "id", where) if "id" in obj else default_id(image, sample_text),
        image=image,
        text=sample_text,
        label=_string_field(obj, "label", where),
        split=split,
    )


def read_rows(samples_path: Path) -> tuple[Row, ...]:
    try:
        content = samples_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{samples_path}: not UTF-8 text ({error.reason} at byte {error.start})")
    rows = tuple(
        parse_row(text, number, f"{samples_path}: line {number}")
        for number, text in enumerate(content.splitlines(), start=1)
        if text.strip()
    )
    if not rows:
        raise InputError(f"{samples_path}: no samples (the file is empty)")
    return rows


def read_label_list(labels_path: Path) -> tuple[str, ...]:
    try:
        labels = json.loads(labels_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{labels_path}: not valid JSON: {error}")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise InputError(f"{labels_path}: expected a non-empty JSON list of class names, like [\"cat\", \"dog\"]")
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise InputError(f"{labels_path}: class '{duplicates[0]}' is listed twice")
    return tuple(labels)


def check_unique_ids(rows: Sequence[Row], samples_path: Path) -> None:
    first_line: dict[str, int] = {}
    for row in rows:
        if row.id in first_line:
            raise InputError(
                f"{samples_path}: line {row.line}: duplicate id '{row.id}' (first on line {first_line[row.id]}); "
                "give each sample a unique \"id\" (or a different image or text)"
            )
        first_line[row.id] = row.line


def classes_of(rows: Sequence[Row], labels_path: Path, samples_path: Path) -> tuple[str, ...]:
    """The class names: labels.json in its order, or the sorted set of labels seen."""
    if not labels_path.is_file():
        return tuple(sorted({row.label for row in rows}))
    classes = read_label_list(labels_path)
    for row in rows:
        if row.label not in classes:
            raise InputError(
                f"{samples_path}: line {row.line}: unknown label '{row.label}' "
                f"(known: {', '.join(classes)}; from {labels_path})"
            )
    return classes


def check_split_fields(rows: Sequence[Row], samples_path: Path) -> bool:
    """True when every line names its split; an error when only some do."""
    with_split = [row for row in rows if row.split is not None]
    if with_split and len(with_split) != len(rows):
        without = next(row for row in rows if row.split is None)
        raise InputError(
            f"{samples_path}: line {without.line}: no 'split' but line {with_split[0].line} has one; "
            "give every line a split, or none (then a seeded stratified split is made)"
        )
    return bool(with_split)


def image_digest(directory: Path, row: Row, samples_path: Path) -> str:
    """sha256 of the row's image, after checking it is inside the folder and decodable."""

    where = f"{samples_path}: line {row.line}"
    path = directory / row.image
    # resolve() follows symlinks: a link pointing outside the folder is an escape too.
    if not path.resolve().is_relative_to(directory):
        raise InputError(f"{where}: image path '{row.image}' escapes the data directory {directory}")
    if not path.is_file():
        raise InputError(f"{where}: image not found: {path}")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            mode = image.mode
            image.verify()
    # PIL reports damage with many exception types (SyntaxError, struct.error, OSError...).
    except UnidentifiedImageError:  # its message names the in-memory buffer, not the file
        raise InputError(f"{where}: cannot read image {path}: not an image format PIL recognizes (damaged, or not an image)")
    except Exception as error:  # noqa: BLE001
        raise InputError(f"{where}: cannot read image {path}: {error or type(error).__name__}")
    if mode in DEEP_MODES:
        # Read as 8-bit RGB (pipeline.data.base.load_rgb), every value above 255 would become 255 without a word.
        raise InputError(f"{where}: image {path} is {DEEP_MODES[mode]} (PIL mode {mode}): images are read with 8 bits per "
                         "channel and its values above 255 would be clipped; save it as 8-bit grayscale or RGB")
    return sha256_bytes(data)


def image_digests(directory: Path, rows: Sequence[Row], samples_path: Path) -> dict[str, str]:
    digests: dict[str, str] = {}
    for row in rows:
        if row.image not in digests:
            digests[row.image] = image_digest(directory, row, samples_path)
    return digests


def split_assignment(rows: Sequence[Row], classes: Sequence[str], explicit: bool, seed: int, samples_path: Path) -> dict[str, str]:
    if explicit:
        assignment = {row.id: row.split for row in rows if row.split is not None}
    else:
        ids_by_class = {name: [row.id for row in rows if row.label == name] for name in classes}
        assignment = stratified_split(ids_by_class, seed)
    counts = {name: sum(1 for split in assignment.values() if split == name) for name in SPLITS}
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        how = "the 'split' fields give" if explicit else f"a 60/15/25 split per class (classes of fewer than {MIN_SAMPLES} samples stay in train) gives"
        raise InputError(
            f"{samples_path}: too few samples to split: {how} "
            + ", ".join(f"{name}={count}" for name, count in counts.items())
            + f"; every split needs at least one sample (add samples, or set 'split' on every line)"
        )
    return assignment


def folder_fingerprint(samples_path: Path, labels_path: Path, digests: dict[str, str], seed: int | None) -> str:
    payload = {
        "samples.jsonl": sha256_bytes(samples_path.read_bytes()),
        "labels.json": sha256_bytes(labels_path.read_bytes()) if labels_path.is_file() else None,
        "images": digests,
        # The seed shapes the splits only when they are computed, not when given.
        "split_seed": seed,
    }
    return sha256_bytes(canonical_json(payload).encode())


def load_folder(directory: Path, seed: int = 0) -> Dataset:
    directory = Path(directory).resolve()
    samples_path = directory / SAMPLES_FILE
    labels_path = directory / LABELS_FILE
    if not samples_path.is_file():
        raise InputError(
            f"{directory}: no {SAMPLES_FILE} (a data folder needs one JSON object per line: "
            "{\"image\": \"relative/path.png\", \"text\": \"...\", \"label\": \"...\"})"
        )
    rows = read_rows(samples_path)
    check_unique_ids(rows, samples_path)
    classes = classes_of(rows, labels_path, samples_path)
    explicit = check_split_fields(rows, samples_path)
    digests = image_digests(directory, rows, samples_path)
    assignment = split_assignment(rows, classes, explicit, seed, samples_path)

    label_of = {name: index for index, name in enumerate(classes)}
    samples = [Sample(id=row.id, image=directory / row.image, text=row.text, label=label_of[row.label]) for row in rows]
    how = "splits from the 'split' field" if explicit else f"seeded stratified split, seed {seed}"
    return Dataset(
        name=f"folder:{directory.name}",
        classes=classes,
        splits=splits_of(samples, assignment),
        fingerprint=folder_fingerprint(samples_path, labels_path, digests, None if explicit else seed),
        source=f"folder {directory} ({len(samples)} samples, {len(classes)} classes, {how})",
    )
