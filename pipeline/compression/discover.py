"""Prunable units of any model: Torch-Pruning's dependency graph, traced with the model's own example inputs.

The built-in fused models name their units (pipeline.compression.units); a
user's model is read instead:

- every Conv, Linear, Embedding and recurrent layer roots a group of coupled
  channels (the graph adds the BatchNorms, depthwise convs, LayerNorms,
  residual adds, attention modules and the consumers' inputs);
- a group's branch is decided by which inputs reach the layers whose outputs
  it removes: the image only (image), the text only (text), both (fusion: a
  width the branches share, such as the two projections of a gated product
  or cross-attention's one embed_dim). Reach is measured, not guessed: the
  modules whose outputs move when only the image (or only the text) of the
  example batch changes;
- the layer that produces the logits is found (the last module whose output
  is the model's output) and never pruned; modules the user pins
  (compression.keep) and everything inside them stay whole too;
- a group that touches nn.MultiheadAttention is pruned in whole heads
  (head_dim is kept, num_heads shrinks; see set_num_heads);
- a group the graph cannot handle is left whole, with the reason: it would
  prune a pinned or unprunable layer's outputs, Torch-Pruning fails to trace it, or the model no longer
  runs with it pruned (checked by pruning every candidate group of a copy and
  running it). The rest is still pruned.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from pipeline.compression.pruners import RECURRENT_TYPES, hidden_size_reason
from pipeline.compression.structure import dependency_graph, unit_group
from pipeline.compression.units import Unit, kept_channels
from pipeline.errors import InputError

ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Embedding, *RECURRENT_TYPES)


@dataclass(frozen=True)
class LeftWhole:
    module: str  # the group's root
    reason: str


@dataclass(frozen=True)
class Discovery:
    units: tuple[Unit, ...]
    left_whole: tuple[LeftWhole, ...]
    output_layer: str

    def to_json(self) -> dict:
        return {"output_layer": self.output_layer, "units": [u.name for u in self.units],
                "left_whole": [{"module": w.module, "reason": w.reason} for w in self.left_whole]}


# ---------------------------------------------------------------- what reaches what


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        # nn.TransformerEncoder's inference fast path hands padded batches between layers as nested tensors
        return [value.to_padded_tensor(0.0) if value.is_nested else value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _module_outputs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[dict[str, list[torch.Tensor]], list[str], torch.Tensor]:
    """Every leaf-or-not module's outputs on one run (a module called twice keeps both), the call order, and the model's output."""
    outputs: dict[str, list[torch.Tensor]] = {}
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_module, _inputs, output, name=name):
            outputs.setdefault(name, []).extend(t.detach().clone() for t in _tensors(output))
            order.append(name)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            result = model.eval()(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, order, result


def _moved(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    if len(a) != len(b):
        return True
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return True
        if x.is_floating_point() and not torch.allclose(x, y, rtol=1e-5, atol=1e-6 * (1.0 + float(x.abs().max()) if x.numel() else 1.0)):
            return True
        if not x.is_floating_point() and not torch.equal(x, y):
            return True
    return False


def _branch_of_input(tensor: torch.Tensor) -> str:
    # the pipeline's image is the one float input; token ids and the mask are integers
    return "image" if tensor.is_floating_point() else "text"


def _other_tokens(tensor: torch.Tensor) -> torch.Tensor:
    """Another sample's tokens (and mask): a permutation of one sample's own tokens would not do, since
    attention with no position signal and a pooled sum do not see the order."""
    if tensor.shape[0] > 1:
        return torch.roll(tensor, 1, dims=0)
    return (tensor + 1) % (int(tensor.max()) + 2)


def _perturbed(inputs: Sequence[torch.Tensor], branch: str) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    changed = []
    for tensor in inputs:
        if _branch_of_input(tensor) == branch:
            tensor = tensor + torch.randn(tensor.shape, generator=generator) if branch == "image" else _other_tokens(tensor)
        changed.append(tensor)
    return tuple(changed)


def input_reach(model: nn.Module, inputs: Sequence[torch.Tensor], base: dict[str, list[torch.Tensor]] | None = None) -> dict[str, frozenset[str]]:
    """{module: the branches ('image', 'text') whose input reaches it}; base: the modules' outputs on inputs, if already run."""
    base = base if base is not None else _module_outputs(model, inputs)[0]
    reach = {name: set() for name in base}
    for branch in sorted({_branch_of_input(t) for t in inputs}):
        moved, _, _ = _module_outputs(model, _perturbed(inputs, branch))
        for name, outputs in base.items():
            if _moved(outputs, moved.get(name, [])):
                reach[name].add(branch)
    return {name: frozenset(r) for name, r in reach.items()}


def called_modules(model: nn.Module, inputs: Sequence[torch.Tensor]) -> set[str]:
    """The modules one forward pass calls (a layer only indexed through .weight is not among them)."""
    return set(_module_outputs(model, inputs)[1])


def module_branches(model: nn.Module, inputs: Sequence[torch.Tensor]) -> dict[str, str]:
    """{module: 'image', 'text' or 'fusion'} by which inputs reach it (modules no input reaches are left out)."""
    return {name: branch for name, reach in input_reach(model, inputs).items() if (branch := branch_of_reach(reach)) is not None}


def output_layer(model: nn.Module, order: Sequence[str], outputs: dict[str, list[torch.Tensor]] | None, result: torch.Tensor) -> str:
    """The last parameterized module called whose output is the logits (the classifier: never pruned)."""
    modules = dict(model.named_modules())
    for name in reversed(order):
        module = modules[name]
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if outputs is None or any(t.shape == result.shape and torch.allclose(t, result, atol=1e-6) for t in outputs.get(name, [])):
            return name
        break
    # the logits come out of an op after the last layer (a scale, a bias add): that last layer is the classifier
    for name in reversed(order):
        if any(True for _ in modules[name].parameters(recurse=False)):
            return name
    raise InputError("the model has no layer with parameters: nothing to prune")


def branch_of_reach(reach: frozenset[str]) -> str | None:
    if reach == {"image"}:
        return "image"
    if reach == {"text"}:
        return "text"
    if reach == {"image", "text"}:
        return "fusion"
    return None  # reached by no input: dead code or a constant


# ---------------------------------------------------------------- groups


def _inside(name: str, pinned: Iterable[str]) -> str | None:
    return next((p for p in pinned if name == p or name.startswith(p + ".")), None)


def check_keep(model: nn.Module, keep: Sequence[str]) -> None:
    names = {name for name, _ in model.named_modules() if name}
    unknown = [k for k in keep if k not in names]
    if unknown:
        sample = ", ".join(sorted(n for n in names if "." not in n)[:8])
        raise InputError(f"compression.keep names {', '.join(map(repr, unknown))}, which the model does not have (its top-level modules: {sample})")


def _group_modules(graph, group) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, is output pruning) of the group's layers."""
    names = {m: n for n, m in graph.model.named_modules()}
    found = []
    for dep, _ in group:
        module = dep.target.module
        if isinstance(module, nn.Module) and module in names:
            found.append((names[module], module, graph.is_out_channel_pruning_fn(dep.handler)))
    return found


def _head_step(members: Sequence[tuple[str, nn.Module, bool]]) -> int:
    dims = [m.head_dim for _, m, _ in members if isinstance(m, nn.MultiheadAttention)]
    return math.lcm(*dims) if dims else 1


def _why_whole(members, pinned: Sequence[str], classifier: str) -> str | None:
    for name, module, is_out in members:
        if not is_out:
            continue
        if name == classifier:
            return f"its channels are the outputs of {name}, the layer that produces the logits"
        pin = _inside(name, pinned)
        if pin is not None:
            return f"it would prune the outputs of {name}, pinned by compression.keep ('{pin}')"
        if isinstance(module, RECURRENT_TYPES) and hidden_size_reason(module):
            return f"{name} ({type(module).__name__}) is {hidden_size_reason(module)}"
        if isinstance(module, nn.MultiheadAttention) and (module.kdim != module.embed_dim or module.vdim != module.embed_dim):
            return f"{name} is an nn.MultiheadAttention with kdim/vdim unlike embed_dim, which Torch-Pruning 1.6 cannot prune"
    return None


def group_branch(members, reach: dict[str, frozenset[str]]) -> str | None:
    """The branch of the inputs that reach the layers whose outputs the group removes.

    A width both branches share (a gated product of the two projections,
    cross-attention with one embed_dim for the text queries and the image
    keys) is reached by both: fusion, as the built-in models' coupled
    projections are.
    """
    reached = frozenset().union(*(reach.get(name, frozenset()) for name, _, is_out in members if is_out))
    return branch_of_reach(reached)


def _candidate_groups(model: nn.Module, graph, reach, pinned: Sequence[str], classifier: str):
    """(unit, None) for each prunable group, or (None, LeftWhole) for each group left whole."""
    names = {m: n for n, m in model.named_modules()}
    visited: set[int] = set()
    for module in list(graph.module2node.keys()):
        if not isinstance(module, ROOT_TYPES) or id(module) in visited or module not in names:
            continue
        name = names[module]
        if name == classifier or _inside(name, pinned):
            continue
        if isinstance(module, RECURRENT_TYPES) and hidden_size_reason(module):
            yield None, LeftWhole(name, f"{type(module).__name__} hidden size: {hidden_size_reason(module)}")
            continue
        pruner = graph.get_pruner_of_module(module)
        channels = pruner.get_out_channels(module) if pruner is not None else None
        if not channels:
            continue
        try:
            group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(channels)))
        except Exception as error:  # Torch-Pruning's index mapping fails on some graphs: that group stays whole, the rest goes on
            yield None, LeftWhole(name, f"Torch-Pruning could not trace its channels ({type(error).__name__}: {error})")
            continue
        members = _group_modules(graph, group)
        visited.update(id(m) for _, m, is_out in members if is_out)
        reason = _why_whole(members, pinned, classifier)
        branch = group_branch(members, reach)
        if reason is None and branch is None:
            reason = "no input reaches it on the example batch"
        if reason is not None:
            yield None, LeftWhole(name, reason)
            continue
        step = _head_step(members)
        kind = "heads" if step > 1 else ("hidden" if isinstance(module, RECURRENT_TYPES) else "channels")
        if channels % step:
            yield None, LeftWhole(name, f"{channels} channels are not a whole number of attention heads ({step} wide)")
            continue
        yield Unit(f"{branch}.{name}", branch, kind, name, channels, step, True), None


def _runs_pruned(model: nn.Module, units: Sequence[Unit], inputs: Sequence[torch.Tensor]) -> str | None:
    """None if a copy with every unit pruned to half still runs and gives logits of the same shape; else why not."""
    trial = copy.deepcopy(model).eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = dependency_graph(trial, inputs)
            for unit in units:
                keep = kept_channels(unit, 0.5)
                if keep < unit.channels:
                    unit_group(graph, trial, unit, list(range(unit.channels - keep))).prune()
            with torch.no_grad():
                expected = model(*inputs).shape
                got = trial(*inputs).shape
        return None if got == expected else f"pruned, the model returns shape {tuple(got)} instead of {tuple(expected)}"
    except Exception as error:
        return f"pruned, the model no longer runs ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"


def discover_units(model: nn.Module, inputs: Sequence[torch.Tensor], keep: Sequence[str] = ()) -> Discovery:
    """The prunable units of any model (see the module docstring), each checked by pruning a copy and running it."""
    check_keep(model, keep)
    outputs, order, result = _module_outputs(model, inputs)
    reach = input_reach(model, inputs, outputs)
    classifier = output_layer(model, order, outputs, result)
    graph = dependency_graph(model, inputs)
    units, whole = [], []
    for unit, left in _candidate_groups(model, graph, reach, keep, classifier):
        (units.append(unit) if unit is not None else whole.append(left))
    if units and _runs_pruned(model, units, inputs) is not None:  # find the groups that break it, one at a time
        working = []
        for unit in units:
            reason = _runs_pruned(model, [unit], inputs)
            (working.append(unit) if reason is None else whole.append(LeftWhole(unit.root, reason)))
        units = working
    return Discovery(tuple(units), tuple(whole), classifier)
