"""Factorize stage: truncated SVD of Linear and 1x1 conv layers into two thinner layers.

torch model -> low-rank torch model (+ facts). For a weight W (out x in) the
rank r is the smallest, rounded up to a multiple of 8, whose singular values
keep `energy` of sum(sigma^2); W becomes (U_r sqrt(S_r)) (sqrt(S_r) V_r^T), a
layer in -> r (no bias) followed by r -> out (the original bias). A layer is
split only where that saves at least `min_saving` of its parameters (and so
of its MACs: per input position both scale with the same weight count);
everything else is listed as skipped, with the reason.

Embeddings (the 11.7M-parameter word embedding of MiniLM holds 45% of the
default model) are factorized only when asked (embeddings=True): the
weight's energy says little about the rows of tokens a task never sees, so
this wants recovery that trains the embedding (see the stage notes).

k x k convolutions (EfficientNet's depthwise convs) are not factorized: a
depthwise conv has one filter per channel and nothing to share, and the
stem's 3x3 conv is 864 weights.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn

from pipeline.compression.measure import macs_by_branch, params_by_branch
from pipeline.compression.sensitivity import BranchRunner, Sensitivity, branch_of, compare_logits
from pipeline.compression.structure import append_step, is_pointwise_conv, low_rank_pair, replace_module
from pipeline.data.encode import Encoded
from pipeline.errors import InputError

RANK_QUANTUM = 8
DEFAULT_MIN_SAVING = 0.1  # two kernels instead of one cost latency; a split must buy a real saving


@dataclass(frozen=True)
class LayerPlan:
    module: str
    shape: tuple[int, int]  # (out, in)
    rank: int
    energy_kept: float
    params_before: int
    params_after: int


@dataclass(frozen=True)
class Skipped:
    module: str
    reason: str


def factorize_settings(energy: float, min_saving: float = DEFAULT_MIN_SAVING, scope: str = "all", embeddings: bool = False,
                       embedding_energy: float | None = None) -> dict[str, Any]:
    """Everything that changes the factorized model: part of the stage's cache key."""
    return {"energy": energy, "min_saving": min_saving, "scope": scope, "rank_quantum": RANK_QUANTUM,
            "embeddings": embeddings, "embedding_energy": embedding_energy}


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as out x in (an embedding maps a one-hot vocabulary entry to the hidden width)."""
    if isinstance(layer, nn.Embedding):
        return layer.weight.detach().t().double()
    return layer.weight.detach().reshape(layer.weight.shape[0], -1).double()


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank keeping `energy` of the spectral energy, rounded up to a multiple of 8 (capped at full rank)."""
    squared = singular_values.double() ** 2
    kept = torch.cumsum(squared, 0) / squared.sum().clamp(min=1e-30)
    rank = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item()) + 1
    return min(singular_values.numel(), math.ceil(rank / RANK_QUANTUM) * RANK_QUANTUM)


# Modules whose forward reads their child layers' .weight directly (torch's fused attention and
# fast-path transformer layers): a child swapped for two thin layers would break them.
WEIGHT_READERS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def factorizable_layers(model: nn.Module, scope: Literal["trainable", "all"] = "all", embeddings: bool = False,
                        called: set[str] | None = None, keep: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """Linear and 1x1 conv layers (and token embeddings when asked) in scope that can be swapped for a low-rank pair.

    called: the modules a forward pass calls (None: the built-in models, whose
    token table is known by name); an embedding only indexed through .weight
    cannot be swapped. keep: modules left whole (compression.keep).
    """
    wanted = trainable_names(model) if scope == "trainable" else None
    readers = read_by_parent(model)
    return [(name, m) for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) or is_pointwise_conv(m) or (embeddings and is_token_embedding(name, m, called)))
            and (wanted is None or _under(name, wanted)) and name not in readers and not _under(name, keep)]


def read_by_parent(model: nn.Module) -> dict[str, str]:
    """{layer: why it stays whole} for the layers whose parent reads their weights directly."""
    found = {}
    for parent_name, parent in model.named_modules():
        if isinstance(parent, WEIGHT_READERS):
            for child_name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    name = f"{parent_name}.{child_name}" if parent_name else child_name
                    found[name] = f"{type(parent).__name__} reads its {child_name}.weight directly (a low-rank pair would break it)"
    return found


def is_token_embedding(name: str, module: nn.Module, called: set[str] | None = None) -> bool:
    # The built-in text encoder calls only its token table as a module; the position and token-type
    # tables are indexed through .weight, so they stay whole. Another model's embeddings count where it calls them.
    if not isinstance(module, nn.Embedding):
        return False
    return name.rpartition(".")[2] == "word_embeddings" if called is None else name in called


def trainable_names(model: nn.Module) -> list[str] | None:
    """Modules pipeline.training.train fine-tunes: encoder suffixes, fusion, classifier (None: all, for other models)."""
    if not all(hasattr(getattr(model, p, None), "suffix_modules") for p in ("image_encoder", "text_encoder")):
        return None
    ids = {id(m) for e in (model.image_encoder, model.text_encoder) for m in e.suffix_modules()}
    suffix = [name for name, m in model.named_modules() if id(m) in ids]
    return suffix + [name for name, _ in model.named_children() if name not in ("image_encoder", "text_encoder")]


def low_rank_factors(layer: nn.Module, energy: float, token_weights: torch.Tensor | None = None) -> tuple[int, float, torch.Tensor, torch.Tensor]:
    """(rank, energy kept, first, second): the layer's weight (out x in) ~= second @ first, first rank x in, second out x rank.

    token_weights (an embedding only): how much each vocabulary row matters
    (its frequency in the training text). The rank-r subspace is then the one
    that keeps `energy` of the *weighted* table, and every row is projected
    onto it: the rows of tokens the task uses stay nearly exact, where the
    plain SVD would spend its rank on the 30k tokens the task never sees.
    """
    if isinstance(layer, nn.Embedding) and token_weights is not None:
        table = layer.weight.detach().double()  # vocab x hidden
        _, s, vh = torch.linalg.svd(token_weights.double().sqrt()[:, None] * table, full_matrices=False)
        rank = rank_for_energy(s, energy)
        basis = vh[:rank]  # rank x hidden, orthonormal rows
        return rank, float((s[:rank] ** 2).sum() / (s ** 2).sum()), (table @ basis.T).T.float(), basis.T.float()
    weight = weight_matrix(layer)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    rank = rank_for_energy(s, energy)
    root = s[:rank].sqrt()
    return rank, float((s[:rank] ** 2).sum() / (s ** 2).sum()), (root[:, None] * vh[:rank]).float(), (u[:, :rank] * root[None, :]).float()


def plan_layer(name: str, layer: nn.Module, energy: float, min_saving: float,
               token_weights: torch.Tensor | None = None) -> tuple[LayerPlan | None, Skipped | None, tuple | None]:
    """Factor one layer; return its plan (and the factors) or why it stays whole."""
    out_features, in_features = weight_matrix(layer).shape
    rank, kept, first, second = low_rank_factors(layer, energy, token_weights)
    bias = 0 if getattr(layer, "bias", None) is None else out_features
    before, after = out_features * in_features + bias, rank * (in_features + out_features) + bias
    if after > before * (1.0 - min_saving):
        break_even = out_features * in_features * (1.0 - min_saving) / (in_features + out_features)
        return None, Skipped(name, f"rank {rank} for {energy:.3f} energy saves too little (needs rank <= {int(break_even)})"), None
    return LayerPlan(name, (out_features, in_features), rank, kept, before, after), None, (first, second)


TokenWeights = torch.Tensor | Mapping[str, torch.Tensor] | None


def weights_for(name: str, layer: nn.Module, token_weights: TokenWeights) -> torch.Tensor | None:
    """The token weights that apply to this layer: an embedding's own, or the vocabulary-long tensor where its rows match."""
    if token_weights is None or not isinstance(layer, nn.Embedding):
        return None
    if isinstance(token_weights, Mapping):
        return token_weights.get(name)
    return token_weights if token_weights.numel() == layer.num_embeddings else None


def token_frequencies(data: Encoded, vocabulary: int, uniform_share: float = 0.2, ids_name: str = "input_ids",
                      mask_name: str | None = "attention_mask") -> torch.Tensor:
    """Per-token weights: how often each token occurs in data's (unpadded) text, mixed with a uniform share.

    The uniform share keeps a part of the rank for tokens the train split never
    shows: on the emoji data half of the eval split's distinct tokens are not in
    the train split. Measured on the pruned default model at 0.9 energy: share
    0.2 gives rank 176 and keeps eval accuracy, share 0 gives rank 128 and
    loses 0.6 points, plain SVD needs rank 264.
    """
    # the model's own input names; a model without a mask counts its padding too
    ids = data.inputs[ids_name][data.inputs[mask_name] > 0] if mask_name in data.inputs else data.inputs[ids_name]
    counts = torch.bincount(torch.from_numpy(ids.astype("int64")).reshape(-1), minlength=vocabulary).double()
    return (1.0 - uniform_share) * counts / counts.sum() + uniform_share / vocabulary


def _load_factors(pair: nn.Sequential, layer: nn.Module, factors: tuple[torch.Tensor, torch.Tensor]) -> None:
    first, second = factors
    if isinstance(layer, nn.Embedding):
        first = first.t()  # rank x vocab -> the narrow embedding's vocab x rank table
    with torch.no_grad():
        pair[0].weight.copy_(first.reshape(pair[0].weight.shape))
        pair[1].weight.copy_(second.reshape(pair[1].weight.shape))
        if getattr(layer, "bias", None) is not None:
            pair[1].bias.copy_(layer.bias)


def layers_with_energy(model: nn.Module, energy: float | None, scope: Literal["trainable", "all"] = "all", embeddings: bool = False,
                       embedding_energy: float | None = None, called: set[str] | None = None,
                       keep: Sequence[str] = ()) -> list[tuple[str, nn.Module, float]]:
    """(name, layer, retained energy) of every layer the stage would try; energy None leaves Linear/1x1 conv alone."""
    chosen = []
    for name, layer in factorizable_layers(model, scope, embeddings, called, keep):
        layer_energy = embedding_energy if isinstance(layer, nn.Embedding) and embedding_energy is not None else energy
        if layer_energy is not None:
            chosen.append((name, layer, layer_energy))
    return chosen


def check_energy(*energies: float | None) -> None:
    for value in energies:
        if value is not None and not 0.0 < value <= 1.0:
            raise InputError(f"compression.factorize_energy = {value}: the retained spectral energy must be in (0, 1]")


def factorize(
    model: nn.Module,
    energy: float | None,
    min_saving: float = DEFAULT_MIN_SAVING,
    scope: Literal["trainable", "all"] = "all",
    example_inputs: Sequence[torch.Tensor] | None = None,
    embeddings: bool = False,
    embedding_energy: float | None = None,
    token_weights: TokenWeights = None,
    called: set[str] | None = None,
    keep: Sequence[str] = (),
) -> tuple[nn.Module, dict[str, Any]]:
    """A factorized copy of model and the facts (layers factorized with ranks, layers skipped and why).

    energy: retained spectral energy for Linear / 1x1 conv layers (None: leave them whole).
    scope: 'trainable' only touches what pipeline.training.train fine-tunes.
    embeddings: also factorize the token embedding, at embedding_energy (default: energy).
    token_weights: per-token weights for a data-aware embedding factorization (see low_rank_factors): one
        vocabulary-long tensor (for every embedding of that many rows), or {embedding name: tensor}.
    called, keep: see factorizable_layers.
    example_inputs, when given, adds MACs before/after to the facts.
    """
    check_energy(energy, embedding_energy)
    factorized = copy.deepcopy(model).eval()
    params_before = params_by_branch(factorized)
    macs_before = macs_by_branch(factorized, example_inputs) if example_inputs is not None else None
    plans, skipped = [], []
    skipped.extend(Skipped(name, reason) for name, reason in read_by_parent(factorized).items())
    for name, layer, layer_energy in layers_with_energy(factorized, energy, scope, embeddings, embedding_energy, called, keep):
        plan, skip, factors = plan_layer(name, layer, layer_energy, min_saving, weights_for(name, layer, token_weights))
        if plan is None:
            skipped.append(skip)
            continue
        pair = low_rank_pair(layer, plan.rank)
        _load_factors(pair, layer, factors)
        replace_module(factorized, name, pair)
        plans.append(plan)
    if plans:
        append_step(factorized, {"op": "factorize", "layers": [{"module": p.module, "rank": p.rank} for p in plans]})
    facts = {
        "settings": {**factorize_settings(energy, min_saving, scope, embeddings, embedding_energy), "token_weighted": token_weights is not None},
        "params_before": params_before,
        "params_after": params_by_branch(factorized),
        "layers_factorized": [asdict(p) for p in plans],
        "skipped": [asdict(s) for s in skipped],
    }
    if example_inputs is not None:
        facts["macs_before"], facts["macs_after"] = macs_before, macs_by_branch(factorized, example_inputs)
    return factorized, facts


def factorize_sensitivity(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    layers: Sequence[tuple[str, nn.Module, float]],
    labels: torch.Tensor | None = None,
    token_weights: TokenWeights = None,
    branches: Mapping[str, str] | None = None,
) -> list[Sensitivity]:
    """Each (name, layer, energy) alone replaced by the low-rank product the factorize stage would build.

    branches: {layer: branch} where the module names do not say it (a user's model); else pipeline's branch_of.
    """

    runner = BranchRunner(model, inputs)
    results = []
    for name, layer, energy in layers:
        _, _, first, second = low_rank_factors(layer, energy, weights_for(name, layer, token_weights))
        original = layer.weight.data.clone()
        approximation = second @ first  # out x in
        # an embedding's weight is vocabulary x hidden, the transpose of its out x in view
        layer.weight.data = (approximation.t() if isinstance(layer, nn.Embedding) else approximation).reshape(original.shape).contiguous()
        try:
            branch = (branches or {}).get(name) or branch_of(name)
            logits = runner.logits(branch)
        finally:
            layer.weight.data = original
        results.append(Sensitivity(name, branch, energy, *compare_logits(runner.reference, logits, labels), original.numel()))
    return results
