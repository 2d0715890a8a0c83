"""Recovery by distillation: after a structural stage the student learns to answer like the reference.

The loss and the loop are pipeline.training.distill's: temperature-scaled KL
to the teacher's logits plus label cross-entropy, and a share of mixed
image/text pairs on which only the teacher's answers count, seeded. The
budget is an epoch count from the target; training ends at the budget or at
a plateau of the validation (calib) KL to the teacher, and the checkpoint
closest to the teacher on calib is kept: fidelity, not accuracy, because the
compressed model should answer like the model the user validated, and
because on a few hundred samples KL moves smoothly where accuracy jumps by
whole samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from torch import nn

from pipeline.data.encode import Encoded
from pipeline.training import PrefixCache, TrainSettings, distill


@dataclass(frozen=True)
class Recovery:
    train: Encoded
    val: Encoded
    teacher: nn.Module  # the reference model
    settings: TrainSettings  # settings.epochs is the budget
    patience: int = 3  # epochs without a better validation KL before stopping
    mixed_share: float = 1.0  # mixed image/text pairs per train pair in each batch
    prefix_cache: PrefixCache | None = None  # the build's, shared by its recoveries (outputs unchanged, time saved)
    feature_weight: float = 0.0  # weight of the hidden-state term (pipeline.feature_distillation); 0: logits alone


def _split_like(teacher: nn.Module, student: nn.Module) -> None:
    """Split the teacher where the student splits, so both read the same frozen-prefix outputs from the cache."""
    for part in ("image_encoder", "text_encoder"):
        ours, theirs = getattr(teacher, part, None), getattr(student, part, None)
        if hasattr(ours, "split_at") and hasattr(theirs, "split_at"):
            ours.split_at = theirs.split_at


def recover(model: nn.Module, recovery: Recovery, desc: str) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune model (in place) against the teacher; return it and what happened."""
    start = time.perf_counter()
    _split_like(recovery.teacher, model)
    model, report = distill(model, recovery.teacher, recovery.train, recovery.val, recovery.settings, recovery.patience,
                            recovery.mixed_share, desc=desc, prefix_cache=recovery.prefix_cache, feature_weight=recovery.feature_weight)
    return model, {
        "selected_by": "lowest calib KL to the teacher",
        "val_before": report.initial.to_json(), "val_best": report.best.to_json(),
        "epochs_budget": recovery.settings.epochs, "epochs_run": report.epochs_run, "best_epoch": report.best_epoch,
        "stopped": report.stopped, "patience": recovery.patience, "mixed_share": recovery.mixed_share,
        "seed": recovery.settings.seed, "distill_weight": recovery.settings.distill_weight,
        "temperature": recovery.settings.distill_temperature,
        "feature_weight": recovery.feature_weight, "feature_points": list(report.feature_points),
        "history": [[round(loss, 6), *f.to_json().values()] for loss, f in report.history],
        "history_columns": ["train loss", "calib KL", "calib agreement", "calib accuracy"],
        "wall_s": round(time.perf_counter() - start, 2),
    }
