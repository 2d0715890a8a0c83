"""Seeded supervised training (and distillation) of a fused model.

Pretrained encoders are frozen up to their split point, so their prefix
outputs are computed once and the epochs only run the trainable suffix: that
is what makes fine-tuning EfficientNet-Lite0 + MiniLM tails fit in a CPU
budget. A model without prefix/suffix (a user's own) is trained end to end.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.data.encode import Encoded


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3  # fusion and classifier
    encoder_lr: float = 1e-4  # fine-tuned encoder tails
    weight_decay: float = 1e-2
    label_smoothing: float = 0.1
    seed: int = 0
    distill_temperature: float = 4.0
    distill_weight: float = 0.7  # share of the KL term when a teacher's logits are given


@dataclass(frozen=True)
class TrainReport:
    epochs_run: int
    best_epoch: int
    best_val_accuracy: float
    history: tuple[tuple[float, float], ...]  # (train loss, val accuracy) per epoch
    initial_val_accuracy: float = 0.0  # before the first epoch


def _has_split(model: nn.Module) -> bool:
    return all(hasattr(model, name) for name in ("image_encoder", "text_encoder", "head")) and all(
        hasattr(getattr(model, part), attr) for part in ("image_encoder", "text_encoder") for attr in ("prefix", "suffix", "suffix_modules")
    )


def _frozen_prefix_digest(encoder: nn.Module) -> str:
    """sha256 of everything an encoder's prefix() computes with: its state outside the trainable suffix."""
    trained = {id(t) for module in encoder.suffix_modules() for t in module.state_dict(keep_vars=True).values()}
    digest = hashlib.sha256(f"{type(encoder).__name__}|{getattr(encoder, 'split_at', None)}".encode())
    for name, tensor in encoder.state_dict(keep_vars=True).items():
        if id(tensor) not in trained:
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


class PrefixCache:
    """Frozen-prefix outputs kept across the trainings of one build.

    The prune and factorize stages both recover a model whose frozen prefix
    (EfficientNet's stem and early blocks) neither of them touches, on the same
    train and calib splits: computing those outputs once saves each later
    recovery a quarter of its time. Entries are keyed by the prefix weights'
    digest, the data (the same Encoded object, held by the entry) and the batch
    size, so a changed prefix is recomputed and a reused one is bitwise the same.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str, int, int], tuple[Encoded, Any]] = {}
        self.hits = 0

    def get(self, model: nn.Module, data: Encoded, batch_size: int, compute: Callable[[], Any]) -> Any:
        key = (_frozen_prefix_digest(model.image_encoder), _frozen_prefix_digest(model.text_encoder), id(data), batch_size)
        if key in self._entries:
            self.hits += 1
            return self._entries[key][1]
        value = compute()
        self._entries[key] = (data, value)  # holding data keeps id(data) from being reused
        return value


def prefix_outputs(model: nn.Module, data: Encoded, batch_size: int, cache: PrefixCache | None = None,
                   desc: str = "encoding") -> tuple[torch.Tensor, torch.Tensor]:
    """The image and text encoders' frozen-prefix outputs for every sample of data, in order (from cache when it has them)."""
    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        images, texts = [], []
        with torch.inference_mode():
            for batch in tqdm(list(data.batches(batch_size)), desc=desc, unit="batch", leave=False, disable=None):
                images.append(model.image_encoder.prefix(torch.from_numpy(batch["image"])))
                texts.append(model.text_encoder.prefix(torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])))
        return torch.cat(images), torch.cat(texts)

    return cache.get(model, data, batch_size, compute) if cache is not None else compute()


class _Features:
    """Inputs as the trainable part of the model sees them (prefix outputs when the model splits)."""

    def __init__(self, model: nn.Module, data: Encoded, batch_size: int, desc: str, cache: PrefixCache | None = None):
        self.split = _has_split(model)
        self.labels = torch.from_numpy(data.labels)
        self.mask = torch.from_numpy(data.inputs["attention_mask"])
        if not self.split:
            self.tensors = {k: torch.from_numpy(v) for k, v in data.inputs.items()}
            return
        self.image, self.text = prefix_outputs(model, data, batch_size, cache, desc)

    def __len__(self) -> int:
        return len(self.labels)

    def logits(self, model: nn.Module, index: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return model(**{k: v[index] for k, v in self.tensors.items()})
        image = model.image_encoder.suffix(self.image[index])
        text = model.text_encoder.suffix(self.text[index], self.mask[index])
        return model.head(image, text)


def _trainable_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(encoder-tail parameters, head parameters); everything else is frozen."""
    if not _has_split(model):
        return [], [p for p in model.parameters()]
    tail_ids: set[int] = set()
    tail: list[nn.Parameter] = []
    for encoder in (model.image_encoder, model.text_encoder):
        for module in encoder.suffix_modules():
            for p in module.parameters():
                if id(p) not in tail_ids:
                    tail_ids.add(id(p))
                    tail.append(p)
    encoder_ids = {id(p) for e in (model.image_encoder, model.text_encoder) for p in e.parameters()}
    head = [p for p in model.parameters() if id(p) not in encoder_ids]
    return tail, head


def _set_train_mode(model: nn.Module) -> None:
    model.train()
    for encoder_name in ("image_encoder", "text_encoder"):
        encoder = getattr(model, encoder_name, None)
        if encoder is not None and getattr(encoder, "freeze_norm_stats", False):
            for module in encoder.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()


def _batches(n: int, size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, size):
        yield order[start:start + size]


def _logits_in_order(model: nn.Module, features: _Features, batch_size: int) -> torch.Tensor:
    model.eval()
    with torch.inference_mode():
        return torch.cat([features.logits(model, torch.arange(start, min(start + batch_size, len(features))))
                          for start in range(0, len(features), batch_size)])


def evaluate_accuracy(model: nn.Module, features: _Features, batch_size: int) -> float:
    logits = _logits_in_order(model, features, batch_size)
    return int((logits.argmax(1) == features.labels).sum()) / max(len(features), 1)


def predict_logits(model: nn.Module, data: Encoded, batch_size: int, cache: PrefixCache | None = None,
                   desc: str = "predicting") -> np.ndarray:
    """The model's logits on every sample of data, in order, as float32.

    A model with a frozen prefix runs its suffix on the prefix outputs, from
    cache when a training or an earlier stage of the same build computed them
    for this data and batch size: the model's own forward, split in two, without
    running the early high-resolution blocks again for every stage and split.
    """
    return _logits_in_order(model, _Features(model, data, batch_size, desc, cache), batch_size).float().numpy()


def _loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None, settings: TrainSettings) -> torch.Tensor:
    ce = F.cross_entropy(logits, labels, label_smoothing=settings.label_smoothing)
    if teacher is None:
        return ce
    t = settings.distill_temperature
    kl = F.kl_div(F.log_softmax(logits / t, dim=1), F.softmax(teacher / t, dim=1), reduction="batchmean") * t * t
    return settings.distill_weight * kl + (1 - settings.distill_weight) * ce


def train(
    model: nn.Module,
    train_data: Encoded,
    val_data: Encoded,
    settings: TrainSettings,
    teacher_logits: np.ndarray | None = None,
    stop_when: Callable[[float], bool] | None = None,
    desc: str = "train",
    prefix_cache: PrefixCache | None = None,
) -> tuple[nn.Module, TrainReport]:
    """Train model in place; return the best checkpoint (by validation accuracy) and a report.

    teacher_logits (aligned with train_data) switch the loss to distillation;
    stop_when(val_accuracy) ends training early once it returns True (before
    the first epoch too: a model already good enough is not trained);
    prefix_cache reuses frozen-prefix outputs an earlier training of the same build computed.
    """
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    train_features = _Features(model, train_data, settings.batch_size, f"{desc}: encoding train", prefix_cache)
    val_features = _Features(model, val_data, settings.batch_size, f"{desc}: encoding val", prefix_cache)
    tail, head = _trainable_parameters(model)
    for p in tail + head:
        p.requires_grad_(True)
    groups = [{"params": head, "lr": settings.lr}] + ([{"params": tail, "lr": settings.encoder_lr}] if tail else [])
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    steps = settings.epochs * max(1, -(-len(train_features) // settings.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups], total_steps=max(steps, 1), pct_start=0.15)
    teacher = torch.from_numpy(teacher_logits).float() if teacher_logits is not None else None

    best_state = copy.deepcopy(model.state_dict())
    best_acc, best_epoch, history = evaluate_accuracy(model, val_features, settings.batch_size), 0, []
    initial_acc = best_acc
    already_there = stop_when is not None and stop_when(initial_acc)
    bar = tqdm(range(1, 0 if already_there else settings.epochs + 1), desc=desc, unit="epoch", disable=None)
    for epoch in bar:
        _set_train_mode(model)
        losses = []
        for index in _batches(len(train_features), settings.batch_size, generator):
            loss = _loss(train_features.logits(model, index), train_features.labels[index], teacher[index] if teacher is not None else None, settings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        val_acc = evaluate_accuracy(model, val_features, settings.batch_size)
        history.append((float(np.mean(losses)), val_acc))
        bar.set_postfix(loss=f"{history[-1][0]:.3f}", val_acc=f"{val_acc:.3f}")
        if val_acc > best_acc:
            best_acc, best_epoch, best_state = val_acc, epoch, copy.deepcopy(model.state_dict())
        if stop_when is not None and stop_when(val_acc):
            break
    model.load_state_dict(best_state)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model, TrainReport(len(history), best_epoch, best_acc, tuple(history), initial_acc)
