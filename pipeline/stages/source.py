"""The source pass: train the model on the train split (or load the user's weights). The reference every stage is compared with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from pipeline.artifacts import Artifact
from pipeline.models.source import load_source, train_source
from pipeline.models.user import is_factory_reference
from pipeline.stages.base import Context, Measure, Pass
from pipeline.store import sha256_file
from pipeline.training import TrainSettings


@dataclass(frozen=True)
class SourceConfig:
    model: str
    fusion: str | None
    classes: tuple[str, ...]
    mode: str  # "train" or "load"
    train: TrainSettings | None  # None when loading
    # A user's factory is code outside pipeline/: it is not fingerprinted (issue 14).
    factory_note: str | None = None


def declare(ctx: Context, done: Mapping[str, Artifact]) -> Pass:
    del done
    loading = ctx.weights is not None
    config = SourceConfig(ctx.model, ctx.fusion, tuple(ctx.dataset.classes), "load" if loading else "train", None if loading else ctx.train,
                          "user code is not hashed: change the model name or clear the output dir after editing it"
                          if is_factory_reference(ctx.model) else None)
    if loading:
        run = lambda workdir: load_source(ctx.model, ctx.dataset, ctx.fusion, ctx.weights, workdir, ctx.splits, ctx.train.batch_size,
                                          ctx.prefix_cache)
        input_sha = sha256_file(ctx.weights)
    else:
        run = lambda workdir: train_source(ctx.model, ctx.dataset, ctx.fusion, ctx.train, ctx.splits, workdir, ctx.prefix_cache)
        input_sha = ctx.dataset.fingerprint
    return Pass("source", config, input_sha, run, Measure("torch"), code=__name__)
