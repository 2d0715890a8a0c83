"""Sensitivity of each prunable unit and factorizable layer, and ratios allocated by it.

Sensitivity is measured on a small batch as the output change when only that
one unit (or layer) is compressed: NMSE of the logits against the
uncompressed model, top-1 agreement, and the accuracy drop when labels are
given. Pruning is simulated exactly without rebuilding anything: the unit's
Torch-Pruning group has every output-channel slice it would remove set to
zero (conv/linear rows and biases, BN/LN scale and shift), so those channels
output act(0) = 0 (ReLU, ReLU6, GELU) and reach their consumers as nothing;
the weights are restored afterwards. Factorization is simulated by swapping
in the rank-r reconstruction of the weight, which the two thin layers compute
(factorize_sensitivity lives beside the factorization, in factorize.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from pipeline.compression.pruners import RECURRENT_TYPES
from pipeline.compression.structure import dependency_graph
from pipeline.compression.units import Unit, kept_channels
from pipeline.compression.prune import channels_to_remove, importance_scorer, unit_group, unit_scores, used_tokens
from pipeline.progress import track


@dataclass(frozen=True)
class Sensitivity:
    name: str  # unit or layer
    branch: str
    setting: float  # pruning ratio or retained energy probed
    nmse: float  # ||z' - z||^2 / ||z||^2 over the batch's logits
    agreement: float  # top-1 agreement with the uncompressed model
    accuracy_drop_pts: float | None  # when labels were given
    size: int  # parameters the unit/layer holds (the allocation weighs by it)


def branch_of(module_name: str) -> str:
    return {"image_encoder": "image", "text_encoder": "text"}.get(module_name.split(".")[0], "fusion")


def compare_logits(reference: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor | None) -> tuple[float, float, float | None]:
    nmse = float(((logits - reference) ** 2).sum() / (reference ** 2).sum().clamp(min=1e-12))
    agreement = float((logits.argmax(1) == reference.argmax(1)).float().mean())
    if labels is None:
        return nmse, agreement, None
    drop = float((reference.argmax(1) == labels).float().mean() - (logits.argmax(1) == labels).float().mean()) * 100
    return nmse, agreement, drop


class BranchRunner:
    """Logits with one branch re-run: the other branch's features are computed once (text units do not re-run the CNN).

    frozen_prefix: the caller only changes the encoders' trainable suffixes, so a
    re-run starts from the prefix outputs computed once (EfficientNet's
    high-resolution stem and early blocks are most of its time).
    """

    def __init__(self, model: nn.Module, inputs: Sequence[torch.Tensor], frozen_prefix: bool = False):
        self.model, self.inputs = model.eval(), tuple(inputs)
        self.split = all(hasattr(model, a) for a in ("image_encoder", "text_encoder", "head"))
        self.from_prefix = frozen_prefix and self.split and all(
            hasattr(getattr(model, e), a) for e in ("image_encoder", "text_encoder") for a in ("prefix", "suffix"))
        with torch.no_grad():
            if self.from_prefix:
                self.image_prefix = model.image_encoder.prefix(self.inputs[0])
                self.text_prefix = model.text_encoder.prefix(*self.inputs[1:])
            if self.split:
                self.image, self.text = self._image(), self._text()
            self.reference = self.logits("all")

    def _image(self) -> torch.Tensor:
        encoder = self.model.image_encoder
        return encoder.suffix(self.image_prefix) if self.from_prefix else encoder(self.inputs[0])

    def _text(self) -> torch.Tensor:
        encoder = self.model.text_encoder
        return encoder.suffix(self.text_prefix, self.inputs[2]) if self.from_prefix else encoder(*self.inputs[1:])

    @torch.no_grad()
    def logits(self, branch: str) -> torch.Tensor:
        if not self.split or branch == "all":
            return self.model(*self.inputs)
        image = self._image() if branch == "image" else self.image
        text = self._text() if branch == "text" else self.text
        return self.model.head(image, text)


def _zero_group_outputs(group) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Zero every output-channel slice of a group; return what is needed to restore it."""
    saved = []
    graph = group._DG
    for dep, indices in group:
        module = dep.target.module
        if not graph.is_out_channel_pruning_fn(dep.handler) or not isinstance(module, nn.Module):
            continue
        index = torch.as_tensor(sorted(indices), dtype=torch.long)
        for tensor, rows in _output_slices(module, index):
            saved.append((tensor.data, rows, tensor.data[rows].clone()))
            tensor.data[rows] = 0
    return saved


def _output_slices(module: nn.Module, index: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | tuple]]:
    """(tensor, where) whose zeroing makes the module's output channels `index` zero."""
    if isinstance(module, nn.Embedding):  # a table's channels are its columns
        return [(module.weight, (slice(None), index))]
    if isinstance(module, RECURRENT_TYPES):  # a hidden unit's rows in every gate: with zero input and state, its output stays 0
        rows = torch.cat([index + gate * module.hidden_size for gate in range(module.weight_hh_l0.shape[0] // module.hidden_size)])
        return [(getattr(module, name), rows) for name in module._flat_weights_names if not name.startswith("weight_hr")]
    return [(tensor, index) for tensor in (getattr(module, "weight", None), getattr(module, "bias", None))
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 1]


def _restore(saved) -> None:
    for data, index, values in saved:
        data[index] = values


def prune_sensitivity(
    model: nn.Module,
    units: Sequence[Unit],
    inputs: Sequence[torch.Tensor],
    labels: torch.Tensor | None = None,
    probe_ratio: float = 0.5,
    scorer: Callable | None = None,
) -> list[Sensitivity]:
    """Each unit pruned alone at probe_ratio (channels chosen as the prune stage would)."""

    scorer = scorer or importance_scorer("magnitude")
    runner = BranchRunner(model, inputs, frozen_prefix=all(unit.trainable for unit in units))
    graph = dependency_graph(model, tuple(t[:2] for t in inputs))
    results = []
    for unit in track(units, desc="sensitivity", unit="unit"):
        keep = kept_channels(unit, probe_ratio)
        indices = channels_to_remove(unit, unit_scores(graph, model, unit, scorer, used_tokens(inputs)), keep)
        group = unit_group(graph, model, unit, indices)
        size = _group_params(unit_group(graph, model, unit, list(range(unit.channels))))
        saved = _zero_group_outputs(group)
        try:
            logits = runner.logits(unit.branch)
        finally:
            _restore(saved)
        results.append(Sensitivity(unit.name, unit.branch, probe_ratio, *compare_logits(runner.reference, logits, labels), size))
    return results


def _group_params(group) -> int:
    """Parameters tied to a group's channels (what pruning it fully would remove), counted once per tensor."""
    seen, total = set(), 0
    for dep, indices in group:
        module = dep.target.module
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, *RECURRENT_TYPES)) or id(module) in seen:
            continue
        seen.add(id(module))
        total += _per_channel(module, group._DG.is_out_channel_pruning_fn(dep.handler)) * len(indices)
    return total


def _per_channel(module: nn.Module, output: bool) -> int:
    """Parameters one output (or input) channel of the module holds."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings if output else 0
    if isinstance(module, RECURRENT_TYPES):
        weights = sum(p.numel() for p in module.parameters())
        return weights // module.hidden_size if output else weights // max(module.input_size + module.hidden_size, 1)
    weight = module.weight
    return weight.numel() // weight.shape[0] if output else weight.numel() // max(weight.shape[1], 1)


def allocate_ratios(
    sensitivities: Sequence[Sensitivity],
    branch_ratios: Mapping[str, float],
    max_ratio: float = 0.8,
    strength: float = 0.5,
) -> dict[str, float]:
    """Per-unit ratios with each branch's parameter budget, sensitive units pruned less.

    Within a branch the ratios are r_u = k * (s_ref / s_u)^strength, clipped to
    [0, max_ratio], with k found by bisection so the parameter-weighted mean of
    r_u equals the branch ratio: the branch sheds the same parameters as a
    uniform ratio would, taken where the output notices least.
    """
    allocation: dict[str, float] = {}
    for branch, target in branch_ratios.items():
        members = [s for s in sensitivities if s.branch == branch]
        if target <= 0 or not members:
            continue
        floor = 1e-12
        reference = torch.tensor([max(m.nmse, floor) for m in members]).log().mean().exp().item()
        weights = [(reference / max(m.nmse, floor)) ** strength for m in members]
        sizes = [max(m.size, 1) for m in members]

        def mean_ratio(k: float) -> float:
            return sum(min(max_ratio, k * w) * n for w, n in zip(weights, sizes)) / sum(sizes)

        low, high = 0.0, max_ratio / min(weights)
        if mean_ratio(high) < target:  # the budget asks for more than max_ratio everywhere allows
            low = high
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if mean_ratio(mid) < target else (low, mid)
        allocation.update({m.name: round(min(max_ratio, high * w), 4) for m, w in zip(members, weights)})
    return allocation
