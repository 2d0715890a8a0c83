"""Small real inputs for tests: a folder data set cut from the emoji data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.data import load_dataset
from pipeline.targets import TARGETS_DIR


def write_emoji_folder(directory: Path, per_class: int = 12) -> Path:
    """Copy per_class emoji of every class into directory in the samples.jsonl folder format."""
    dataset = load_dataset("emoji")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "images").mkdir(exist_ok=True)
    lines = []
    taken: dict[int, int] = {}
    for sample in sorted((s for split in dataset.splits.values() for s in split), key=lambda s: s.id):
        if taken.get(sample.label, 0) >= per_class:
            continue
        taken[sample.label] = taken.get(sample.label, 0) + 1
        name = f"images/{sample.id}.png"
        shutil.copyfile(sample.image, directory / name)
        lines.append(json.dumps({"image": name, "text": sample.text, "label": dataset.classes[sample.label]}))
    (directory / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def dump_toml(table: dict, prefix: str = "") -> str:
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    scalars = [f"{k} = {_toml_value(v)}" for k, v in table.items() if k not in tables]
    out = ([f"[{prefix}]"] if prefix and scalars else []) + scalars
    for key, value in tables.items():
        out.append(dump_toml(value, f"{prefix}.{key}" if prefix else key))
    return "\n".join(out) + "\n"


def write_target(path: Path, base: str = "jetson-orin-nano", **sections: dict) -> Path:
    """A copy of a shipped target with some nested tables updated, e.g. gates={"quantize": {...}}."""
    import tomllib

    table = tomllib.loads((TARGETS_DIR / f"{base}.toml").read_text())
    for name, values in sections.items():
        merged = table.setdefault(name, {})
        for key, value in values.items():
            if isinstance(value, dict):
                merged.setdefault(key, {}).update(value)
            else:
                merged[key] = value
    path.write_text(dump_toml(table))
    return path
