"""Depth pruning: whole MiniLM layers removed, the least sensitive first.

Width pruning leaves every layer part of its cost: at batch 1 and 16 tokens
a MiniLM layer pruned to 3 heads and FFN 384 still took about 0.25 ms of
ONNX Runtime's FP32 time on 2 threads (the default model's compressed export:
3.42 ms with 6 layers, 2.66 ms with 3; BENCHMARKS.md), while its MACs are a
thirtieth of the model's. Fewer layers remove that time.

A BERT layer is a residual update of the hidden stream, so skipping one keeps
the stream well formed and the model runnable. Which layers go is measured:
each remaining layer is skipped alone on the probe batch (NMSE of the logits
against the unpruned model, as for the other units), the least sensitive is
removed, and the rest are measured again, because layers compensate for one
another. Distillation (the prune stage's recovery) then retrains the stack.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from pipeline.compression.sensitivity import BranchRunner, Sensitivity, compare_logits
from pipeline.compression.structure import append_step, replay_kept_layers
from pipeline.errors import InputError

TEXT_LAYERS = "text_encoder.encoder.layer"


def text_layer_list(model: nn.Module) -> nn.ModuleList | None:
    """The MiniLM layer stack of a reference fused model (None for other models)."""
    try:
        layers = model.get_submodule(TEXT_LAYERS)
    except AttributeError:
        return None
    return layers if isinstance(layers, nn.ModuleList) else None


@contextmanager
def _without_layer(model: nn.Module, index: int) -> Iterator[None]:
    encoder = model.text_encoder.encoder
    full = encoder.layer
    encoder.layer = nn.ModuleList(layer for i, layer in enumerate(full) if i != index)
    try:
        yield
    finally:
        encoder.layer = full


def skip_sensitivity(model: nn.Module, runner: BranchRunner, labels: torch.Tensor | None, names: Sequence[str]) -> list[Sensitivity]:
    """Each remaining layer skipped alone: the logits' change against the runner's (unpruned) reference."""
    layers = text_layer_list(model)
    results = []
    for index, name in enumerate(names):
        size = sum(p.numel() for p in layers[index].parameters())
        with _without_layer(model, index):
            logits = runner.logits("text")
        results.append(Sensitivity(name, "text", 0.0, *compare_logits(runner.reference, logits, labels), size))
    return results


def keep_text_layers(model: nn.Module, kept: Sequence[int]) -> None:
    """Keep only the text layers at these indices (in order), recorded so the artifact rebuilds (structure.py)."""
    step = {"op": "keep_layers", "module": TEXT_LAYERS, "kept": [int(i) for i in kept]}
    replay_kept_layers(model, step)
    append_step(model, step)


def drop_text_layers(model: nn.Module, depth: int, inputs: Sequence[torch.Tensor], labels: torch.Tensor | None = None
                     ) -> dict[str, Any]:
    """Remove text layers in place, least sensitive first, until `depth` remain; the facts of what went and why."""
    layers = text_layer_list(model)
    if layers is None:
        raise InputError(f"compression.text_depth = {depth}, but this model has no MiniLM layer stack ({TEXT_LAYERS}); leave it out")
    if not 1 <= depth:
        raise InputError(f"compression.text_depth = {depth} must be >= 1: a text branch needs at least one layer")
    runner = BranchRunner(model, inputs)
    kept = list(range(len(layers)))
    rounds: list[list[dict[str, Any]]] = []
    dropped: list[str] = []
    try:
        while len(kept) > depth:
            model.text_encoder.encoder.layer = nn.ModuleList(layers[i] for i in kept)
            measured = skip_sensitivity(model, runner, labels, [f"text.layer{i}" for i in kept])
            rounds.append([asdict(s) for s in measured])
            least = min(range(len(measured)), key=lambda i: measured[i].nmse)
            dropped.append(measured[least].name)
            del kept[least]
    finally:
        model.text_encoder.encoder.layer = layers
    if dropped:
        keep_text_layers(model, kept)  # one cut, so the structure records one step
    return {"layers_before": len(layers), "layers_after": len(kept), "kept": kept, "dropped": dropped, "rounds": rounds}
