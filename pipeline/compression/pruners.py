"""Torch-Pruning pruners for the layers its own get wrong: recurrent layers and whole attention heads.

nn.RNN, nn.GRU and nn.LSTM: input width and hidden size, every layer, the gates kept in step.

Torch-Pruning 1.6.1 ships an LSTMPruner that cannot be used: it takes the
hidden indices without the gate offsets for weight_hh's rows and both biases
(an LSTM's rows are four blocks of hidden_size: i, f, g, o), prunes
weight_hh's rows twice and its columns never, and allows num_layers = 1 only;
it has no pruner for nn.GRU or nn.RNN, so a graph with one of them does not
even build (the concat after it has no channel count). This one removes a
hidden unit from every gate block of every layer's weight_ih, weight_hh and
biases, and from the next layer's inputs.

The graph is traced through autograd, and a recurrent layer on the CPU
records every time step's gate arithmetic (chunks, splits, stacks), which
Torch-Pruning 1.6 reads as channel operations and cannot map: while the
graph is built, each recurrent layer (and each nn.MultiheadAttention, whose
inner matmuls it would take for channel-preserving ops) runs as one opaque
autograd node from its inputs and weights to its outputs
(traced_as_one_node), which is all the graph needs to know.

A bidirectional layer's output is [forward hidden, backward hidden]: one
output index is one direction's unit, so a group could only keep the two
directions' widths equal by accident. Its hidden size is left whole
(hidden_size_reason says why); its input width prunes like any other. An
LSTM with proj_size is left whole the same way.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

RECURRENT_TYPES = (nn.RNN, nn.GRU, nn.LSTM)
GATES = {nn.RNN: 1, nn.GRU: 3, nn.LSTM: 4}


def hidden_size_reason(layer: nn.Module) -> str | None:
    """Why this recurrent layer's hidden size cannot be pruned, or None."""
    if getattr(layer, "bidirectional", False):
        return "bidirectional: an output channel is one direction's unit, the two directions' hidden sizes must stay equal"
    if getattr(layer, "proj_size", 0):
        return "an LSTM with proj_size: its output width is the projection's, not the hidden size"
    return None


def _gates(layer: nn.Module) -> int:
    return next(count for kind, count in GATES.items() if isinstance(layer, kind))


def _directions(layer: nn.Module) -> tuple[str, ...]:
    return ("", "_reverse") if layer.bidirectional else ("",)


def _kept(size: int, removed: Sequence[int]) -> torch.Tensor:
    return torch.tensor(sorted(set(range(size)) - {int(i) for i in removed}), dtype=torch.long)


def _take(layer: nn.Module, name: str, index: torch.Tensor, dim: int) -> None:
    parameter = getattr(layer, name)
    # nn.RNNBase.__setattr__ keeps its _flat_weights list (what forward reads) in step with the new Parameter
    setattr(layer, name, nn.Parameter(torch.index_select(parameter.data, dim, index).contiguous(), requires_grad=parameter.requires_grad))


def _torch_pruning_base():
    import torch_pruning as tp

    return tp.pruner.function.BasePruningFunc


def recurrent_pruner():
    """An instance of the pruner, for DependencyGraph.build_dependency(customized_pruners={type: pruner})."""

    class RecurrentPruner(_torch_pruning_base()):
        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            reason = hidden_size_reason(layer)
            if reason is not None:
                raise ValueError(f"cannot prune the hidden size of {type(layer).__name__}: {reason}")
            hidden = layer.hidden_size
            kept = _kept(hidden, idxs)
            rows = torch.cat([kept + gate * hidden for gate in range(_gates(layer))])
            for k in range(layer.num_layers):
                for direction in _directions(layer):
                    _take(layer, f"weight_ih_l{k}{direction}", rows, 0)
                    if k > 0:
                        _take(layer, f"weight_ih_l{k}{direction}", kept, 1)
                    _take(layer, f"weight_hh_l{k}{direction}", rows, 0)
                    _take(layer, f"weight_hh_l{k}{direction}", kept, 1)
                    if layer.bias:
                        _take(layer, f"bias_ih_l{k}{direction}", rows, 0)
                        _take(layer, f"bias_hh_l{k}{direction}", rows, 0)
            layer.hidden_size = len(kept)
            return layer

        def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            kept = _kept(layer.input_size, idxs)
            for direction in _directions(layer):
                _take(layer, f"weight_ih_l0{direction}", kept, 1)
            layer.input_size = len(kept)
            return layer

        def get_out_channels(self, layer: nn.Module) -> int:
            return layer.hidden_size * (2 if layer.bidirectional else 1)

        def get_in_channels(self, layer: nn.Module) -> int:
            return layer.input_size

    return RecurrentPruner()


def whole_heads_pruner():
    """nn.MultiheadAttention losing whole heads: head_dim stays, num_heads shrinks.

    Torch-Pruning 1.6's pruner keeps num_heads and narrows every head
    (head_dim = embed_dim // num_heads), and refuses any width num_heads does
    not divide. The prune stage removes channels a head at a time (its groups
    step by head_dim, see pipeline.compression.discover), so here the heads go.
    """
    import torch_pruning as tp

    class WholeHeadsPruner(tp.pruner.function.MultiheadAttentionPruner):
        def check(self, layer, idxs, to_output):
            if len(idxs) % layer.head_dim:
                raise ValueError(f"{len(idxs)} channels of an nn.MultiheadAttention with head_dim {layer.head_dim}: not whole heads")

        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            head_dim = layer.head_dim
            super().prune_out_channels(layer, list(idxs))
            layer.num_heads = layer.embed_dim // head_dim
            layer.head_dim = head_dim
            return layer

        prune_in_channels = prune_out_channels

    return WholeHeadsPruner()


def custom_pruners() -> dict[type, object]:
    """{layer type: pruner} for DependencyGraph.build_dependency(customized_pruners=...)."""
    pruner = recurrent_pruner()
    return {**{kind: pruner for kind in RECURRENT_TYPES}, nn.MultiheadAttention: whole_heads_pruner()}


class _OneNode(torch.autograd.Function):
    """Outputs computed elsewhere, recorded as one autograd node from the inputs (only ever traced, never differentiated)."""

    @staticmethod
    def forward(ctx, outputs, *inputs):
        return tuple(t.clone() for t in outputs)

    @staticmethod
    def backward(ctx, *grads):  # pragma: no cover - the graph is traced, not differentiated
        raise RuntimeError("a layer traced for pruning as one node is not differentiable")


def _flatten(value) -> tuple[list[torch.Tensor], object]:
    if isinstance(value, torch.Tensor):
        return [value], "tensor"
    if isinstance(value, tuple):
        parts = [_flatten(v) for v in value]
        return [t for tensors, _ in parts for t in tensors], tuple(shape for _, shape in parts)
    return [], value  # None (an attention's weights when not asked for)


def _unflatten(tensors: list[torch.Tensor], shape):
    if shape == "tensor":
        return tensors.pop(0)
    if isinstance(shape, tuple):
        return tuple(_unflatten(tensors, s) for s in shape)
    return shape


ONE_NODE_TYPES = (*RECURRENT_TYPES, nn.MultiheadAttention)


@contextlib.contextmanager
def traced_as_one_node(model: nn.Module) -> Iterator[None]:
    """While inside, every recurrent layer and nn.MultiheadAttention of model runs as one autograd node.

    Torch-Pruning follows autograd from each layer's output back to the layers
    that feed it; inside these layers (a recurrent layer's time steps, the
    attention's projections and scaled dot product) it would find matmuls it
    takes for channel-preserving ops and couple unrelated widths.
    """
    layers = [m for m in model.modules() if isinstance(m, ONE_NODE_TYPES)]
    for layer in layers:
        forward = layer.forward

        def opaque(*args, forward=forward, layer=layer, **kwargs):
            with torch.no_grad():
                outputs, shape = _flatten(forward(*args, **kwargs))
            inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
            weights = [p for p in layer.parameters()]
            return _unflatten(list(_OneNode.apply(tuple(outputs), *inputs, *weights)), shape)

        layer.forward = opaque
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
