"""A user's own model, named `package.module:factory` on the command line.

The factory is imported and called only because the user named it; it must
return an nn.Module that returns [batch, classes] logits. It may take
num_classes as a keyword. Its forward takes some of image, input_ids and
attention_mask, by those names or by its own (see declared_input_spec).
Its module's source files are part of the source stage's key
(factory_source_digests), so an edited model is trained again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import sysconfig
import traceback
from pathlib import Path
from types import ModuleType
from typing import Callable

from torch import nn

from pipeline.data.encode import ROLES, InputSpec
from pipeline.errors import InputError


def is_factory_reference(name: str) -> bool:
    return ":" in name


def factory_module(reference: str) -> ModuleType:
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise InputError(f"--model '{reference}': expected package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise InputError(f"--model '{reference}': cannot import module '{module_name}': {error}")
    except Exception as error:  # the module's own code failed (SyntaxError, a raise at import time): the user's bug, named
        raise InputError(f"--model '{reference}': importing module '{module_name}' failed: {describe_error(error)}")
    return module


def load_factory(reference: str) -> Callable[..., nn.Module]:
    module_name, _, attribute = reference.partition(":")
    module = factory_module(reference)
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


# ---------------------------------------------------------------- the model's inputs


def declared_input_spec(model: nn.Module, reference: str) -> InputSpec:
    """The model's input_spec (an InputSpec or a dict of its fields, or a method returning one; none: the defaults), fitted to its forward.

    Where the spec does not say which inputs the model takes, its forward's
    signature does: every argument that is a role (image, input_ids,
    attention_mask) or a name the spec gives one, in the forward's order.
    """
    try:
        return fit_to_forward(_spec_as_declared(model, reference), model, reference)
    except InputError as error:
        message = str(error)
        raise InputError(message if message.startswith("--model") else f"--model '{reference}': {message}")


def _spec_as_declared(model: nn.Module, reference: str) -> InputSpec:
    declared = getattr(model, "input_spec", None)
    if callable(declared):
        try:
            declared = declared()
        except Exception as error:  # the user's code: say where it failed
            raise InputError(f"--model '{reference}': the model's input_spec() raised {describe_error(error)}")
    if declared is None:
        return InputSpec()
    if isinstance(declared, InputSpec):
        return declared
    if isinstance(declared, dict):
        try:
            return InputSpec(**declared)
        except TypeError as error:  # an unknown key
            raise InputError(f"input_spec {declared}: {error}; its fields are {', '.join(f.name for f in dataclasses.fields(InputSpec))}")
    raise InputError(f"the model's input_spec must be a pipeline.data.encode.InputSpec or a dict, got {type(declared).__name__}")


def fit_to_forward(spec: InputSpec, model: nn.Module, reference: str) -> InputSpec:
    """The spec with its inputs in the forward's order (the order export passes them in), checked against the forward."""
    parameters = list(inspect.signature(model.forward).parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        return spec  # forward(*args, **kwargs): the signature cannot say; the spec's inputs (or all three) stand
    role_of = {spec.name_of(role): role for role in ROLES}
    taken = [role_of[p.name] for p in parameters if p.name in role_of]
    required = [p.name for p in parameters if p.name not in role_of and p.default is p.empty]
    if required:
        known = ", ".join(spec.name_of(role) for role in ROLES)
        raise InputError(f"--model '{reference}': forward takes {', '.join(map(repr, required))}, which is none of the inputs ({known}); "
                         f"say which input it is in the model's input_spec, e.g. {{\"names\": {{\"input_ids\": \"{required[0]}\"}}}}")
    if not taken:
        raise InputError(f"--model '{reference}': forward takes none of the inputs ({', '.join(spec.name_of(r) for r in ROLES)})")
    if spec.inputs is not None and set(spec.inputs) != set(taken):
        raise InputError(f"--model '{reference}': input_spec says the model takes {', '.join(spec.input_names)}, but its forward takes "
                         f"{', '.join(spec.name_of(role) for role in taken)}")
    return dataclasses.replace(spec, inputs=tuple(taken))


# ---------------------------------------------------------------- the model's code, in the key


def factory_source_files(reference: str) -> list[tuple[str, Path]]:
    """(name, path) of the source files the factory's module is made of, sorted by name.

    A module inside a package (or a package) brings every .py file of its
    top-level package, because it may import any of them (`from .layers
    import Block`); a module on its own is its file. Names are relative to the
    folder the top-level package or module sits in, so the key does not depend
    on where the user's project lies.
    """
    module = factory_module(reference)
    top = importlib.import_module(module.__name__.partition(".")[0])
    folders = [Path(p) for p in getattr(top, "__path__", [])]
    if not folders:  # a single-file module
        path = Path(module.__file__) if getattr(module, "__file__", None) else None
        return [(path.name, path)] if path is not None and path.is_file() else []
    files = []
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" not in path.parts:
                files.append(((Path(folder.name) / path.relative_to(folder)).as_posix(), path))
    return sorted(files)


def factory_source_digests(reference: str) -> tuple[tuple[str, str], ...]:
    """((name, sha256), ...) of the factory's source files: the source stage's key has them, so an edit rebuilds it."""
    return tuple((name, hashlib.sha256(path.read_bytes()).hexdigest()) for name, path in factory_source_files(reference))
