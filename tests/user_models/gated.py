"""Image and token ids only (no attention mask): an MLP over the 8x8 average-pooled image, a LayerNorm'd
embedding and a 1D conv over the tokens, fused by a bilinear (elementwise) product under a sigmoid gate."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 30522  # all-MiniLM-L6-v2's WordPiece vocabulary (the ids are MiniLM's; padding is id 0)


class BilinearGateMatcher(nn.Module):
    input_spec = {"image_size": 32, "max_tokens": 16}

    def __init__(self, num_classes: int = 2, width: int = 16, joint: int = 64):
        super().__init__()
        self.pixels = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 128), nn.GELU(), nn.Linear(128, joint))
        self.lookup = nn.Embedding(VOCAB, width)
        self.token_norm = nn.LayerNorm(width)
        self.token_conv = nn.Conv1d(width, joint, kernel_size=3, padding=1)
        self.text_out = nn.Linear(joint, joint)
        self.gate = nn.Linear(joint, joint)
        self.classifier = nn.Sequential(nn.Linear(3 * joint, joint), nn.GELU(), nn.Linear(joint, num_classes))

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        picture = self.pixels(F.adaptive_avg_pool2d(image, 8))
        tokens = self.token_norm(self.lookup(input_ids)).transpose(1, 2)  # [batch, width, tokens]
        words = self.text_out(F.gelu(self.token_conv(tokens)).amax(dim=2))  # max over positions: no mask needed
        product = picture * words * torch.sigmoid(self.gate(picture))
        return self.classifier(torch.cat([product, picture, words], dim=1))


def build(num_classes: int = 2) -> nn.Module:
    return BilinearGateMatcher(num_classes)
