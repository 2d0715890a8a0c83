"""Params and MACs, per branch, the way the ledger and the stage facts report them."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.export import example_inputs
from pipeline.runners import ort_session
from pipeline.timing import WarmUp, time_call

BRANCHES = ("image", "text", "fusion")
# The parts of a FusedClassifier each branch is made of; the classifier counts with fusion.
BRANCH_PARTS = {"image": ("image_encoder",), "text": ("text_encoder",), "fusion": ("fusion", "classifier")}


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def params_by_branch(model: nn.Module) -> dict[str, int]:
    """Parameters per branch and in total (a model without branches counts as one 'total')."""
    if not all(hasattr(model, part) for part in ("image_encoder", "text_encoder")):  # not FusedClassifier-shaped: no parts to name
        return {"total": count_params(model)}
    counts = {branch: sum(count_params(getattr(model, part)) for part in parts if hasattr(model, part)) for branch, parts in BRANCH_PARTS.items()}
    return {**counts, "total": count_params(model)}


def count_macs(module: nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    """Multiply-accumulates of one forward pass per sample (FlopCounterMode counts matmul and conv; FLOPs = 2 MACs).

    Embedding lookups, norms and activations are not MACs and are not counted.
    """
    batch = int(inputs[0].shape[0])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module.eval()(*inputs)
    return int(counter.get_total_flops() // 2 // batch)


def macs_by_branch(model: nn.Module, inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """MACs per sample per branch and in total, for a FusedClassifier-shaped model (else only the total)."""
    total = count_macs(model, inputs)
    if not all(hasattr(model, part) for part in ("image_encoder", "text_encoder")):
        return {"total": total}
    image = count_macs(model.image_encoder, inputs[:1])
    text = count_macs(model.text_encoder, inputs[1:])
    return {"image": image, "text": text, "fusion": total - image - text, "total": total}


def onnx_cpu_latency_ms(path, spec, batches: Sequence[int] = (1, 16), threads: int = 2, repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median wall time of one ONNX Runtime CPU run per batch size (the ledger's latency columns).

    Inputs are the export stage's example inputs (random image, half-masked
    tokens): latency does not depend on the values. Each batch size is one
    turn of pipeline.timing: untimed runs (at least `warmup` of them and for
    at least WarmUp.seconds), then `repeats` timed runs.
    """
    session = ort_session(path, threads)
    names = [i.name for i in session.get_inputs()]
    result = {}
    for batch in batches:
        feed = {name: t.numpy() for name, t in zip(names, example_inputs(spec, batch))}
        timed = time_call(lambda: session.run(None, feed), repeats, warmup=WarmUp(runs=warmup))
        result[f"batch{batch}_ms"] = timed.median_ms
    return result
