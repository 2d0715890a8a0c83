"""A user's own model, named `package.module:factory` on the command line.

The factory is imported and called only because the user named it; it must
return an nn.Module whose forward takes (image, input_ids, attention_mask)
and returns [batch, classes] logits. It may take num_classes as a keyword.
"""

from __future__ import annotations

import importlib
import inspect
import sysconfig
import traceback
from pathlib import Path
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
    except Exception as error:  # the module's own code failed (SyntaxError, a raise at import time): the user's bug, named
        raise InputError(f"--model '{reference}': importing module '{module_name}' failed: {describe_error(error)}")
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise InputError(f"--model '{reference}': module '{module_name}' has no callable '{attribute}'")
    return factory


def build_user_model(reference: str, num_classes: int) -> nn.Module:
    factory = load_factory(reference)
    accepts_classes = "num_classes" in inspect.signature(factory).parameters
    try:
        model = factory(num_classes=num_classes) if accepts_classes else factory()
    except Exception as error:  # the factory is the user's code: say where it failed, without a traceback
        raise InputError(f"--model '{reference}': the factory raised {describe_error(error)}")
    if not isinstance(model, nn.Module):
        raise InputError(f"--model '{reference}': the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def describe_error(error: BaseException) -> str:
    """'ValueError: message (at my_models.py:12)': the error, and the innermost frame of its traceback that is the
    user's code (not this package, the standard library or an installed package; else the innermost frame)."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    if isinstance(error, SyntaxError):
        return text  # its message names the file and line already
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return text
    others = tuple({*(sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")),
                    str(Path(__file__).resolve().parent.parent)})
    frame = next((f for f in reversed(frames) if not str(Path(f.filename).resolve()).startswith(others)), frames[-1])
    return f"{text} (at {frame.filename}:{frame.lineno})"
