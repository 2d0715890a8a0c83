"""Structural pruning with Torch-Pruning's dependency graph, ratios per branch.

torch model -> thinner torch model (+ facts). Each unit (see
pipeline.compression.units) keeps its most important channels by group
importance (L2 magnitude by default, first-order Taylor on a labelled batch
when asked), rounded to multiples of 8 or to whole attention heads. The graph
removes the coupled channels everywhere (BNs, depthwise convs, the next
layer's inputs, the fusion's inputs); the SelfAttention head counts are
updated so the model still runs and exports. What was removed is recorded on
the model (pipeline.compression.structure) so the torch artifact rebuilds.

The prune pass (pipeline/stages/prune.py) composes these with sensitivity,
depth pruning, BatchNorm recalibration and recovery.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.compression.discover import Discovery, check_keep, discover_units
from pipeline.compression.pruners import RECURRENT_TYPES
from pipeline.compression.structure import (append_step, dependency_graph, json_history, set_num_heads,
                                            sync_feature_widths, unit_group)
from pipeline.compression.trimmed import TrimmedEmbedding
from pipeline.compression.units import Unit, kept_channels, prunable_units
from pipeline.data.encode import Encoded
from pipeline.errors import InputError
from pipeline.compression.recovery import Recovery
from pipeline.targets import Budget, Compression
from pipeline.compression.measure import count_macs, count_params, macs_by_branch, params_by_branch
from pipeline.compression.recalibrate import stale_batchnorms
from pipeline.training import prefix_outputs

IMPORTANCES = ("magnitude", "taylor")
MAX_BUDGET_RATIO = 0.9  # a MACs budget never prunes a unit by more than this
RECALIBRATION_SAMPLES = 512  # train samples the stale BatchNorm statistics are re-estimated on
RECALIBRATION_BATCH = 64
Reach = Literal["trainable", "all"]
# One reach for every branch, or one per branch, e.g. {"text": "all", "image": "trainable"}
# (MiniLM layers are cheap to retrain at 16 tokens; EfficientNet's early blocks are not).
Scope = Reach | Mapping[str, Reach]


@dataclass(frozen=True)
class UnitResult:
    unit: str
    branch: str
    channels_before: int
    channels_after: int
    ratio: float


def branch_ratios(compression: Compression) -> dict[str, float]:
    return {"image": compression.prune_image, "text": compression.prune_text, "fusion": compression.prune_fusion}


def prune_settings(compression: Compression, importance: str = "magnitude", scope: Scope = "trainable",
                   unit_ratios: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Everything that changes the pruned model: part of the stage's cache key."""
    settings = {"ratios": branch_ratios(compression), "text_depth": compression.text_depth, "importance": importance, "scope": branch_scope(scope),
                "round_to": 8, "unit_ratios": dict(sorted((unit_ratios or {}).items()))}
    return settings | ({"keep": list(compression.keep)} if compression.keep else {})


def check_ratios(ratios: Mapping[str, float], units: Sequence[Unit]) -> None:
    """Refuse ratios that would remove a whole branch or that have nothing to act on, before touching the model."""
    for branch, ratio in ratios.items():
        if not 0.0 <= ratio < 1.0:
            raise InputError(f"compression.prune_{branch} = {ratio}: a pruning ratio must be in [0, 1); "
                             f"{ratio} would remove {'every channel of' if ratio >= 1 else 'more than'} the {branch} branch")
        if ratio > 0 and not any(u.branch == branch for u in units):
            raise InputError(f"compression.prune_{branch} = {ratio}, but this model has no prunable {branch} units "
                             "(the manifest's prune facts list the groups left whole and why); set it to 0")


def check_unit_ratios(unit_ratios: Mapping[str, float], units: Sequence[Unit]) -> None:
    known = {u.name for u in units}
    for name, ratio in unit_ratios.items():
        if name not in known:
            raise InputError(f"unit_ratios names '{name}', which is not a prunable unit in scope ({', '.join(sorted(known)) or 'none'})")
        if not 0.0 <= ratio < 1.0:
            raise InputError(f"unit ratio {name} = {ratio}: a pruning ratio must be in [0, 1)")


def branch_scope(scope: Scope) -> dict[str, str]:
    reach = {branch: scope for branch in ("image", "text", "fusion")} if isinstance(scope, str) else {"image": "trainable", "text": "trainable", "fusion": "trainable", **scope}
    for branch, value in reach.items():
        if value not in ("trainable", "all"):
            raise InputError(f"prune scope for {branch} is '{value}'; choose 'trainable' or 'all'")
    return dict(sorted(reach.items()))


def model_units(model: nn.Module, example_inputs: Sequence[torch.Tensor], keep: Sequence[str] = ()) -> tuple[list[Unit], Discovery | None]:
    """The model's prunable units: the built-in models' described ones, else discovered from the dependency graph (and the discovery).

    keep: module names whose outputs stay whole (compression.keep), with everything inside them.
    """
    described = prunable_units(model)
    if not described:
        discovery = discover_units(model, example_inputs, keep)
        return list(discovery.units), discovery
    check_keep(model, keep)
    pinned = lambda unit: any(unit.root == k or unit.root.startswith(k + ".") for k in keep)
    return [u for u in described if not pinned(u)], None


def nothing_to_prune(discovery: Discovery) -> str:
    whole = "; ".join(f"{w.module}: {w.reason}" for w in discovery.left_whole[:4]) or "none found"
    return (f"the model has no prunable group (the logits come from {discovery.output_layer}); groups left whole: {whole}. "
            "Set compression.prune_image, prune_text and prune_fusion to 0, or leave out pinned modules (compression.keep)")


def units_in_scope(model: nn.Module, scope: Scope, example_inputs: Sequence[torch.Tensor], keep: Sequence[str] = ()) -> list[Unit]:
    """The units a ratio reaches: 'trainable' keeps to the part recovery fine-tunes (encoder suffixes, fusion)."""
    reach = branch_scope(scope)
    return [u for u in model_units(model, example_inputs, keep)[0] if reach[u.branch] == "all" or u.trainable]


def importance_scorer(importance: str):
    import torch_pruning as tp

    if importance == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if importance == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise InputError(f"unknown importance '{importance}'; choose one of {', '.join(IMPORTANCES)}")


def _accumulate_gradients(model: nn.Module, batch: tuple[Sequence[torch.Tensor], torch.Tensor], chunk: int = 64) -> None:
    """The labelled batch's mean loss gradient on every weight: what Taylor importance multiplies the weights by.

    Taken chunk by chunk (each chunk's summed loss over the whole batch's size), so a batch of several hundred
    samples costs the activation memory of one chunk."""
    inputs, labels = batch
    model.eval()  # frozen BN/dropout: the gradient of the model as it is deployed
    with torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        for start in range(0, len(labels), chunk):
            part = slice(start, start + chunk)
            (F.cross_entropy(model(*(x[part] for x in inputs)), labels[part], reduction="sum") / len(labels)).backward()


def _clear_gradients(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(False)


def channels_to_remove(unit: Unit, scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the least important channels (whole heads for attention: scores averaged per head)."""
    if unit.step > 1:
        heads = scores.view(-1, unit.step).mean(dim=1)
        dropped_heads = torch.argsort(heads)[: heads.numel() - keep // unit.step].tolist()
        return sorted(h * unit.step + d for h in dropped_heads for d in range(unit.step))
    return sorted(torch.argsort(scores)[: scores.numel() - keep].tolist())


def unit_scores(graph, model: nn.Module, unit: Unit, scorer, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Group importance of each output channel of the unit's root, over all coupled layers.

    tokens: ids the data uses; an embedding's channels are judged on those rows (see root_magnitude).
    """
    scores = scorer(unit_group(graph, model, unit, list(range(unit.channels))))
    return root_magnitude(model.get_submodule(unit.root), unit.channels, tokens) if scores is None else scores.detach().float()


def used_tokens(inputs: Sequence[torch.Tensor] | None) -> torch.Tensor | None:
    """The distinct ids among a batch's integer inputs (token ids and the 0/1 mask), or None."""
    integers = [t.reshape(-1) for t in inputs or () if not t.is_floating_point()]
    return torch.unique(torch.cat(integers)) if integers else None


def root_magnitude(root: nn.Module, channels: int, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """L2 norm of each output channel's weights in the root alone: for groups Torch-Pruning's importance does not score.

    Its group importances know Conv, Linear and the norms, and return nothing
    for a group of an embedding's width feeding a recurrent layer. An
    embedding's columns are measured on the rows of the tokens the data uses:
    a from-scratch table's other rows never left their random start, and of
    MiniLM's 30,522 they are nearly all of it.
    """
    if isinstance(root, nn.Embedding):
        table = root.weight.detach().float()
        if isinstance(root, TrimmedEmbedding) and tokens is not None:  # the ids are the original vocabulary's
            table = table[root.rows_of(tokens)]
        elif tokens is not None:
            table = table[tokens[(tokens >= 0) & (tokens < root.num_embeddings)]]
        return table.norm(dim=0)
    if isinstance(root, RECURRENT_TYPES):  # the hidden unit's recurrent rows, over every gate
        weight = root.weight_hh_l0.detach().float()
        return weight.view(-1, root.hidden_size, weight.shape[1]).norm(dim=(0, 2))
    weight = getattr(root, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.shape[0] == channels:
        return weight.detach().float().reshape(channels, -1).norm(dim=1)
    return torch.ones(channels)


def recovery_split(model: nn.Module, pruned_units: Sequence[str]) -> dict[str, int]:
    """How many text layers / image blocks training must reach so every pruned unit can recover."""
    split: dict[str, int] = {}
    text_layers = [int(n.split(".")[1].removeprefix("layer")) for n in pruned_units if n.startswith("text.layer")]
    image_blocks = [int(n.split(".")[1].removeprefix("block")) for n in pruned_units if n.startswith("image.block")]
    if text_layers and hasattr(model, "text_encoder"):
        split["text_layers"] = len(model.text_encoder.encoder.layer) - min(text_layers)
    if image_blocks and hasattr(getattr(model, "image_encoder", None), "blocks"):
        split["image_blocks"] = len(model.image_encoder.blocks) - min(image_blocks)
    return split


def set_trainable_split(model: nn.Module, text_layers: int | None = None, image_blocks: int | None = None) -> None:
    """Move the frozen-prefix / trained-suffix split that pipeline.training.train uses (never narrower than now).

    Recovery can only repair what it trains: after pruning early text layers the
    text suffix must start at the first pruned layer. Text layers are cheap at
    16 tokens; each extra EfficientNet block costs a forward+backward at its
    resolution on every epoch, so widen the image split with care.
    """
    if text_layers is not None and hasattr(model, "text_encoder"):
        encoder = model.text_encoder
        encoder.split_at = min(encoder.split_at, max(0, len(encoder.encoder.layer) - text_layers))
    if image_blocks is not None and hasattr(getattr(model, "image_encoder", None), "blocks"):
        encoder = model.image_encoder
        encoder.split_at = min(encoder.split_at, max(0, len(encoder.blocks) - image_blocks))


def prune(
    model: nn.Module,
    compression: Compression,
    example_inputs: tuple,
    importance: str = "magnitude",
    scope: Scope = "trainable",
    unit_ratios: Mapping[str, float] | None = None,
    importance_batch: tuple[Sequence[torch.Tensor], torch.Tensor] | None = None,
    found: tuple[list[Unit], Discovery | None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A pruned copy of model and the facts of what went.

    compression: ratios per branch (image, text, fusion); a ratio of 0 leaves the branch alone.
    scope: 'trainable' prunes only what pipeline.training.train can recover as the model is split (encoder
        suffixes, fusion); 'all' prunes every unit (recovery must then reach it: see facts["recovery_split"] and
        set_trainable_split); or a reach per branch, e.g. {"text": "all", "image": "trainable"}.
    unit_ratios: per-unit ratios (from pipeline.compression.sensitivity.allocate) overriding the branch ratio.
    importance_batch: (inputs, labels) for importance='taylor'; its token ids are the rows an embedding's channels are judged on.
    found: model_units(model, example_inputs, compression.keep) when the caller has it (a user's model's
        discovery prunes a trial copy: not worth doing again for the same model).
    """
    scorer = importance_scorer(importance)
    if importance == "taylor" and importance_batch is None:
        raise InputError("importance='taylor' needs a labelled batch (importance_batch) to take gradients on")
    ratios = branch_ratios(compression)
    units, discovery = found if found is not None else model_units(model, example_inputs, compression.keep)
    reach = branch_scope(scope)
    units = [u for u in units if reach[u.branch] == "all" or u.trainable]
    absent = sorted(b for b, r in ratios.items() if r > 0 and not any(u.branch == b for u in units)) if discovery is not None else []
    ratios = {b: (0.0 if b in absent else r) for b, r in ratios.items()}  # a user's model need not have every branch
    check_ratios(ratios, units)
    check_unit_ratios(unit_ratios or {}, units)

    pruned = copy.deepcopy(model).eval()
    params_before, macs_before = params_by_branch(pruned), macs_by_branch(pruned, example_inputs)
    graph = dependency_graph(pruned, example_inputs)
    if importance == "taylor":
        _accumulate_gradients(pruned, importance_batch)
    results, num_heads = [], {}
    tokens = used_tokens(importance_batch[0] if importance_batch is not None else None)
    for unit in units:
        ratio = (unit_ratios or {}).get(unit.name, ratios[unit.branch])
        keep = kept_channels(unit, ratio)
        if ratio <= 0 or keep >= unit.channels:
            continue
        indices = channels_to_remove(unit, unit_scores(graph, pruned, unit, scorer, tokens), keep)
        unit_group(graph, pruned, unit, indices).prune()
        if unit.attention is not None:
            num_heads[unit.attention] = keep // unit.step
        results.append(UnitResult(unit.name, unit.branch, unit.channels, keep, ratio))
    _clear_gradients(pruned)
    set_num_heads(pruned, num_heads)
    sync_feature_widths(pruned)
    append_step(pruned, {"op": "prune", "history": json_history(graph.pruning_history()), "num_heads": num_heads})

    facts = {
        "settings": prune_settings(compression, importance, scope, unit_ratios)
                    | ({"importance_samples": len(importance_batch[1])} if importance == "taylor" else {}),
        "params_before": params_before,
        "params_after": params_by_branch(pruned),
        "macs_before": macs_before,
        "macs_after": macs_by_branch(pruned, example_inputs),
        "groups_pruned": len(results),
        "units": [asdict(r) for r in results],
        "untouched_units": [u.name for u in units if u.name not in {r.unit for r in results}],
        "recovery_split": recovery_split(model, [r.unit for r in results]) if discovery is None else {},  # a user's model trains whole
    }
    if discovery is not None:
        facts["discovered"] = discovery.to_json() | {"branches_without_units": absent}
    return pruned, facts


# ---------------------------------------------------------------- the stage: torch artifact -> pruned, recovered torch artifact


def widen_reach(model: nn.Module, compression: Compression) -> None:
    """Make the trainable split the compression's reach: what is pruned is what recovery trains."""
    set_trainable_split(model, text_layers=compression.text_layers, image_blocks=compression.image_blocks)


def model_batches(data: Encoded, limit: int, size: int = 64) -> list[tuple[torch.Tensor, ...]]:
    """The first `limit` samples as batches of model inputs (data's inputs are in the model's forward order)."""
    head = data.subset(range(min(limit, len(data))))
    return [tuple(torch.from_numpy(array) for array in b.values()) for b in head.batches(size)]


def probe_tensors(probe: Encoded) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """All of probe as one batch of model inputs, and its labels."""
    (inputs,) = model_batches(probe, len(probe), size=max(len(probe), 1))
    return inputs, torch.from_numpy(probe.labels)


def scaled(compression: Compression, factor: float) -> Compression:
    return dataclasses.replace(compression, prune_image=compression.prune_image * factor, prune_text=compression.prune_text * factor,
                               prune_fusion=compression.prune_fusion * factor)


def least_fitting_factor(fits: Callable[[float], bool], low: float, high: float, steps: int) -> float:
    """Bisection for the smallest factor in (low, high] that fits, given that high fits and that more pruning never fits less."""
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def fit_macs_budget(model: nn.Module, compression: Compression, example_inputs: tuple,
                    allocate: Callable[[Compression], Mapping[str, float] | None], steps: int = 8,
                    found: tuple[list[Unit], Discovery | None] | None = None) -> tuple[Compression, dict[str, Any]]:
    """Scale every branch ratio by one factor: the smallest whose pruned model has at most budget_macs of model's MACs.

    The target's branch ratios say how the budget is split between branches
    (and allocate() how within a branch); the factor is found by bisection,
    pruning a copy at each step (shapes only, no recovery).
    """

    budget, reference = compression.budget_macs, count_macs(model, example_inputs)
    highest = max(branch_ratios(compression).values())
    if highest <= 0:
        raise InputError(f"compression.budget_macs = {budget} needs at least one prune ratio > 0 to say which branches may shrink")
    found = found if found is not None else model_units(model, example_inputs, compression.keep)
    macs_at = lambda factor: count_macs(prune(model, scaled(compression, factor), example_inputs, "magnitude", "trainable",
                                              allocate(scaled(compression, factor)), found=found)[0], example_inputs) / reference
    low, high = 0.0, MAX_BUDGET_RATIO / highest
    if macs_at(high) > budget:
        raise InputError(f"compression.budget_macs = {budget}: even ratios of up to {MAX_BUDGET_RATIO} leave {macs_at(high):.2f} of the MACs; "
                         "widen the reach (compression.image_blocks / text_layers) or raise the budget")
    if macs_at(1.0) <= budget:  # the target's ratios already fit: keep them
        high = 1.0
    else:
        high = least_fitting_factor(lambda factor: macs_at(factor) <= budget, low, high, steps)
    fitted = scaled(compression, high)
    return fitted, {"macs_fraction": budget, "factor": round(high, 4), "ratios": branch_ratios(fitted), "macs_after": round(macs_at(high), 4)}


def user_caps(compression: Compression) -> Compression:
    """The compression a user's model is pruned under: the user budget's ratios, allocate and importance where it sets them."""
    budget = compression.user_budget
    if budget is None:
        return compression
    chosen = {name: getattr(budget, name) for name in ("prune_image", "prune_text", "prune_fusion", "allocate", "importance")}
    return dataclasses.replace(compression, **{name: value for name, value in chosen.items() if value is not None})


def fit_user_budget(model: nn.Module, compression: Compression, example_inputs: tuple, budget: Budget, source_params: int,
                    allocate: Callable[[Compression], Mapping[str, float] | None], found: tuple[list[Unit], Discovery | None],
                    most_sensitive_first: Sequence[str] = (), steps: int = 8) -> tuple[Compression, dict[str, float], dict[str, Any]]:
    """The least pruning of the target's shape that fits budget (params as a share of source_params): ratios, per-unit ratios, facts.

    The target's ratios were measured on the built-in models. On a user's model
    they say how the pruning is split between branches and how far it may go;
    pruning further than the budget needs costs accuracy for nothing (three small
    test models pruned at the jetson ratios lost 1.4 to 3.4 points,
    benchmarks/user_models.py). First every branch ratio is scaled by the least
    factor in [0, 1] that fits (bisection, pruning a copy at each step: shapes
    only, no recovery); then each pruned unit, the most sensitive first, is left
    whole where the budget still fits without it (a 16-wide token table halved
    saves almost nothing once trimmed, and costs the most). Where even the
    target's ratios leave more than the budget, they are used as they are and
    the facts say so.
    """
    macs = count_macs(model, example_inputs)

    def shares(factor: float, spared: Sequence[str] = ()) -> tuple[float, float]:
        ratios = {**(allocate(scaled(compression, factor)) or {}), **{name: 0.0 for name in spared}}
        pruned = prune(model, scaled(compression, factor), example_inputs, "magnitude", "trainable", ratios or None, found=found)[0]
        return count_params(pruned) / source_params, count_macs(pruned, example_inputs) / macs

    fits = lambda at: (budget.params is None or at[0] <= budget.params) and (budget.macs is None or at[1] <= budget.macs)
    facts: dict[str, Any] = {"user_budget": dataclasses.asdict(budget)}
    at_ratios = shares(1.0)
    if not fits(at_ratios):
        return compression, allocate(compression) or {}, facts | {
            "factor": 1.0, "ratios": branch_ratios(compression), "spared": [], "params_after": round(at_ratios[0], 4),
            "macs_after": round(at_ratios[1], 4), "out_of_reach": "the target's ratios leave more than the budget: pruned at those ratios"}
    high = 0.0 if fits(shares(0.0)) else least_fitting_factor(lambda factor: fits(shares(factor)), 0.0, 1.0, steps)
    fitted = scaled(compression, high)
    pruned_units = {u.name for u in found[0] if kept_channels(u, (allocate(fitted) or {}).get(u.name, branch_ratios(fitted)[u.branch])) < u.channels}
    spared: list[str] = []
    for name in (n for n in most_sensitive_first if n in pruned_units and high > 0):
        if fits(shares(high, [*spared, name])):
            spared.append(name)
    params, macs_share = shares(high, spared)
    unit_ratios = {**(allocate(fitted) or {}), **{name: 0.0 for name in spared}}
    return fitted, unit_ratios, facts | {"factor": round(high, 4), "ratios": branch_ratios(fitted), "spared": spared,
                                         "params_after": round(params, 4), "macs_after": round(macs_share, 4)}


def recalibration_inputs(model: nn.Module, pruned: nn.Module, recovery: Recovery) -> tuple[list[tuple[torch.Tensor, ...]], Callable | None]:
    """Batches (and how to run them) for re-estimating pruned's stale BatchNorms on the first train samples.

    When they all sit in the image encoder's trainable suffix, the batches are
    the frozen prefix's outputs, taken from (and left in) the build's prefix
    cache that recovery reads next: the high-resolution blocks run once.
    """

    encoder = getattr(pruned, "image_encoder", None)
    modules = dict(pruned.named_modules())
    suffix = {id(m) for part in (encoder.suffix_modules() if hasattr(encoder, "suffix_modules") else []) for m in part.modules()}
    stale = stale_batchnorms(model, pruned)
    if recovery.prefix_cache is None or not stale or not all(id(modules[name]) in suffix for name in stale):
        return model_batches(recovery.train, RECALIBRATION_SAMPLES, RECALIBRATION_BATCH), None
    image, _ = prefix_outputs(pruned, recovery.train, recovery.settings.batch_size, recovery.prefix_cache)
    return [(rows,) for rows in image[:RECALIBRATION_SAMPLES].split(RECALIBRATION_BATCH)], lambda batch: encoder.suffix(*batch)
