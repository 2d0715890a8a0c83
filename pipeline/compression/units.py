"""Prunable units: the channel groups the prune stage may shrink, named per branch.

A unit is one Torch-Pruning group, addressed by the module whose output
channels root it; the dependency graph couples everything else (BatchNorms,
depthwise convs, the consumer's input channels, the fusion's inputs, the
attention-fusion query). Only groups that stay inside one block are units:

- text: the attention heads of each layer (q/k/v outputs and the output
  projection's inputs, whole heads) and the FFN width of each layer. The
  residual width (embeddings, every LayerNorm, every layer) is not a unit: it
  would touch every layer and the 11.7M-parameter embedding at once.
- image: the expansion width of each EfficientNet MBConv block (expand conv,
  depthwise conv, their BNs, the project conv's inputs) and the head conv's
  outputs (remapping the fusion's image input); every conv of SmallCNN. The
  residual stage widths (skip connections) are not units.
- fusion: the projection width (image_proj/text_proj; one unit when the fusion
  couples them, as weighted and attention fusion do).

The classifier is never a root, so class outputs are never pruned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

from torch import nn

Branch = Literal["image", "text", "fusion"]
CHANNEL_QUANTUM = 8  # round_to: kept widths are multiples of 8 (tensor cores, TensorRT tactics)


@dataclass(frozen=True)
class Unit:
    name: str  # stable, readable id, e.g. "text.layer3.heads"
    branch: Branch
    kind: Literal["heads", "ffn", "expansion", "output", "channels", "projection"]
    root: str  # module whose output channels root the group
    channels: int  # current output channels of root
    step: int  # channels removed together: head_dim for heads, 1 otherwise (then rounded to CHANNEL_QUANTUM)
    trainable: bool  # inside the part pipeline.training.train fine-tunes (encoder suffix, fusion, head)
    attention: str | None = None  # the SelfAttention module whose num_heads follows (heads only)


def _is_self_attention(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("num_heads", "head_dim", "query", "key", "value"))


def _text_units(model: nn.Module) -> Iterator[Unit]:
    encoder = getattr(model, "text_encoder", None)
    if encoder is None or not hasattr(encoder, "encoder"):
        return
    split_at = getattr(encoder, "split_at", 0)
    for i, layer in enumerate(encoder.encoder.layer):
        prefix = f"text_encoder.encoder.layer.{i}"
        attention = layer.attention.self
        if _is_self_attention(attention) and attention.num_heads > 1:
            yield Unit(f"text.layer{i}.heads", "text", "heads", f"{prefix}.attention.self.query", attention.query.out_features,
                       attention.head_dim, i >= split_at, f"{prefix}.attention.self")
        yield Unit(f"text.layer{i}.ffn", "text", "ffn", f"{prefix}.intermediate.dense", layer.intermediate.dense.out_features, 1, i >= split_at)


def _image_units(model: nn.Module) -> Iterator[Unit]:
    encoder = getattr(model, "image_encoder", None)
    if encoder is None:
        return
    split_at = getattr(encoder, "split_at", 0)
    if hasattr(encoder, "blocks"):  # EfficientNet-Lite
        for i, block in enumerate(encoder.blocks):
            if hasattr(block, "_expand_conv"):  # block 0 has no expansion: its width is the stem's
                yield Unit(f"image.block{i}.expansion", "image", "expansion", f"image_encoder.blocks.{i}._expand_conv",
                           block._expand_conv.out_channels, 1, i >= split_at)
        yield Unit("image.head", "image", "output", "image_encoder.head.0", encoder.head[0].out_channels, 1, True)
    elif hasattr(encoder, "features"):  # SmallCNN: no skips, every conv is its own group
        for j, layer in enumerate(encoder.features):
            if isinstance(layer, nn.Conv2d):
                yield Unit(f"image.conv{j}", "image", "channels", f"image_encoder.features.{j}", layer.out_channels, 1, True)


def _fusion_units(model: nn.Module) -> Iterator[Unit]:
    fusion = getattr(model, "fusion", None)
    if fusion is None or not hasattr(fusion, "image_proj"):
        return
    # concat keeps the two projections independent; weighted/attention add or stack them (one group).
    coupled = not type(fusion).__name__.startswith("Concat")
    yield Unit("fusion.image_proj" if not coupled else "fusion.proj", "fusion", "projection", "fusion.image_proj", fusion.image_proj.out_features, 1, True)
    if not coupled:
        yield Unit("fusion.text_proj", "fusion", "projection", "fusion.text_proj", fusion.text_proj.out_features, 1, True)


def prunable_units(model: nn.Module) -> list[Unit]:
    """Every prunable unit of a reference fused model, image, text then fusion (empty for other models)."""
    return [*_image_units(model), *_text_units(model), *_fusion_units(model)]


def kept_channels(unit: Unit, ratio: float) -> int:
    """How many output channels a unit keeps at a pruning ratio: whole heads, or a multiple of 8.

    Never fewer than one head / one quantum: a unit is shrunk, never removed
    (removing a whole block is depth pruning, a different operation).
    """
    if unit.step > 1:
        heads = unit.channels // unit.step
        return max(1, round(heads * (1.0 - ratio))) * unit.step
    if unit.channels <= CHANNEL_QUANTUM:
        return unit.channels
    kept = round(unit.channels * (1.0 - ratio) / CHANNEL_QUANTUM) * CHANNEL_QUANTUM
    return min(unit.channels, max(CHANNEL_QUANTUM, kept))
