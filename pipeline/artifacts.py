"""Artifact: what a stage produces and the next one consumes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

KINDS = ("torch", "onnx", "engine", "bundle")


@dataclass(frozen=True)
class Artifact:
    """A file a stage wrote, identified by its content.

    kind: "torch" (state dict + model.json), "onnx", "engine" or "bundle".
    meta: facts about it (params, MACs, input names/shapes, what stayed float...).
    """

    kind: str
    path: Path
    sha256: str
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown artifact kind {self.kind!r}; expected one of {KINDS}")

    def to_json(self, relative_to: Path | None = None) -> dict[str, Any]:
        path = self.path
        if relative_to is not None:
            try:
                path = self.path.relative_to(relative_to)
            except ValueError:  # outside it (a cache shared by a fleet's targets): ../cache/stages/...
                path = Path(os.path.relpath(self.path, relative_to))
        return {"kind": self.kind, "path": str(path), "sha256": self.sha256, "meta": dict(self.meta)}

    @staticmethod
    def from_json(data: Mapping[str, Any], relative_to: Path | None = None) -> "Artifact":
        path = Path(data["path"])
        if relative_to is not None and not path.is_absolute():
            path = relative_to / path
        return Artifact(kind=data["kind"], path=path, sha256=data["sha256"], meta=dict(data.get("meta", {})))
