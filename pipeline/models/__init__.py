"""Reference fused models: a registry from name to (default config, builder).

A user's own model is named `package.module:factory` instead; see user.py.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, NamedTuple

from torch import nn

from pipeline.errors import InputError
from pipeline.models.fused import FusedClassifier, FusedConfig, build_effnet_minilm, build_tiny
from pipeline.settings import DEFAULT_MODEL, TrainSettings  # DEFAULT_MODEL re-exported: the registry's default


class ModelEntry(NamedTuple):
    default_config: Callable[[int], FusedConfig]  # num_classes -> config
    build: Callable[[FusedConfig, bool], FusedClassifier]  # (config, pretrained) -> model
    description: str
    train: TrainSettings = TrainSettings()


MODELS: dict[str, ModelEntry] = {
    "fused-effnet-minilm": ModelEntry(
        default_config=lambda n: FusedConfig(name="fused-effnet-minilm", num_classes=n),
        build=build_effnet_minilm,
        description="pretrained EfficientNet-Lite0 + all-MiniLM-L6-v2, attention fusion, tails fine-tuned",
    ),
    "fused-tiny": ModelEntry(
        default_config=lambda n: FusedConfig(
            name="fused-tiny", num_classes=n, fusion="concat", fusion_dim=64, dropout=0.1, image_size=32,
            text={"hidden": 64, "layers": 2, "heads": 4, "intermediate": 128, "max_positions": 64},
        ),
        build=build_tiny,
        description="small CNN + 2-layer Transformer trained from scratch (tests, quick runs)",
        train=TrainSettings(epochs=25, lr=3e-3, batch_size=32),
    ),
}


def default_config(name: str, num_classes: int, fusion: str | None = None) -> FusedConfig:
    entry = lookup(name)
    config = entry.default_config(num_classes)
    return replace(config, fusion=fusion) if fusion else config


def train_defaults(name: str) -> TrainSettings:
    """The training recipe of a built-in model; a user's model (package.module:factory) gets the generic one."""
    return MODELS[name].train if name in MODELS else TrainSettings()


def lookup(name: str) -> ModelEntry:
    if name not in MODELS:
        raise InputError(f"unknown model '{name}'; known models: {', '.join(MODELS)} (or package.module:factory for your own)")
    return MODELS[name]


def build_model(config: FusedConfig, pretrained: bool) -> nn.Module:
    return lookup(config.name).build(config, pretrained)
