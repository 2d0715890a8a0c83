"""A residual CNN (depthwise 3x3 between pointwise convs, BatchNorm, skip add), masked-mean text, gated fusion."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 30522  # all-MiniLM-L6-v2's WordPiece vocabulary


class InvertedResidual(nn.Module):
    def __init__(self, channels: int, expand: int = 2):
        super().__init__()
        inner = channels * expand
        self.body = nn.Sequential(
            nn.Conv2d(channels, inner, 1, bias=False), nn.BatchNorm2d(inner), nn.ReLU(inplace=True),
            nn.Conv2d(inner, inner, 3, padding=1, groups=inner, bias=False), nn.BatchNorm2d(inner), nn.ReLU(inplace=True),
            nn.Conv2d(inner, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class GatedResidualMatcher(nn.Module):
    input_spec = {"image_size": 32, "max_tokens": 16}

    def __init__(self, num_classes: int = 2, channels: int = 48, width: int = 16, joint: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(InvertedResidual(channels), nn.MaxPool2d(2), InvertedResidual(channels), InvertedResidual(channels))
        self.embedding = nn.Embedding(VOCAB, width)
        self.text_proj = nn.Linear(width, joint)
        self.image_proj = nn.Linear(channels, joint)
        self.gate = nn.Linear(2 * joint, joint)
        self.classifier = nn.Sequential(nn.Linear(2 * joint, joint), nn.ReLU(inplace=True), nn.Linear(joint, num_classes))

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        picture = self.image_proj(self.blocks(self.stem(image)).mean(dim=(2, 3)))
        weights = attention_mask.to(picture.dtype).unsqueeze(-1)
        words = self.text_proj((self.embedding(input_ids) * weights).sum(1) / weights.sum(1).clamp(min=1.0))
        g = torch.sigmoid(self.gate(torch.cat([picture, words], dim=1)))
        mixed = g * picture + (1 - g) * words
        return self.classifier(torch.cat([mixed, picture * words], dim=1))  # the product: whether the two agree


def build(num_classes: int = 2) -> nn.Module:
    return GatedResidualMatcher(num_classes)
