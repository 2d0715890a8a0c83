"""BatchNorm recalibration after pruning: re-estimate the statistics pruning made stale.

Pruning an MBConv block's expansion width removes inputs of its 1x1 project
conv, so the conv's outputs, and the BatchNorm right after it, no longer
have the mean and variance that BatchNorm's running statistics hold. Those
BatchNorms (and only those: every other one still sees what it was trained
on) get their statistics re-estimated on real samples, a forward pass with
no gradient. On the default model with blocks 6-15 pruned by 0.6 this takes
accuracy before recovery from 65% to 82% (one forward pass over 512 samples).

An earlier try, a least-squares refit of those convs from the kept channels
(ThiNet-style, layer by layer on 384 samples), did worse than this: fitted
one pass at a time, each layer's fit was stale as soon as the layer before
it changed.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from pipeline.compression.structure import is_pointwise_conv


def _in_width(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def lost_inputs(original: nn.Module, pruned: nn.Module) -> list[str]:
    """Layers (Linear, 1x1 conv) that lost input channels to pruning, by name."""
    reference = dict(original.named_modules())
    found = []
    for name, module in pruned.named_modules():
        before = reference.get(name)
        if (isinstance(module, nn.Linear) or is_pointwise_conv(module)) and type(before) is type(module) and _in_width(module) < _in_width(before):
            found.append(name)
    return found


def following_batchnorm(model: nn.Module, name: str) -> str | None:
    """The BatchNorm registered right after a conv (skipping the conv's own children), when it normalises its outputs."""
    modules = dict(model.named_modules())
    names = list(modules)
    after = [n for n in names[names.index(name) + 1:] if not n.startswith(name + ".")]
    if after and isinstance(modules[after[0]], nn.BatchNorm2d) and isinstance(modules[name], nn.Conv2d) \
            and modules[after[0]].num_features == modules[name].out_channels:
        return after[0]
    return None


def stale_batchnorms(original: nn.Module, pruned: nn.Module) -> list[str]:
    return [bn for bn in (following_batchnorm(pruned, name) for name in lost_inputs(original, pruned)) if bn is not None]


def recalibrate_batchnorms(original: nn.Module, pruned: nn.Module, batches: Iterable[Sequence[torch.Tensor]],
                           forward: Callable[[Sequence[torch.Tensor]], Any] | None = None) -> list[str]:
    """Re-estimate the running statistics of pruned's stale BatchNorms (in place) over batches of model inputs.

    forward runs one batch through the part of pruned that holds them (default: the whole model).
    """
    names = stale_batchnorms(original, pruned)
    if not names:
        return []
    modules = dict(pruned.named_modules())
    pruned.eval()
    saved = {}
    for name in names:
        norm = modules[name]
        saved[name] = norm.momentum
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over all batches, not an exponential one
        norm.train()
    try:
        with torch.no_grad():
            for batch in batches:
                (forward or (lambda inputs: pruned(*inputs)))(batch)
    finally:
        for name in names:
            modules[name].momentum = saved[name]
        pruned.eval()
    return names
