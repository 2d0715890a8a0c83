"""A user's own model, named `package.module:factory` on the command line.

The factory is imported and called only because the user named it; it must
return an nn.Module whose forward takes (image, input_ids, attention_mask)
and returns [batch, classes] logits. It may take num_classes as a keyword.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

from torch import nn

from pipeline.errors import InputError


def is_factory_reference(name: str) -> bool:
    return ":" in name


def load_factory(reference: str) -> Callable[..., nn.Module]:
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise InputError(f"--model '{reference}': expected package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise InputError(f"--model '{reference}': cannot import module '{module_name}': {error}")
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise InputError(f"--model '{reference}': module '{module_name}' has no callable '{attribute}'")
    return factory


def build_user_model(reference: str, num_classes: int) -> nn.Module:
    factory = load_factory(reference)
    accepts_classes = "num_classes" in inspect.signature(factory).parameters
    model = factory(num_classes=num_classes) if accepts_classes else factory()
    if not isinstance(model, nn.Module):
        raise InputError(f"--model '{reference}': the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model
