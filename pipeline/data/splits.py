"""A data set's splits, encoded for a model's inputs on first use, and their content fingerprints."""

from __future__ import annotations

import functools

from pipeline.data.base import Dataset
from pipeline.data.encode import Encoded, InputSpec, encode
from pipeline.store import canonical_json, sha256_bytes


class Splits:
    """Encoded splits, computed on first use: a fully cached rebuild decodes no image."""

    def __init__(self, dataset: Dataset, spec: InputSpec):
        self.dataset = dataset
        self.spec = spec

    @functools.cache
    def get(self, split: str) -> Encoded:
        return encode(self.dataset.split(split), self.spec)

    def fingerprint(self, split: str) -> str:
        return sha256_bytes(canonical_json({"data": self.dataset.fingerprint, "split": split, "spec": self.spec.to_json()}).encode())
