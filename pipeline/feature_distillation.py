"""Feature distillation: a compressed student's hidden states matched to its teacher's, block by block.

Logit distillation gives a student nine numbers a sample; on a train split of
a thousand samples that says little about how the teacher computes them, and
a pruned model's answers drift where the teacher's own margin is small. The
hidden states at the end of every trained block (EfficientNet's blocks, whose
outputs keep their width when their expansions are pruned, and MiniLM's
layers, which keep the 384-wide stream when heads and FFN widths go) are
thousands of numbers a sample, and both models compute them from the same
frozen-prefix inputs. Matching them is layer-wise distillation as in CoFi
(Xia et al. 2022) and TinyBERT (Jiao et al. 2020), without their learned
projections: only the points whose shape the student kept are matched, by name.
A model without the built-in models' prefix/suffix split (a user's) is matched
at its own top-level modules, the blocks it was composed of.

Each point's error is normalised by the variance of the teacher's state there,
so a block with large activations does not outweigh one with small ones, and
the token states of padding (a 3-D state whose second axis is the attention
mask's) are left out.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn


# A point whose output holds more numbers a sample than this is not kept: the teacher's states are held for the
# whole train split (the built-in model's largest point, EfficientNet's head at 6 x 6, holds 46,080).
MAX_STATE_ELEMENTS = 65_536


def stream_points(model: nn.Module) -> dict[str, nn.Module]:
    """The modules whose outputs are matched, by qualified name.

    A split model (the built-in ones): every module of its encoders' trainable
    suffixes. Any other model (a user's): its own top-level modules, the
    blocks its author composed it of; the one that gives the logits is left
    out later, by shape.
    """
    encoders = [getattr(model, part, None) for part in ("image_encoder", "text_encoder")]
    if not any(hasattr(encoder, "suffix_modules") for encoder in encoders):
        return dict(model.named_children())
    names = {id(module): name for name, module in model.named_modules()}
    points = {}
    for encoder in encoders:
        for module in (encoder.suffix_modules() if hasattr(encoder, "suffix_modules") else []):
            if id(module) in names:
                points[names[id(module)]] = module
    return points


@contextlib.contextmanager
def recording(points: Mapping[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """The tensor each point returns while the block runs (the latest call's), by name."""
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if isinstance(output, torch.Tensor):
                outputs[name] = output
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in points.items()]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _token_weights(state: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Per-position weights broadcastable to state: the attention mask for token states, None for anything else."""
    if mask is None or state.dim() != 3 or state.shape[1] != mask.shape[1]:
        return None
    return mask.to(state.dtype).unsqueeze(-1)


def _mean_square(difference: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    squared = difference.square()
    if weights is None:
        return squared.mean()
    return (squared * weights).sum() / (weights.sum() * difference.shape[-1]).clamp_min(1)


@dataclass(frozen=True)
class TeacherStates:
    """The teacher's state at every point on every train sample, and the variance each point's error is divided by."""

    states: dict[str, torch.Tensor]  # name -> [samples, ...]
    scale: dict[str, float]

    @staticmethod
    def collect(batches: list[dict[str, torch.Tensor]], mask: torch.Tensor | None) -> "TeacherStates":
        kept = [name for name in batches[0] if batches[0][name][0].numel() <= MAX_STATE_ELEMENTS] if batches else []
        states = {name: torch.cat([batch[name] for batch in batches]) for name in kept}
        scale = {}
        for name, state in states.items():
            weights = _token_weights(state, mask)
            centred = state - (state * weights).sum((0, 1)) / weights.sum((0, 1)) if weights is not None else state - state.mean(0)
            scale[name] = max(float(_mean_square(centred, weights)), 1e-12)
        return TeacherStates(states, scale)

    def matched(self, student_states: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
        """The points the student has with the teacher's shape (a pruned block's width, a dropped layer, are left out)."""
        return tuple(name for name, state in student_states.items()
                     if name in self.states and tuple(state.shape[1:]) == tuple(self.states[name].shape[1:]))

    def loss(self, student_states: Mapping[str, torch.Tensor], index: torch.Tensor, points: tuple[str, ...],
             mask: torch.Tensor | None) -> torch.Tensor:
        """Mean over the points of the student's squared error to the teacher, each divided by the teacher's variance there."""
        terms = []
        for name in points:
            student, teacher = student_states[name], self.states[name][index]
            terms.append(_mean_square(student - teacher, _token_weights(student, mask)) / self.scale[name])
        return torch.stack(terms).mean()
