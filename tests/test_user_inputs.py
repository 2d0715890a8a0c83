"""A user's model brings its own inputs (issue 14, items 6 and 7), through the real CLI.

Its input_spec names its tokenizer (a Hugging Face folder, offline), token
length, image size, normalization and its own input names; a text-only, an
image-only and an input_ids-only model run the same code. Its module's source
files are part of the source stage's key: an edit trains it again, an edit
elsewhere does not. The built-in models' encodings, example inputs and source
settings are pinned to what they were before (their artifacts' bytes must not move).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from torch import nn

from helpers import write_emoji_folder, write_target
from pipeline.cli import main
from pipeline.data import load_dataset
from pipeline.data.encode import InputSpec, encode, load_tokenizer
from pipeline.data.splits import Splits
from pipeline.errors import InputError
from pipeline.export import example_inputs
from pipeline.models import default_config
from pipeline.models.checkpoint import describe_registry_model
from pipeline.models.source import model_input_spec
from pipeline.models.user import declared_input_spec, factory_source_digests, fit_to_forward
from pipeline.settings import TrainSettings
from pipeline.stages.source import SourceConfig

LENIENT = {"quantize": {"max_drop_pts": 100.0, "min_agreement": 0.0}, "prune": {"max_drop_pts": 100.0},
           "factorize": {"max_drop_pts": 100.0}}
VOCAB_WORDS = 40  # the test tokenizer's words: far fewer ids than MiniLM's 30522, so a MiniLM id cannot pass its embedding


# ---------------------------------------------------------------- the built-in models: as they were


# Computed from HEAD 079d799's code (a `git worktree` checkout), before the spec could say more.
BUILT_IN = {
    "fused-tiny": {"encoded": "6f706e92642f33425f400af1145bd98b73fad4f63f3779234af14a7203eb1f30",
                   "examples": "09f0ca0c13bf5c4d42c2df74389202a0d042dc006b60b81f445b02a94dc0c828",
                   "spec": {"image_size": 32, "max_tokens": 16, "mean": [0.5] * 3, "std": [0.5] * 3}},
    "fused-effnet-minilm": {"encoded": "8c9dc0e7eccdd84f8bbaf27dc8b8d5ba794b36939d9478c4cd472915c6544233",
                            "examples": "35651270e1a69ff7678b7d3a21534904da058738e25c331b0c14736217cbb8cd",
                            "spec": {"image_size": 192, "max_tokens": 16, "mean": [0.5] * 3, "std": [0.5] * 3}},
}


def digest_of_inputs(inputs) -> str:
    digest = hashlib.sha256()
    for name, array in inputs.items():
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_built_in_models_encode_and_describe_themselves_as_before(name):
    expected = BUILT_IN[name]
    config = default_config(name, 9)
    spec = config.input_spec()
    encoded = encode(load_dataset("emoji").split("calib")[:40], spec)
    assert list(encoded.inputs) == ["image", "input_ids", "attention_mask"]
    assert digest_of_inputs(encoded.inputs) == expected["encoded"]
    assert hashlib.sha256(b"".join(t.numpy().tobytes() for t in example_inputs(spec, 3))).hexdigest() == expected["examples"]
    assert spec.to_json() == expected["spec"]  # model.json, the split fingerprints and the footprint keys see this
    assert describe_registry_model(config)["input_spec"] == expected["spec"]


def test_a_built_in_models_source_settings_are_as_before():
    """The source stage's settings (a part of its key) for a built-in model: the fields they always had, no new one."""
    settings = dataclasses.asdict(SourceConfig("fused-tiny", None, ("a", "b"), "train", TrainSettings()))
    assert settings == {"model": "fused-tiny", "fusion": None, "classes": ("a", "b"), "mode": "train",
                        "train": dataclasses.asdict(TrainSettings()), "factory_note": None}


# ---------------------------------------------------------------- the spec, fitted to a forward


class Forward(nn.Module):
    def __init__(self, forward, spec=None):
        super().__init__()
        self.forward = forward
        if spec is not None:
            self.input_spec = spec


def test_inputs_come_from_the_forwards_signature_in_its_order():
    spec = declared_input_spec(Forward(lambda attention_mask, input_ids: None), "m:f")
    assert spec.roles == ("attention_mask", "input_ids") and spec.to_json()["inputs"] == ["attention_mask", "input_ids"]
    assert declared_input_spec(Forward(lambda image: None), "m:f").input_names == ("image",)
    assert declared_input_spec(Forward(lambda image, input_ids, attention_mask: None), "m:f").to_json() == InputSpec().to_json()
    renamed = declared_input_spec(Forward(lambda tokens, pixels, debug=False: None, {"names": {"image": "pixels", "input_ids": "tokens"}}), "m:f")
    assert renamed.roles == ("input_ids", "image") and renamed.input_names == ("tokens", "pixels")


@pytest.mark.parametrize("forward, spec, message", [
    (lambda image, words: None, None, "forward takes 'words', which is none of the inputs"),
    (lambda image: None, {"inputs": ["input_ids"]}, "input_spec says the model takes input_ids, but its forward takes image"),
    (lambda image: None, {"image_sise": 24}, "image_sise"),
    (lambda attention_mask: None, None, "attention_mask without input_ids"),
    (lambda image: None, {"names": {"image": "input_ids"}}, "names must differ"),
    (lambda image: None, {"inputs": ["picture"]}, "unknown input 'picture'"),
    (lambda labels: None, {"names": {"image": "labels"}}, "'labels' cannot name an input"),
])
def test_a_spec_that_does_not_fit_the_forward_is_refused(forward, spec, message):
    with pytest.raises(InputError, match=message):
        declared_input_spec(Forward(forward, spec), "m:f")


def test_a_spec_round_trips_through_model_json(tokenizer_dir):
    spec = fit_to_forward(InputSpec(image_size=20, max_tokens=6, mean=(0.4, 0.45, 0.5), std=(0.2, 0.25, 0.3), tokenizer=tokenizer_dir,
                                    names={"input_ids": "tokens"}), Forward(lambda tokens: None), "m:f")
    assert InputSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert spec.to_json()["tokenizer_sha256"] and spec.example_token_range()[1] <= len(load_tokenizer(str(tokenizer_dir)))


# ---------------------------------------------------------------- through the CLI


def write_tokenizer(directory: Path, texts: list[str], words: int = VOCAB_WORDS) -> Path:
    """A word-level tokenizer over the `words` commonest words of texts, saved as a Hugging Face folder."""
    from collections import Counter

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [w for w, _ in Counter(w for t in texts for w in t.lower().replace(":", " ").split()).most_common(words)]
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A 36-image emoji folder, a lenient jetson target, a tokenizer of the folder's words, on sys.path for the model modules."""
    work = tmp_path_factory.mktemp("user-inputs")
    data = write_emoji_folder(work / "data", per_class=4)
    write_target(work / "lenient.toml", gates=LENIENT)
    texts = [json.loads(line)["text"] for line in (data / "samples.jsonl").read_text().splitlines()]
    write_tokenizer(work / "tokenizer", texts)
    sys.path.insert(0, str(work))
    yield work
    sys.path.remove(str(work))


@pytest.fixture
def tokenizer_dir(workspace) -> Path:
    return workspace / "tokenizer"


MODELS = '''
import torch
from torch import nn


def pooled(embedded, mask=None):
    if mask is None:
        return embedded.mean(dim=1)
    weights = mask.to(embedded.dtype).unsqueeze(-1)
    return (embedded * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class OwnTokenizer(nn.Module):
    """Its own vocabulary ({vocab} ids), its own input names, size and normalization."""
    input_spec = {{"tokenizer": {tokenizer!r}, "max_tokens": 6, "image_size": 20, "mean": (0.4, 0.45, 0.5), "std": (0.2, 0.25, 0.3),
                   "names": {{"image": "pixels", "input_ids": "tokens", "attention_mask": "mask"}}}}

    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.embed = nn.Embedding({vocab}, 8)
        self.head = nn.Linear(16, num_classes)

    def forward(self, pixels, tokens, mask):
        picture = torch.relu(self.conv(pixels)).mean(dim=(2, 3))
        return self.head(torch.cat([picture, pooled(self.embed(tokens), mask)], dim=1))


class TextOnly(nn.Module):
    input_spec = {{"max_tokens": 8}}

    def __init__(self, num_classes):
        super().__init__()
        self.embed = nn.Embedding(30522, 8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, input_ids, attention_mask):
        return self.head(pooled(self.embed(input_ids), attention_mask))


class IdsOnly(TextOnly):
    def forward(self, input_ids):
        return self.head(pooled(self.embed(input_ids)))


class ImageOnly(nn.Module):
    input_spec = {{"image_size": 24}}

    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, image):
        return self.head(torch.relu(self.conv(image)).mean(dim=(2, 3)))


def own_tokenizer(num_classes):
    return OwnTokenizer(num_classes)


def text_only(num_classes):
    return TextOnly(num_classes)


def ids_only(num_classes):
    return IdsOnly(num_classes)


def image_only(num_classes):
    return ImageOnly(num_classes)
'''


@pytest.fixture(scope="module")
def user_models(workspace) -> str:
    tokenizer = workspace / "tokenizer"
    (workspace / "input_models.py").write_text(MODELS.format(tokenizer=str(tokenizer), vocab=len(load_tokenizer(str(tokenizer)))))
    return "input_models"


def build(workspace: Path, reference: str, out: Path) -> dict:
    code = main(["build", "--model", reference, "--data", str(workspace / "data"), "--target", str(workspace / "lenient.toml"),
                 "--epochs", "1", "--no-compression", "--out", str(out)])
    manifest = json.loads((out / "manifest.json").read_text())
    assert code == 0, manifest.get("error") or manifest.get("failure")
    assert manifest["status"] == "ok"
    return manifest


def onnx_inputs(path: Path) -> list[str]:
    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def golden(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "bundle" / "golden.npz") as data:
        return {name: data[name] for name in data.files}


def stage(manifest: dict, name: str) -> dict:
    return next(s for s in manifest["stages"] if s["name"] == name)


def test_a_model_with_its_own_tokenizer_and_input_names(workspace, user_models, tmp_path):
    manifest = build(workspace, f"{user_models}:own_tokenizer", tmp_path / "out")
    names = ["pixels", "tokens", "mask"]
    assert onnx_inputs(tmp_path / "out" / "bundle" / "model.int8.onnx") == names
    assert stage(manifest, "export")["facts"]["inputs"] == {"pixels": ["batch", 3, 20, 20], "tokens": ["batch", 6], "mask": ["batch", 6]}
    saved = golden(tmp_path / "out")
    assert sorted(str(n) for n in saved["input_names"]) == sorted(names)
    # the ids the model got are its tokenizer's (at most 41 distinct ids, 6 long), not MiniLM's, for the very texts of the samples
    texts = {s.id: s.text for split in load_dataset(str(workspace / "data")).splits.values() for s in split}
    own = load_tokenizer(str(workspace / "tokenizer"))
    expected = own([texts[str(i)] for i in saved["ids"]], padding="max_length", truncation=True, max_length=6, return_tensors="np")
    np.testing.assert_array_equal(saved["tokens"], expected["input_ids"])
    np.testing.assert_array_equal(saved["mask"], expected["attention_mask"])
    assert saved["tokens"].max() < len(own) < 100
    assert saved["pixels"].shape[1:] == (3, 20, 20)
    spec = stage(manifest, "source")["facts"]["input_spec"]
    assert spec["tokenizer"] == str(workspace / "tokenizer") and spec["names"]["input_ids"] == "tokens"
    # the device side reads the names from the graph: trtexec's shapes, and a verify of the golden set on ONNX Runtime
    assert "--minShapes=pixels:1x3x20x20,tokens:1x6,mask:1x6" in (tmp_path / "out" / "bundle" / "build_engine.sh").read_text()
    assert main(["verify", "--bundle", str(tmp_path / "out" / "bundle"), "--runtime", "ort"]) == 0


@pytest.mark.parametrize("factory, inputs", [
    ("text_only", ["input_ids", "attention_mask"]),
    ("image_only", ["image"]),
    ("ids_only", ["input_ids"]),
])
def test_a_model_that_takes_part_of_the_inputs(workspace, user_models, tmp_path, factory, inputs):
    manifest = build(workspace, f"{user_models}:{factory}", tmp_path / "out")
    assert onnx_inputs(tmp_path / "out" / "bundle" / "model.int8.onnx") == inputs
    assert sorted(str(n) for n in golden(tmp_path / "out")["input_names"]) == sorted(inputs)
    assert [s["name"] for s in manifest["stages"]] == ["source", "export", "quantize"]


# ---------------------------------------------------------------- the user's code in the key


PACKAGE_NET = '''
from torch import nn

from .layers import Pooled


class Net(nn.Module):
    input_spec = {"max_tokens": 8}

    def __init__(self, num_classes):
        super().__init__()
        self.text = Pooled()
        self.head = nn.Linear(8, num_classes)

    def forward(self, input_ids, attention_mask):
        return self.head(self.text(input_ids, attention_mask))


def make(num_classes):
    return Net(num_classes)
'''

PACKAGE_LAYERS = '''
from torch import nn


class Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30522, 8)

    def forward(self, input_ids, attention_mask):
        weights = attention_mask.to(self.embed.weight.dtype).unsqueeze(-1)
        return (self.embed(input_ids) * weights).sum(1) / weights.sum(1).clamp(min=1.0)
'''


def fresh_import(package: str) -> None:
    """Forget the package, as a new process would, so the next build imports the files as they are now."""
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]
    importlib.invalidate_caches()


def test_editing_the_models_code_rebuilds_the_source_stage(workspace, tmp_path):
    package = workspace / "keyed_models"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "net.py").write_text(PACKAGE_NET)
    (package / "layers.py").write_text(PACKAGE_LAYERS)
    unrelated = workspace / "notes_helper.py"
    unrelated.write_text("X = 1\n")
    reference, out = "keyed_models.net:make", tmp_path / "out"

    first = stage(build(workspace, reference, out), "source")
    assert not first["cached"]
    assert dict(map(tuple, first["settings"]["factory_code"])).keys() == {"keyed_models/__init__.py", "keyed_models/net.py",
                                                                          "keyed_models/layers.py"}
    unrelated.write_text("X = 2  # edited: not the model's code\n")
    fresh_import("keyed_models")
    assert stage(build(workspace, reference, out), "source")["cached"]

    # an edit of a file the factory's module imports (a new parameter): the model is trained again, a new artifact
    (package / "layers.py").write_text(PACKAGE_LAYERS.replace("self.embed = nn.Embedding(30522, 8)", "self.embed = nn.Embedding(30522, 8)\n"
                                                              "        self.scale = nn.Parameter(self.embed.weight.new_ones(()))")
                                       .replace("return (self.embed", "return self.scale * (self.embed"))
    fresh_import("keyed_models")
    edited = build(workspace, reference, out)
    assert not stage(edited, "source")["cached"] and not stage(edited, "export")["cached"]
    assert stage(edited, "source")["settings"]["factory_code"] != first["settings"]["factory_code"]
    assert stage(edited, "source")["artifact"]["sha256"] != first["artifact"]["sha256"]


def test_a_single_file_module_is_its_own_code(workspace):
    (workspace / "lone_model.py").write_text("def make():\n    pass\n")
    fresh_import("lone_model")
    before = factory_source_digests("lone_model:make")
    assert [name for name, _ in before] == ["lone_model.py"]
    (workspace / "lone_model.py").write_text("def make():\n    return None\n")
    assert factory_source_digests("lone_model:make") != before


def test_a_tokenizer_given_for_the_build_replaces_the_declared_one(workspace, user_models, tokenizer_dir):
    """model_input_spec's tokenizer (what a --tokenizer flag passes) wins over the model's; a built-in model refuses one."""
    dataset = load_dataset(str(workspace / "data"))
    spec = model_input_spec(f"{user_models}:text_only", dataset, None, None, tokenizer=tokenizer_dir)
    assert spec.tokenizer == str(tokenizer_dir) and spec.max_tokens == 8
    assert encode(dataset.split("calib")[:4], spec).inputs["input_ids"].max() < len(load_tokenizer(str(tokenizer_dir)))
    with pytest.raises(InputError, match="--tokenizer applies to --model package.module:factory only"):
        model_input_spec("fused-tiny", dataset, None, None, tokenizer=tokenizer_dir)


def test_a_tokenizer_folder_that_is_not_there_is_refused_before_any_stage(workspace, tmp_path, capsys):
    (workspace / "missing_tokenizer.py").write_text(MODELS.format(tokenizer=str(tmp_path / "nowhere"), vocab=50))
    code = main(["build", "--model", "missing_tokenizer:own_tokenizer", "--data", str(workspace / "data"), "--target",
                 str(workspace / "lenient.toml"), "--epochs", "1", "--no-compression", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "nowhere" in capsys.readouterr().err and not (tmp_path / "out" / "manifest.json").exists()


def test_splits_are_keyed_by_the_tokenizers_content(workspace, tokenizer_dir, tmp_path):
    """Another tokenizer in the same folder is another encoding: the split fingerprints (the logits' cache keys) differ."""
    dataset = load_dataset(str(workspace / "data"))
    copy = tmp_path / "tok"
    copy.mkdir()
    for path in tokenizer_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    before = Splits(dataset, InputSpec(tokenizer=copy)).fingerprint("eval")
    config = json.loads((copy / "tokenizer.json").read_text())
    config["model"]["vocab"]["extra"] = len(config["model"]["vocab"])
    (copy / "tokenizer.json").write_text(json.dumps(config))
    assert Splits(dataset, InputSpec(tokenizer=copy)).fingerprint("eval") != before


def test_the_tokenizer_flag_reaches_the_build_and_a_built_in_model_refuses_it(workspace, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["build", "--model", "fused-tiny", "--tokenizer", str(tokenizer_dir), "--data", str(workspace / "data"),
                 "--target", str(workspace / "lenient.toml"), "--epochs", "1", "--no-compression", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "--tokenizer applies to --model package.module:factory only" in err and "Traceback" not in err
    assert not (out / "manifest.json").exists()
