"""Source stage: train the fused model on the data set, or load a user's weights.

Produces a torch artifact (a directory with model.pt + model.json) that every
later stage starts from; its outputs on the eval split are the reference the
parity ledger compares everything with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from pipeline.artifacts import Artifact
from pipeline.data.base import Dataset
from pipeline.data.encode import InputSpec, check_tokenizer
from pipeline.errors import InputError
from pipeline.models import build_model, default_config
from pipeline.models.checkpoint import (check_finite_weights, describe_registry_model, describe_user_model, load_weights_into,
                                        read_state_dict, save_torch_artifact)
from pipeline.models.onnx_source import read_onnx_source
from pipeline.models.user import build_user_model, declared_input_spec, describe_error, is_factory_reference
from pipeline.store import artifact_digest
from pipeline.training import PrefixCache, TrainSettings, predict_logits, train

ARTIFACT_DIR = "torch"
CHECK_SPLIT = "calib"  # the split the model's outputs are checked on before the source pass returns (never eval)


def model_input_spec(model_name: str, dataset: Dataset, fusion: str | None, weights: Path | None,
                     tokenizer: str | Path | None = None, onnx: Path | None = None,
                     say: Callable[[str], None] | None = None) -> InputSpec:
    """The inputs the named model takes and how samples are encoded for it; a user's tokenizer is checked here, before any stage.

    tokenizer: a tokenizer folder that replaces the one a user's model declares (--tokenizer).
    onnx: the user's ONNX file (--onnx), the source model instead of model_name: its graph says what it takes
    (pipeline.models.onnx_source), and say hears how the graph was read.
    """
    del weights  # the architecture, not the weights, decides the inputs
    if onnx is not None:
        source = read_onnx_source(onnx, dataset.classes, tokenizer)
        for line in source.describe() if say is not None else ():
            say(line)
        return source.spec
    if not is_factory_reference(model_name):
        if tokenizer is not None:
            raise InputError(f"--tokenizer applies to --model package.module:factory only; '{model_name}' was trained on "
                             "all-MiniLM-L6-v2's vocabulary")
        return default_config(model_name, len(dataset.classes), fusion).input_spec()
    spec = declared_input_spec(build_user_model(model_name, len(dataset.classes)), model_name)
    if tokenizer is not None:
        spec = dataclasses.replace(spec, tokenizer=str(tokenizer))
    check_tokenizer(spec)
    return spec


def _describe_and_build(model_name: str, dataset: Dataset, fusion: str | None, pretrained: bool,
                        spec: InputSpec | None = None) -> tuple[nn.Module, dict]:
    """The model and its model.json; spec: the build's input spec for a user's model (else the one it declares)."""
    classes = len(dataset.classes)
    if is_factory_reference(model_name):
        if fusion:
            raise InputError("--fusion applies to the built-in models only, not to --model package.module:factory")
        model = build_user_model(model_name, classes)
        return model, describe_user_model(model_name, classes, spec or declared_input_spec(model, model_name))
    config = default_config(model_name, classes, fusion)
    return build_model(config, pretrained=pretrained), describe_registry_model(config)


def parameter_count(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _finish(model: nn.Module, description: dict, workdir: Path, meta: dict) -> Artifact:
    directory = workdir / ARTIFACT_DIR
    save_torch_artifact(directory, model, description)
    return Artifact(kind="torch", path=directory, sha256=artifact_digest(directory),
                    meta={"params": parameter_count(model), "input_spec": description["input_spec"], **meta})


def train_source(model_name: str, dataset: Dataset, fusion: str | None, settings: TrainSettings, splits: Any, workdir: Path,
                 prefix_cache: PrefixCache | None = None) -> Artifact:
    """Train (seeded); keep the checkpoint with the best accuracy on the calib split.

    prefix_cache keeps the frozen prefix's outputs for the build's later uses
    of this model (its logits on train and calib are the teacher of recovery).
    """
    torch.manual_seed(settings.seed)
    model, description = _describe_and_build(model_name, dataset, fusion, pretrained=True, spec=splits.spec)
    # A user's model is checked before its training (fail in seconds, not after it) and after; the built-in ones give
    # [N, classes] by construction, and their check would cost the default build's source stage about a calib pass twice.
    user_model, who = is_factory_reference(model_name), f"--model '{model_name}'"
    if user_model:
        check_outputs(model, model_name, dataset, splits.get(CHECK_SPLIT), settings.batch_size, prefix_cache, f"{who}: the untrained model")
    model, report = train(model, splits.get("train"), splits.get("calib"), settings, desc="train", prefix_cache=prefix_cache)
    if user_model:
        check_outputs(model, model_name, dataset, splits.get(CHECK_SPLIT), settings.batch_size, prefix_cache,
                      f"{who}: after training, the model")
    meta = {"trained": {"epochs_run": report.epochs_run, "best_epoch": report.best_epoch, "val_accuracy": report.best_val_accuracy,
                        "history": [list(h) for h in report.history]}}
    return _finish(model, description, workdir, meta)


def load_source(model_name: str, dataset: Dataset, fusion: str | None, weights: Path, workdir: Path, splits: Any = None,
                batch_size: int = TrainSettings().batch_size, prefix_cache: PrefixCache | None = None) -> Artifact:
    """Load a state dict (weights_only=True) into the named architecture; with splits, check its outputs on calib."""
    model, description = _describe_and_build(model_name, dataset, fusion, pretrained=False,
                                             spec=splits.spec if splits is not None else None)
    state = read_state_dict(Path(weights))
    load_weights_into(model, state, Path(weights), classes=dataset.classes)
    check_finite_weights(state, Path(weights))
    if splits is not None:
        check_outputs(model, model_name, dataset, splits.get(CHECK_SPLIT), batch_size, prefix_cache, f"{weights}: with these weights the model")
    return _finish(model.eval(), description, workdir, {"loaded_from": str(weights)})


def check_outputs(model: nn.Module, model_name: str, dataset: Dataset, data: Any, batch_size: int, prefix_cache: PrefixCache | None,
                  who: str) -> None:
    """InputError unless the model's logits on data (an Encoded split) are finite and [N, classes].

    Raised inside the source pass, before its artifact exists, so a broken model
    or checkpoint leaves the output directory as the last build left it. who
    starts the message ("--model 'x': the untrained model", "w.pt: with these weights the model").
    """
    try:
        logits = predict_logits(model, data, batch_size, prefix_cache, desc=f"  checking the model on {CHECK_SPLIT}")
    except Exception as error:  # noqa: BLE001
        if not is_factory_reference(model_name):
            raise  # a built-in model that cannot run its own inputs is a bug here, not bad input
        raise InputError(f"{who} fails on the {CHECK_SPLIT} split's inputs ({', '.join(data.inputs)}): {describe_error(error)}")
    classes = len(dataset.classes)
    if logits.ndim != 2 or logits.shape != (len(data), classes):
        raise InputError(f"{who} returns logits of shape {tuple(logits.shape)} for {len(data)} {CHECK_SPLIT} samples; expected "
                         f"({len(data)}, {classes}): one logit per class of the data set ({', '.join(dataset.classes[:6])}"
                         f"{', ...' if classes > 6 else ''})")
    finite = np.isfinite(logits).all(axis=1)
    if not finite.all():
        first = data.ids[int(np.argmin(finite))]
        raise InputError(f"{who} gives NaN or infinite logits on {int((~finite).sum())} of {len(data)} {CHECK_SPLIT} samples "
                         f"(first: sample '{first}')")
