"""Fusion modules: how the image and text feature vectors become one.

The three strategies used for late fusion of two modalities:
- concat: project each modality, concatenate;
- weighted: project each to a shared space, mix with learned per-modality weights;
- attention: treat the two projected vectors as tokens and attention-pool them
  with a learned query, so the mix is decided per sample.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.settings import FUSIONS


class _ProjectedPair(nn.Module):
    """Projects each modality to dim with its own Linear + ReLU: the part every fusion shares."""

    def __init__(self, image_features: int, text_features: int, dim: int):
        super().__init__()
        self.image_proj = nn.Linear(image_features, dim)
        self.text_proj = nn.Linear(text_features, dim)
        self.act = nn.ReLU()
        self.out_features = dim

    def project(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.act(self.image_proj(image)), self.act(self.text_proj(text))


class ConcatFusion(_ProjectedPair):
    def __init__(self, image_features: int, text_features: int, dim: int):
        super().__init__(image_features, text_features, dim)
        self.out_features = 2 * dim

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.project(image, text), dim=1)


class WeightedFusion(_ProjectedPair):
    def __init__(self, image_features: int, text_features: int, dim: int):
        super().__init__(image_features, text_features, dim)
        self.modality_logits = nn.Parameter(torch.zeros(2))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.modality_logits, dim=0)
        projected_image, projected_text = self.project(image, text)
        return weights[0] * projected_image + weights[1] * projected_text


class AttentionFusion(_ProjectedPair):
    def __init__(self, image_features: int, text_features: int, dim: int):
        super().__init__(image_features, text_features, dim)
        self.query = nn.Parameter(torch.randn(dim) / math.sqrt(dim))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        tokens = torch.stack(self.project(image, text), dim=1)  # [N, 2, D]
        scores = torch.matmul(tokens, self.query) / math.sqrt(tokens.shape[-1])  # [N, 2]
        weights = torch.softmax(scores, dim=1).unsqueeze(-1)
        return (weights * tokens).sum(dim=1)


def make_fusion(kind: str, image_features: int, text_features: int, dim: int) -> nn.Module:
    classes = {"concat": ConcatFusion, "weighted": WeightedFusion, "attention": AttentionFusion}
    if kind not in classes:
        raise ValueError(f"unknown fusion '{kind}'; choose one of {', '.join(FUSIONS)}")
    return classes[kind](image_features, text_features, dim)
