"""The source pass: train the model on the train split, load the user's weights, or take the user's ONNX file (--onnx).

Its artifact is the reference every stage is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from pipeline.artifacts import Artifact
from pipeline.models.onnx_source import batch_json, read_onnx_source, take_onnx_source
from pipeline.models.source import CHECK_SPLIT, load_source, train_source
from pipeline.models.user import factory_source_digests, is_factory_reference
from pipeline.stages.base import Context, Measure, Pass, onnx_source
from pipeline.store import sha256_file
from pipeline.training import TrainSettings


@dataclass(frozen=True)
class SourceConfig:
    """A built-in model's source settings (its fields as they have always been, so its key's settings do not move)."""

    model: str
    fusion: str | None
    classes: tuple[str, ...]
    mode: str  # "train" or "load"
    train: TrainSettings | None  # None when loading
    factory_note: str | None = None  # a user's model: what of it the key covers (FactorySourceConfig)


@dataclass(frozen=True)
class FactorySourceConfig(SourceConfig):
    """A user's model (package.module:factory): its code and its inputs are part of what the artifact is made from.

    The pipeline's own code is fingerprinted for every pass (pipeline.fingerprint);
    the user's code lies outside it, so its module's source files are hashed here:
    an edited model is trained again, an untouched one is served from the cache.
    input_spec: the spec as the build uses it (a tokenizer with its folder's
    sha256), which the user's code may not be the only source of.
    """

    factory_code: tuple[tuple[str, str], ...] = ()  # (file, sha256) of the factory's module (its top-level package's .py files)
    input_spec: Mapping[str, Any] | None = None


FACTORY_NOTE = "the factory's source files (factory_code) and input spec are part of the key: editing them rebuilds this stage"


def source_config(ctx: Context, loading: bool) -> SourceConfig:
    common = (ctx.model, ctx.fusion, tuple(ctx.dataset.classes), "load" if loading else "train", None if loading else ctx.train)
    if not is_factory_reference(ctx.model):
        return SourceConfig(*common)
    return FactorySourceConfig(*common, factory_note=FACTORY_NOTE, factory_code=factory_source_digests(ctx.model),
                               input_spec=ctx.spec.to_json())


@dataclass(frozen=True)
class OnnxSourceConfig:
    """The user's ONNX file as the source (--onnx): its sha256 is the pass's input; its inputs as read from its graph.

    A class of its own, so that the torch sources keep SourceConfig's fields exactly (and their keys' settings).
    The file's path is not part of it: the same bytes elsewhere are the same source.
    """

    classes: tuple[str, ...]
    input_spec: Mapping[str, Any]  # the spec the graph gave (a --tokenizer with its folder's sha256)
    batch: str | int  # "dynamic", or the graph's static batch (1)
    mode: str = "onnx"


def declare(ctx: Context, done: Mapping[str, Artifact]) -> Pass:
    del done
    if onnx_source(ctx) is not None:
        return declare_onnx(ctx)
    loading = ctx.weights is not None
    config = source_config(ctx, loading)
    if loading:
        run = lambda workdir: load_source(ctx.model, ctx.dataset, ctx.fusion, ctx.weights, workdir, ctx.splits, ctx.train.batch_size,
                                          ctx.prefix_cache)
        input_sha = sha256_file(ctx.weights)
    else:
        run = lambda workdir: train_source(ctx.model, ctx.dataset, ctx.fusion, ctx.train, ctx.splits, workdir, ctx.prefix_cache)
        input_sha = ctx.dataset.fingerprint
    return Pass("source", config, input_sha, run, Measure("torch"), code=__name__)


def declare_onnx(ctx: Context) -> Pass:
    """The user's ONNX file, checked on a few calib samples, is the source artifact: measured with ONNX Runtime."""
    source = read_onnx_source(ctx.onnx, ctx.dataset.classes, ctx.spec.tokenizer)
    config = OnnxSourceConfig(tuple(ctx.dataset.classes), ctx.spec.to_json(), batch_json(source.batch))
    run = lambda workdir: take_onnx_source(source, ctx.splits.get(CHECK_SPLIT), ctx.dataset.classes, workdir)
    return Pass("source", config, sha256_file(ctx.onnx), run, Measure("onnxruntime"), code=__name__)
