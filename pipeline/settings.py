"""The build's plain settings, importable without torch: the training settings, the default model, the fusion names.

The command line shows these as its defaults; a device that only verifies a
bundle with ONNX Runtime (`python -m pipeline verify --runtime ort`) has no
torch, so they cannot live beside the models and the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "fused-effnet-minilm"
FUSIONS = ("concat", "weighted", "attention")


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3  # fusion and classifier
    encoder_lr: float = 1e-4  # fine-tuned encoder tails
    weight_decay: float = 1e-2
    label_smoothing: float = 0.1
    seed: int = 0
    distill_temperature: float = 4.0
    distill_weight: float = 0.7  # share of the KL term when a teacher's logits are given
