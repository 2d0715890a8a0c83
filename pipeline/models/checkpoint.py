"""Torch artifacts on disk: a directory with model.pt (a state dict) and model.json.

model.json says how to rebuild the architecture: a registry model's config,
or a user's factory reference, and for a pruned or factorized model the
structural steps to replay on it ("structure", see
pipeline.compression.structure). Weights are always loaded with
weights_only=True: a checkpoint can hold tensors, never code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from pipeline.data.encode import InputSpec
from pipeline.errors import InputError
from pipeline.models import build_model
from pipeline.models.fused import FusedConfig
from pipeline.models.user import build_user_model
from pipeline.compression.structure import apply_structure, structure_of
from pipeline.export import example_inputs

WEIGHTS = "model.pt"
DESCRIPTION = "model.json"


def describe_registry_model(config: FusedConfig) -> dict[str, Any]:
    return {"kind": "registry", "config": config.to_json(), "input_spec": config.input_spec().to_json()}


def describe_user_model(reference: str, num_classes: int, spec: InputSpec) -> dict[str, Any]:
    return {"kind": "factory", "factory": reference, "num_classes": num_classes, "input_spec": spec.to_json()}


def input_spec_of(description: Mapping[str, Any]) -> InputSpec:
    return InputSpec.from_json(description["input_spec"])


def build_architecture(description: Mapping[str, Any], pretrained: bool) -> nn.Module:
    if description["kind"] == "registry":
        model = build_model(FusedConfig.from_json(description["config"]), pretrained=pretrained)
    else:
        model = build_user_model(description["factory"], description["num_classes"])
    return _with_structure(model, description)


def _with_structure(model: nn.Module, description: Mapping[str, Any]) -> nn.Module:
    """Replay the recorded pruning/factorization so the architecture matches the saved weights."""
    steps = description.get("structure") or []
    if not steps:
        return model

    return apply_structure(model, steps, example_inputs(input_spec_of(description)))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a file, with a clear error for anything that is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: weights file not found")
    except Exception as error:  # any failure to parse an untrusted file means the same: not a checkpoint
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({first_line})")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: expected a state dict (parameter name -> tensor), got {type(state).__name__}")
    return state


def load_weights_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: Path, classes: Sequence[str] | None = None) -> None:
    """Load a state dict that must fit the model key for key and shape for shape.

    classes: the data set's class names; a head trained for another number of
    classes is then reported as a label set that differs from the weights'.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise InputError(f"{source}: weights do not match the model ({len(missing)} missing, {len(unexpected)} unexpected keys; {detail})")
    for key, tensor in state.items():
        want = tuple(expected[key].shape)
        if tensor.shape != expected[key].shape:
            if classes is not None and want and want[0] == len(classes) and tensor.ndim == len(want) and tensor.shape[1:] == want[1:]:
                raise InputError(f"{source}: '{key}' has {tensor.shape[0]} outputs but the data set has {len(classes)} classes "
                                 f"({', '.join(classes[:6])}{', ...' if len(classes) > 6 else ''}): the weights were trained "
                                 "with another label set; train on this data instead (leave out --weights) or give the labels they were trained with")
            raise InputError(f"{source}: '{key}' has shape {tuple(tensor.shape)}, the model expects {want}")
    model.load_state_dict(state)


def check_finite_weights(state: Mapping[str, torch.Tensor], source: Path) -> None:
    """InputError naming the first tensor of a user's checkpoint that holds NaN or infinity."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise InputError(f"{source}: '{key}' holds {bad} NaN or infinite value(s) of {tensor.numel()}: not usable weights")


def save_torch_artifact(directory: Path, model: nn.Module, description: Mapping[str, Any]) -> None:
    """Weights and description; a compressed model's structural steps go into the description."""

    steps = structure_of(model)  # the model's own record wins over any copied from another artifact
    description = {k: v for k, v in description.items() if k != "structure"} | ({"structure": steps} if steps else {})
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, directory / WEIGHTS)
    (directory / DESCRIPTION).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")


def read_description(directory: Path) -> dict[str, Any]:
    return json.loads((directory / DESCRIPTION).read_text())


def load_torch_artifact(directory: Path) -> nn.Module:
    description = read_description(directory)
    model = build_architecture(description, pretrained=False)
    load_weights_into(model, read_state_dict(directory / WEIGHTS), directory / WEIGHTS)
    return model.eval()
