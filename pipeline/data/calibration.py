"""Calibration sets as data: a reviewed definition and its frozen sample id list.

    pipeline/resources/calibration/<name>.toml       dataset, split, size, balance, seed
    pipeline/resources/calibration/<name>.ids.json   {"definition": {...}, "ids": [...], "sha256": "..."}

INT8 scales depend on exactly which samples were calibrated on, so for the data
set a definition names, the id list is frozen in the repository and checked on
every load (an edited list fails loudly instead of quietly shifting scales).
For any other data set (a user's folder) the same rule selects the samples.

    python -m pipeline.data.calibration freeze emoji-default
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.data.base import SPLITS, Dataset, Sample
from pipeline.data.emoji import seeded_order
from pipeline.errors import InputError
from pipeline.resources import shipped_dir
from pipeline.store import atomic_write_json, canonical_json, sha256_bytes
from pipeline.data import load_dataset

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CALIBRATION_DIR = shipped_dir("calibration")
BALANCE_RULES = ("per-class",)
DEFINITION_SUFFIX = ".toml"
IDS_SUFFIX = ".ids.json"


@dataclass(frozen=True)
class CalibrationDefinition:
    """What a calibration/<name>.toml says."""

    dataset: str
    split: str
    size: int
    balance: str
    seed: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CalibrationSet:
    """The samples to calibrate on, by id, in selection order.

    frozen: True when the ids come from the checked-in list, False when they
    were selected now from a data set the definition does not name.
    """

    name: str
    dataset: str
    split: str
    ids: tuple[str, ...]
    sha256: str
    frozen: bool

    def samples(self, dataset: Dataset) -> tuple[Sample, ...]:
        by_id = {sample.id: sample for sample in dataset.split(self.split)}
        return tuple(by_id[sample_id] for sample_id in self.ids)


def ids_sha256(ids: Sequence[str]) -> str:
    return sha256_bytes(canonical_json(list(ids)).encode())


def definition_names(directory: Path) -> list[str]:
    return sorted(path.name[: -len(DEFINITION_SUFFIX)] for path in directory.glob(f"*{DEFINITION_SUFFIX}"))


def definition_path(name: str, directory: Path) -> Path:
    names = definition_names(directory)
    if name not in names:
        raise InputError(
            f"unknown calibration set '{name}' (from --calibration or the target's quantize.calibration; "
            f"definitions in {directory}: {', '.join(names) or 'none'})"
        )
    return directory / f"{name}{DEFINITION_SUFFIX}"


def _typed(table: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    if key not in table:
        raise InputError(f"{path}: missing key '{key}'")
    value = table[key]
    # bool is an int subclass; "size = true" is a mistake, not a size of 1.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InputError(f"{path}: '{key}' must be a {kind.__name__}, got {value!r}")
    return value


def read_definition(name: str, directory: Path) -> CalibrationDefinition:
    path = definition_path(name, directory)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"{path}: not valid TOML: {error}")
    definition = CalibrationDefinition(
        dataset=_typed(table, "dataset", str, path),
        split=_typed(table, "split", str, path),
        size=_typed(table, "size", int, path),
        balance=_typed(table, "balance", str, path),
        seed=_typed(table, "seed", int, path),
    )
    if definition.split not in SPLITS:
        raise InputError(f"{path}: split '{definition.split}' is not one of {', '.join(SPLITS)}")
    if definition.size < 1:
        raise InputError(f"{path}: size must be at least 1, got {definition.size}")
    if definition.balance not in BALANCE_RULES:
        raise InputError(f"{path}: balance '{definition.balance}' is not one of {', '.join(BALANCE_RULES)}")
    if definition.seed < 0:
        raise InputError(f"{path}: seed must be non-negative, got {definition.seed}")
    return definition


def select_per_class(dataset: Dataset, definition: CalibrationDefinition) -> tuple[str, ...]:
    """Round-robin over classes (in class order), each class in a seeded shuffled order.

    Stops at `size` or when the split runs out, so classes are as balanced as
    the split allows, and any prefix of the list is balanced too.
    """
    samples = dataset.split(definition.split)
    queues = []
    for label, class_name in enumerate(dataset.classes):
        members = [sample.id for sample in samples if sample.label == label]
        queues.append(seeded_order(members, definition.seed, f"calibration:{class_name}"))
    selected: list[str] = []
    depth = 0
    while len(selected) < definition.size and any(depth < len(queue) for queue in queues):
        for queue in queues:
            if depth < len(queue) and len(selected) < definition.size:
                selected.append(queue[depth])
        depth += 1
    return tuple(selected)


def read_frozen_ids(ids_path: Path, name: str, definition: CalibrationDefinition) -> tuple[str, ...]:
    refreeze = f"re-freeze it with: python -m pipeline.data.calibration freeze {name}"
    if not ids_path.is_file():
        raise InputError(f"{ids_path}: the frozen id list is missing; {refreeze}")
    try:
        record = json.loads(ids_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{ids_path}: not valid JSON: {error}; {refreeze}")
    if (not isinstance(record, dict) or not isinstance(record.get("ids"), list)
            or not all(isinstance(x, str) for x in record["ids"]) or not isinstance(record.get("sha256"), str)):
        raise InputError(f"{ids_path}: expected {{\"definition\": ..., \"ids\": [...], \"sha256\": ...}}; {refreeze}")
    if record.get("definition") != definition.to_json():
        raise InputError(f"{ids_path}: was frozen from another version of {name}{DEFINITION_SUFFIX}; {refreeze}")
    ids = tuple(record["ids"])
    if ids_sha256(ids) != record["sha256"]:
        raise InputError(f"{ids_path}: the id list was edited (its sha256 does not match the list); {refreeze}")
    if len(set(ids)) != len(ids):
        raise InputError(f"{ids_path}: the id list has duplicates; {refreeze}")
    return ids


def check_ids_in_split(ids: Sequence[str], dataset: Dataset, split: str, ids_path: Path) -> None:
    present = {sample.id for sample in dataset.split(split)}
    missing = [sample_id for sample_id in ids if sample_id not in present]
    if missing:
        raise InputError(
            f"{ids_path}: {len(missing)} frozen id(s) are not in the '{split}' split of data set "
            f"'{dataset.name}', first: '{missing[0]}' (was the data set loaded with another seed, "
            "or did its package change? then re-freeze)"
        )


def load_calibration_set(name: str, dataset: Dataset, directory: Path | None = None) -> CalibrationSet:
    """The calibration samples for dataset: frozen ids if the definition names it, else selected."""
    directory = Path(directory) if directory is not None else CALIBRATION_DIR
    definition = read_definition(name, directory)
    if definition.dataset == dataset.name:
        ids_path = directory / f"{name}{IDS_SUFFIX}"
        ids = read_frozen_ids(ids_path, name, definition)
        check_ids_in_split(ids, dataset, definition.split, ids_path)
        frozen = True
    else:
        ids = select_per_class(dataset, definition)
        frozen = False
    if not ids:
        raise InputError(f"calibration set '{name}': the '{definition.split}' split of '{dataset.name}' is empty")
    return CalibrationSet(name=name, dataset=dataset.name, split=definition.split, ids=ids,
                          sha256=ids_sha256(ids), frozen=frozen)


def freeze_calibration_set(name: str, directory: Path | None = None, dataset: Dataset | None = None) -> Path:
    """Select the ids by the definition's rule and write <name>.ids.json; returns its path."""

    directory = Path(directory) if directory is not None else CALIBRATION_DIR
    definition = read_definition(name, directory)
    dataset = dataset if dataset is not None else load_dataset(definition.dataset)
    if dataset.name != definition.dataset:
        raise InputError(f"calibration set '{name}' is defined on '{definition.dataset}', not '{dataset.name}'")
    ids = select_per_class(dataset, definition)
    path = directory / f"{name}{IDS_SUFFIX}"
    atomic_write_json(path, {"definition": definition.to_json(), "ids": list(ids), "sha256": ids_sha256(ids)})
    return path


def class_counts(calibration: CalibrationSet, dataset: Dataset) -> dict[str, int]:
    counts = Counter(dataset.classes[sample.label] for sample in calibration.samples(dataset))
    return {name: counts.get(name, 0) for name in dataset.classes}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.data.calibration", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    freeze = commands.add_parser("freeze", help="regenerate calibration/<name>.ids.json from its definition")
    freeze.add_argument("name")
    freeze.add_argument("--dir", type=Path, default=None, help="calibration directory (default: the repository's)")
    args = parser.parse_args(argv)
    try:

        path = freeze_calibration_set(args.name, args.dir)
        definition = read_definition(args.name, Path(args.dir) if args.dir else CALIBRATION_DIR)
        dataset = load_dataset(definition.dataset)
        calibration = load_calibration_set(args.name, dataset, args.dir)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    counts = ", ".join(f"{name}: {count}" for name, count in class_counts(calibration, dataset).items())
    print(f"wrote {path}: {len(calibration.ids)} ids, sha256 {calibration.sha256[:16]}\n  per class: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
