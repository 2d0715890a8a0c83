"""PyTorch's own TransformerEncoder over the tokens, image patches from a stride-8 conv, and a pooled
text query cross-attending to the patches (nn.MultiheadAttention)."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 30522  # all-MiniLM-L6-v2's WordPiece vocabulary
TOKENS = 16
PATCHES = (32 // 8) ** 2


class CrossAttentionMatcher(nn.Module):
    input_spec = {"image_size": 32, "max_tokens": TOKENS}

    def __init__(self, num_classes: int = 2, d_model: int = 64, width: int = 16):
        super().__init__()
        # A narrow table and a projection (ALBERT's factorized embedding): 30522 x 64 alone would be 2M parameters.
        self.token_embedding = nn.Sequential(nn.Embedding(VOCAB, width), nn.Linear(width, d_model, bias=False))
        self.positions = nn.Parameter(torch.zeros(1, TOKENS, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=128, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.patchify = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.GELU(), nn.Conv2d(12, d_model, 8, stride=8))  # 4x4 patches
        self.patch_positions = nn.Parameter(torch.zeros(1, PATCHES, d_model))
        self.patch_norm = nn.LayerNorm(d_model)
        self.cross = nn.MultiheadAttention(d_model, num_heads=4, batch_first=True)
        self.out_norm = nn.LayerNorm(2 * d_model)
        self.classifier = nn.Sequential(nn.Linear(2 * d_model, 64), nn.GELU(), nn.Linear(64, num_classes))
        nn.init.normal_(self.positions, std=0.02)
        nn.init.normal_(self.patch_positions, std=0.02)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        padding = attention_mask == 0
        tokens = self.encoder(self.token_embedding(input_ids) + self.positions, src_key_padding_mask=padding)
        weights = attention_mask.to(tokens.dtype).unsqueeze(-1)
        query = ((tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)).unsqueeze(1)  # [batch, 1, d]
        patches = self.patchify(image).flatten(2).transpose(1, 2) + self.patch_positions  # [batch, 16, d]
        patches = self.patch_norm(patches)
        attended, _ = self.cross(query, patches, patches, need_weights=False)
        return self.classifier(self.out_norm(torch.cat([query, attended], dim=2).squeeze(1)))


def build(num_classes: int = 2) -> nn.Module:
    return CrossAttentionMatcher(num_classes)
