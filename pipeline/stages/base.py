"""The contract between the conductor and a stage: a declared pass (Olive's pass, done small).

A stage module declares its pass from the build's context and the artifacts
made so far: a name, a frozen config dataclass (everything that changes its
output; the conductor hashes it into the cache key as it is), the sha256 of
its input, the function that makes its artifact in a work directory, how its
artifact is measured, which of the target's gates judges it, and, when it does
not apply to this model, why. A stage knows nothing of caching, gates or
reports: the conductor (pipeline/build.py) does those for every pass alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from pipeline.artifacts import Artifact
from pipeline.data.base import Dataset
from pipeline.data.calibration import CalibrationSet
from pipeline.data.encode import Encoded, InputSpec
from pipeline.data.splits import Splits
from pipeline.targets import Compression, Target
from pipeline.training import PrefixCache, TrainSettings


@dataclass(frozen=True)
class Measure:
    """The runner the conductor measures an artifact with."""

    runner: Literal["torch", "onnxruntime"]
    # torch: split the loaded model where the compression stages' recoveries did, so it reuses their prefix outputs
    reach: Compression | None = None
    # onnxruntime: the session config entries an artifact's meta names ("ort_session_config": the INT8 form's arithmetic)
    # are always applied, so the runner computes what the deploy runtime computes


@dataclass(frozen=True)
class Pass:
    name: str
    config: Any  # a frozen dataclass: everything that changes the artifact
    input_sha: str  # what it consumes: the previous artifact, the data set or the user's weights
    run: Callable[[Path], Artifact]  # work directory -> artifact
    measure: Measure
    code: str  # the module whose source (and the pipeline modules it imports) is fingerprinted into the key
    gate: str | None = None  # the target's gate that judges the artifact against the source; None: measured, not gated
    skip: str | None = None  # why the pass does not apply to this model (then it is not run)


Logits = Callable[[Artifact, str, Measure], np.ndarray]  # artifact, split, how -> logits (the conductor's cached measurement)


@dataclass(frozen=True)
class Context:
    """What a build offers its passes: the target, the user's choices, the data and the conductor's measurement."""

    target: Target
    model: str
    fusion: str | None
    weights: Path | None
    train: TrainSettings
    simplifier: str
    dataset: Dataset
    splits: Splits
    spec: InputSpec
    calibration: CalibrationSet
    prefix_cache: PrefixCache
    logits: Logits
    probe_samples: int = 64  # the first calib samples sensitivity is measured on (never eval)
    onnx: Path | None = None  # the user's FP32 ONNX file as the source model (--onnx): the torch stages do not apply

    def probe(self, samples: int | None = None) -> Encoded:
        """The first `samples` calib samples (None: probe_samples)."""
        calib = self.splits.get("calib")
        return calib.subset(range(min(self.probe_samples if samples is None else samples, len(calib))))


def onnx_source(ctx: Context) -> Path | None:
    """The build's --onnx file, or None. Read with getattr: a context put together by hand (a test's namespace) may not name it."""
    return getattr(ctx, "onnx", None)
