"""What the prune and factorize passes share: the teacher, the data and the settings their recoveries train with."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.artifacts import Artifact
from pipeline.compression.recovery import Recovery
from pipeline.models.checkpoint import load_torch_artifact, read_description
from pipeline.stages.base import Context, onnx_source
from pipeline.training import TrainSettings


@dataclass(frozen=True)
class RecoveryConfig:
    train: TrainSettings  # epochs: the budget; encoder_lr: the stage's rate; seed: the recovery seed
    patience: int
    mixed: float
    features: float  # weight of the hidden-state term
    teacher: str  # sha256 of the source model
    data: tuple[tuple[str, str], ...]  # (split, content fingerprint) of train and calib
    selection: str = "calib KL to the teacher"


def recovery_seed(ctx: Context) -> int:
    """The seed the recoveries train with: the target's (or --recovery-seed), else the build's --seed."""
    seed = ctx.target.compression.recovery_seed
    return ctx.train.seed if seed is None else seed


def recovery_config(ctx: Context, teacher: Artifact, epochs: int, lr: float) -> RecoveryConfig:
    compression = ctx.target.compression
    settings = dataclasses.replace(ctx.train, epochs=epochs, encoder_lr=lr, seed=recovery_seed(ctx))
    return RecoveryConfig(settings, compression.recovery_patience, compression.recovery_mixed, compression.recovery_features, teacher.sha256,
                          tuple((split, ctx.splits.fingerprint(split)) for split in ("train", "calib")))


def recovery(ctx: Context, teacher: Artifact, config: RecoveryConfig) -> Recovery:
    """Distillation from the source model on the train split, checkpoints chosen by fidelity on calib."""
    return Recovery(ctx.splits.get("train"), ctx.splits.get("calib"), load_torch_artifact(teacher.path), config.train,
                    config.patience, config.mixed, ctx.prefix_cache, config.features)


ONNX_SOURCE = "the source is an ONNX file: the torch stages (prune, factorize, export from torch) do not apply"


def onnx_source_skip(ctx: Context) -> str | None:
    """Why a torch stage does not run for an --onnx build (checked before anything reads the source as a torch model)."""
    return ONNX_SOURCE if onnx_source(ctx) is not None else None


def built_in_model(source: Artifact) -> bool:
    """Whether the source is a built-in fused model (its structure described by name), not a user's."""
    return read_description(source.path)["kind"] == "registry"
