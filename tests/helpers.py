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


def write_matching_folder(directory: Path, images: int = 200, seed: int = 0) -> Path:
    """An image-text matching task from the emoji data, in the samples.jsonl folder format: two samples per image.

    images emoji are taken stratified over the categories (an equal share of each where it has enough, spread
    evenly over its emoji sorted by id) and split 60/15/25 within every category by image, so an image's two
    samples lie in one split. Each image gives one sample whose text is its own name ("match") and one whose text
    is the name of another image of the same split from a different category ("mismatch"), paired by a
    random.Random(seed) permutation: within a split every image and every name is once a match and once a
    mismatch, so neither input alone says the label (a model that memorizes one of them is at chance on eval, not
    below it). Every line names its split; labels.json fixes the class order, ["match", "mismatch"]. The same
    arguments always write the same bytes.

    Matching is hard for a tiny model trained from scratch: at 200 images (400 samples) the tests/user_models
    models stay at chance (0.49-0.53 on eval after 6 epochs); with every emoji (images=1898, 3796 samples) and
    15 epochs they reach 0.66-0.69.
    """
    import random

    from pipeline.data.emoji import split_sizes

    dataset = load_dataset("emoji")
    by_class: dict[int, list] = {}
    for sample in sorted((s for split in dataset.splits.values() for s in split), key=lambda s: s.id):
        by_class.setdefault(sample.label, []).append(sample)
    if not 3 * len(by_class) <= images <= sum(len(members) for members in by_class.values()):
        raise ValueError(f"images must be between {3 * len(by_class)} and the {sum(len(m) for m in by_class.values())} emoji, got {images}")
    share = dict.fromkeys(by_class, 0)  # equal shares where a category has enough emoji, the rest over the larger ones
    left = images
    while left:
        for label in [label for label in sorted(by_class) if share[label] < len(by_class[label])][:left]:
            share[label] += 1
            left -= 1
    rng = random.Random(seed)
    split_of: dict[str, list] = {"train": [], "calib": [], "eval": []}
    for label in sorted(by_class):
        members = by_class[label]
        chosen = [members[(i * len(members)) // share[label]] for i in range(share[label])]
        rng.shuffle(chosen)
        n_train, n_calib, _ = split_sizes(len(chosen))
        split_of["train"] += chosen[:n_train]
        split_of["calib"] += chosen[n_train:n_train + n_calib]
        split_of["eval"] += chosen[n_train + n_calib:]

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "images").mkdir(exist_ok=True)
    lines = []
    for split, members in split_of.items():
        members.sort(key=lambda s: s.id)
        partner = list(range(len(members)))
        rng.shuffle(partner)
        def suits(i: int, k: int) -> bool:  # image i may take image k's name as its mismatch
            return members[k].label != members[i].label and members[k].text != members[i].text

        clashing = [i for i in range(len(members)) if not suits(i, partner[i])]
        while clashing:  # swap a clashing partner with one that suits both: each swap leaves one clash fewer
            i = clashing[0]
            j = rng.choice([j for j in range(len(members)) if suits(i, partner[j]) and suits(j, partner[i])])
            partner[i], partner[j] = partner[j], partner[i]
            clashing = [i for i in range(len(members)) if not suits(i, partner[i])]
        for sample, other in zip(members, (members[k] for k in partner)):
            name = f"images/{sample.id}.png"
            shutil.copyfile(sample.image, directory / name)
            lines.append(json.dumps({"image": name, "text": sample.text, "label": "match", "split": split}))
            lines.append(json.dumps({"image": name, "text": other.text, "label": "mismatch", "split": split}))
    (directory / "samples.jsonl").write_text("\n".join(lines) + "\n")
    (directory / "labels.json").write_text(json.dumps(["match", "mismatch"]) + "\n")
    return directory
