"""What the structural stages changed, recorded so a compressed model rebuilds from model.json.

A compressed model carries an ordered list of steps as a plain attribute
(never in the state dict, never pickled):
  {"op": "prune", "history": [[module, is_out_channels, [indices]], ...], "num_heads": {attention: heads}}
  {"op": "factorize", "layers": [{"module": name, "rank": r}, ...]}
  {"op": "keep_layers", "module": "text_encoder.encoder.layer", "kept": [indices]}  (depth pruning)
  {"op": "trim_vocabulary", "tables": [{"module": name, "vocabulary": ids, "kept": [ids]}, ...]}  (pipeline.compression.vocabulary)
save_torch_artifact writes the list into model.json under "structure";
load_torch_artifact builds the reference architecture, replays the steps on
it (Torch-Pruning's load_pruning_history for pruning, thin layer pairs for
factorization, a shorter layer list for depth pruning, a TrimmedEmbedding
per trimmed table), then loads the weights with weights_only=True.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from pipeline.compression.pruners import custom_pruners, traced_as_one_node
from pipeline.compression.trimmed import TrimmedEmbedding

STRUCTURE_ATTR = "compression_structure"
# Parameters used directly (not through a layer) that have one entry per modality,
# not per channel: Torch-Pruning would otherwise guess they follow the channels.
PER_MODALITY_PARAMETERS = ("modality_logits",)


def structure_of(model: nn.Module) -> list[dict[str, Any]]:
    return copy.deepcopy(getattr(model, STRUCTURE_ATTR, []))


def append_step(model: nn.Module, step: Mapping[str, Any]) -> None:
    # object.__setattr__ keeps the list a plain attribute (nn.Module.__setattr__ would too, but says so louder).
    object.__setattr__(model, STRUCTURE_ATTR, [*structure_of(model), dict(step)])


# ---------------------------------------------------------------- pruning


def dependency_graph(model: nn.Module, example_inputs: Sequence[torch.Tensor]):
    import torch_pruning as tp

    with warnings.catch_warnings():
        # Torch-Pruning warns about the attention-fusion query (an nn.Parameter used
        # directly); its default, pruning the last dimension, is the right one.
        warnings.simplefilter("ignore")
        fixed = [p for name, p in model.named_parameters() if name.rpartition(".")[2] in PER_MODALITY_PARAMETERS]
        with traced_as_one_node(model):
            graph = tp.DependencyGraph().build_dependency(model.eval(), example_inputs=tuple(example_inputs), ignored_params=fixed, verbose=False,
                                                          customized_pruners=custom_pruners())
    _map_feature_concats(graph)
    _pass_through_channel_flattens(graph)
    return graph


def _pass_through_channel_flattens(graph) -> None:
    """Make a flatten of [N, C, 1, 1] to [N, C] (global pooling, then nn.Flatten) pass channels through one to one.

    Torch-Pruning 1.6 infers a reshape's output width from the layers after it;
    through a torch.cat that is the concat's whole width, and the pooled image
    features then map onto the text features beside them. The real shapes are
    in the autograd graph it traced.
    """
    from torch_pruning import ops

    for node in graph.module2node.values():
        if node.type != ops.OPTYPE.RESHAPE or node.grad_fn is None or not node.grad_fn.next_functions:
            continue
        source, index = node.grad_fn.next_functions[0]
        if source is None or not node.grad_fn._input_metadata:
            continue
        before, after = tuple(source._input_metadata[index].shape), tuple(node.grad_fn._input_metadata[0].shape)
        if len(before) > 2 and len(after) == 2 and before[:2] == after and all(d == 1 for d in before[2:]):
            node.type = ops.OPTYPE.ELEMENTWISE  # no index mapping is recomputed for it from now on
            for owner in (node, *node.inputs, *node.outputs):
                for dep in owner.dependencies:
                    if node in (dep.source, dep.target):
                        dep.index_mapping[0] = None


def _map_feature_concats(graph) -> None:
    """Give back the channel offsets of concats along the feature axis of 2-D features.

    Torch-Pruning 1.6 turns off the index mapping of every concat downstream
    of a 3-D nn.Parameter (a ViT's class token is concatenated along the
    sequence); a learned position table then makes the fusion's
    torch.cat([text, image], 1) of pooled features couple the two branches'
    widths. A concat of 2-D inputs along dim 1 is a concat of channels.
    """
    from torch_pruning import ops
    from torch_pruning.dependency.index_mapping import update_concat_index_mapping

    for node in graph.module2node.values():
        if node.type != ops.OPTYPE.CONCAT or node.enable_index_mapping:
            continue
        shapes = [f._input_metadata[i].shape for f, i in node.grad_fn.next_functions if f is not None]
        if getattr(node.grad_fn, "_saved_dim", None) in (1, -1) and shapes and all(len(shape) == 2 for shape in shapes):
            node.enable_index_mapping = True
            update_concat_index_mapping(graph, node)


def unit_group(graph, model: nn.Module, unit, indices: list[int]):
    """The Torch-Pruning group that removes `indices` of the unit's root's output channels (and everything coupled to them)."""
    root = model.get_submodule(unit.root)
    return graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, indices)


def json_history(history: Sequence[Sequence[Any]]) -> list[list[Any]]:
    return [[str(name), bool(is_out), [int(i) for i in indices]] for name, is_out, indices in history]


def set_num_heads(model: nn.Module, num_heads: Mapping[str, int]) -> None:
    """Make each pruned attention's forward read its new head count (head_dim is unchanged: whole heads go).

    A built-in SelfAttention (query/key/value layers) or a torch nn.MultiheadAttention.
    """
    for name, heads in num_heads.items():
        attention = model.get_submodule(name)
        attention.num_heads = int(heads)
        width = attention.embed_dim if isinstance(attention, nn.MultiheadAttention) else attention.query.out_features
        attention.head_dim = width // int(heads)


def sync_feature_widths(model: nn.Module) -> None:
    """Refresh the out_features attributes the modules were built with (read by builders and reports, not by forward)."""
    image, text, fusion = (getattr(model, n, None) for n in ("image_encoder", "text_encoder", "fusion"))
    if image is not None and hasattr(image, "head"):
        image.out_features = _out_width(image.head[0])
    elif image is not None and hasattr(image, "features"):
        image.out_features = [m for m in image.features if isinstance(m, nn.Conv2d)][-1].out_channels
    if text is not None and hasattr(text, "embeddings"):
        text.out_features = text.embeddings.LayerNorm.normalized_shape[0]
    if fusion is not None and hasattr(fusion, "image_proj"):
        width = _out_width(fusion.image_proj)
        fusion.out_features = width + _out_width(fusion.text_proj) if type(fusion).__name__.startswith("Concat") else width


def _out_width(module: nn.Module) -> int:
    last = module[-1] if isinstance(module, nn.Sequential) else module
    return last.out_channels if isinstance(last, nn.Conv2d) else last.out_features


def replay_pruning(model: nn.Module, step: Mapping[str, Any], example_inputs: Sequence[torch.Tensor]) -> None:
    graph = dependency_graph(model, example_inputs)
    graph.load_pruning_history([(name, is_out, list(indices)) for name, is_out, indices in step["history"]])
    set_num_heads(model, step.get("num_heads", {}))
    sync_feature_widths(model)


# ---------------------------------------------------------------- factorization


def is_pointwise_conv(module: nn.Module) -> bool:
    """A 1x1 convolution without groups, dilation or padding: a Linear over channels."""
    if not isinstance(module, nn.Conv2d) or module.kernel_size != (1, 1) or module.groups != 1:
        return False
    # EfficientNet's Conv2dStaticSamePadding pads in forward through its own Identity class when k = 1.
    extra_padding = getattr(module, "static_padding", None)
    padding_free = module.padding in ((0, 0), 0) and (extra_padding is None or type(extra_padding).__name__ == "Identity")
    return padding_free and module.padding_mode == "zeros"


def low_rank_pair(layer: nn.Module, rank: int) -> nn.Sequential:
    """Two thinner layers in place of one: in -> rank (no bias) -> out (the original bias).

    Plain Linear/Conv2d pairs, so the graph exports as two MatMul/Gemm or Conv
    nodes that quantize like any other; an Embedding becomes a narrower
    Embedding (a Gather) and a Linear back to the hidden width (ALBERT's
    factorized embedding).
    """
    if isinstance(layer, TrimmedEmbedding):  # the narrow table keeps the id-to-row map
        return nn.Sequential(layer.with_width(rank), nn.Linear(rank, layer.embedding_dim, bias=False))
    if isinstance(layer, nn.Embedding):
        return nn.Sequential(nn.Embedding(layer.num_embeddings, rank, padding_idx=layer.padding_idx), nn.Linear(rank, layer.embedding_dim, bias=False))
    if isinstance(layer, nn.Linear):
        return nn.Sequential(nn.Linear(layer.in_features, rank, bias=False), nn.Linear(rank, layer.out_features, bias=layer.bias is not None))
    if is_pointwise_conv(layer):
        return nn.Sequential(
            nn.Conv2d(layer.in_channels, rank, 1, stride=layer.stride, bias=False),
            nn.Conv2d(rank, layer.out_channels, 1, bias=layer.bias is not None),
        )
    raise TypeError(f"cannot factorize {type(layer).__name__}: only Linear, 1x1 Conv2d and Embedding")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replay_factorization(model: nn.Module, step: Mapping[str, Any]) -> None:
    for layer in step["layers"]:
        replace_module(model, layer["module"], low_rank_pair(model.get_submodule(layer["module"]), int(layer["rank"])))


# ---------------------------------------------------------------- depth


def replay_kept_layers(model: nn.Module, step: Mapping[str, Any]) -> None:
    layers = model.get_submodule(step["module"])
    replace_module(model, step["module"], nn.ModuleList(layers[int(i)] for i in step["kept"]))
    owner = model.get_submodule(step["module"].split(".")[0])
    if hasattr(owner, "split_at"):  # the frozen prefix keeps the kept layers that were in it
        owner.split_at = sum(1 for i in step["kept"] if int(i) < owner.split_at)


# ---------------------------------------------------------------- vocabulary


def replay_trimmed_vocabulary(model: nn.Module, step: Mapping[str, Any]) -> None:
    for table in step["tables"]:
        old = model.get_submodule(table["module"])
        replace_module(model, table["module"], TrimmedEmbedding(table["kept"], int(table["vocabulary"]), old.embedding_dim, old.padding_idx))


# ---------------------------------------------------------------- rebuild


def apply_structure(model: nn.Module, steps: Sequence[Mapping[str, Any]], example_inputs: Sequence[torch.Tensor]) -> nn.Module:
    """Reshape a freshly built reference model into the compressed architecture (weights are loaded after)."""
    for step in steps:
        if step["op"] == "prune":
            replay_pruning(model, step, example_inputs)
        elif step["op"] == "factorize":
            replay_factorization(model, step)
        elif step["op"] == "keep_layers":
            replay_kept_layers(model, step)
        elif step["op"] == "trim_vocabulary":
            replay_trimmed_vocabulary(model, step)
        else:
            raise ValueError(f"unknown structure step '{step['op']}' in model.json")
        append_step(model, step)
    return model
