"""Recovery by distillation: after a structural stage the student learns the reference's logits.

The loss is pipeline.training's: temperature-scaled KL to the teacher's
logits plus label cross-entropy, seeded, with a progress bar. The budget is
an epoch count from the target; training stops early once the validation
(calib) accuracy reaches the level the gate needs, and keeps the best
validation checkpoint either way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from pipeline.data.encode import Encoded
from pipeline.training import PrefixCache, TrainSettings, train


@dataclass(frozen=True)
class Recovery:
    train: Encoded
    val: Encoded
    teacher_logits: np.ndarray  # the reference's logits on `train`, row for row
    target_accuracy: float  # stop once validation accuracy reaches this
    settings: TrainSettings  # settings.epochs is the budget
    prefix_cache: PrefixCache | None = None  # the build's, shared by its recoveries (outputs unchanged, time saved)


def recover(model: nn.Module, recovery: Recovery, desc: str) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune model (in place) against the teacher; return it and what happened."""
    start = time.perf_counter()
    model, report = train(model, recovery.train, recovery.val, recovery.settings, teacher_logits=recovery.teacher_logits,
                          stop_when=lambda accuracy: accuracy >= recovery.target_accuracy, desc=desc, prefix_cache=recovery.prefix_cache)
    return model, {
        "val_accuracy_before": report.initial_val_accuracy, "val_accuracy": report.best_val_accuracy,
        "target_accuracy": round(recovery.target_accuracy, 6), "epochs_budget": recovery.settings.epochs,
        "epochs_run": report.epochs_run, "best_epoch": report.best_epoch,
        "history": [list(h) for h in report.history], "wall_s": round(time.perf_counter() - start, 2),
    }
