"""A GRU over the token embeddings and a plain three-block CNN, fused by concatenation and an MLP.

own_vocabulary builds it for its own tokenizer: the folder named by $USER_MODELS_TOKENIZER, whose
vocabulary sizes the embedding, declared in the model's input_spec (so its files are in the source key).
"""

from __future__ import annotations

import os

import torch
from torch import nn

VOCAB = 30522  # all-MiniLM-L6-v2's WordPiece vocabulary: the ids the pipeline's default tokenizer gives


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class RecurrentMatcher(nn.Module):
    input_spec = {"image_size": 32, "max_tokens": 16}

    def __init__(self, num_classes: int = 2, width: int = 16, hidden: int = 64, joint: int = 128, dropout: float = 0.1, vocab: int = VOCAB):
        super().__init__()
        self.words = nn.Embedding(vocab, width)
        self.gru = nn.GRU(width, hidden, num_layers=1, batch_first=True)
        self.cnn = nn.Sequential(
            conv_bn_relu(3, 16), nn.MaxPool2d(2),   # 16x16
            conv_bn_relu(16, 32), nn.MaxPool2d(2),  # 8x8
            conv_bn_relu(32, 48),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.mix = nn.Sequential(nn.Linear(hidden + 48, joint), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.classifier = nn.Linear(joint, num_classes)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(self.words(input_ids))  # [batch, tokens, hidden]; padding is on the right, so real tokens never see it
        weights = attention_mask.to(states.dtype).unsqueeze(-1)
        text = (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        picture = self.cnn(image)
        return self.classifier(self.mix(torch.cat([picture, text], dim=1)))


def build(num_classes: int = 2) -> nn.Module:
    return RecurrentMatcher(num_classes)


def own_vocabulary(num_classes: int = 2) -> nn.Module:
    from transformers import AutoTokenizer

    folder = os.environ["USER_MODELS_TOKENIZER"]
    model = RecurrentMatcher(num_classes, width=32, vocab=len(AutoTokenizer.from_pretrained(folder)))
    model.input_spec = {**RecurrentMatcher.input_spec, "tokenizer": folder}
    return model
