"""Runners: each turns an artifact into predict(inputs) -> logits.

The parity ledger runs every stage's artifact through its runner on the same
eval batches, so a runner is the only thing a stage's output needs to be
measured. Runners are small and composable, in the spirit of Polygraphy's.

ort_session is the one place an ONNX Runtime session is opened (the runners
here, calibration, the fallback's evaluations, every latency figure, the
benchmarks): one set of options, so two figures never differ by how their
session was made.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Protocol

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:
    import torch  # optional on a device that verifies a bundle with ONNX Runtime only

Inputs = Mapping[str, np.ndarray]


class Runner(Protocol):
    name: str

    def predict(self, inputs: Inputs) -> np.ndarray:
        """Logits [batch, classes] as float32 for one batch of named inputs."""
        ...


class TorchRunner:
    """Runs an nn.Module whose forward takes the named inputs as keyword arguments."""

    def __init__(self, model: "torch.nn.Module", device: str = "cpu", name: str = "torch"):
        import torch

        self.name = name
        self._torch = torch
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    def predict(self, inputs: Inputs) -> np.ndarray:
        torch = self._torch
        tensors = {key: torch.from_numpy(np.ascontiguousarray(value)).to(self.device) for key, value in inputs.items()}
        with torch.inference_mode():
            logits = self.model(**tensors)
        return logits.float().cpu().numpy()


def ort_session_options(threads: int = 2, session_config: Mapping[str, str] | None = None,
                        profile_prefix: str | Path | None = None) -> ort.SessionOptions:
    """The project's ONNX Runtime options: `threads` intra-op threads, one inter-op thread, errors-only logging.

    session_config: session config entries, added in sorted key order.
    profile_prefix: turn ONNX Runtime's profiler on, writing its JSON under this file prefix.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    for key, value in sorted((session_config or {}).items()):
        options.add_session_config_entry(key, str(value))
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    return options


def ort_session(model: Path | str | bytes, threads: int = 2, session_config: Mapping[str, str] | None = None,
                providers: Iterable[str] = ("CPUExecutionProvider",),
                profile_prefix: str | Path | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session over an ONNX file (a path) or a serialized model (bytes).

    The one place a session is opened, so that parity, calibration, the fallback's
    evaluations and every latency figure run a model the same way.
    """
    source = model if isinstance(model, bytes) else str(model)
    options = ort_session_options(threads, session_config, profile_prefix)
    return ort.InferenceSession(source, sess_options=options, providers=list(providers))


class OrtRunner:
    """Runs an ONNX file with ONNX Runtime (CPU EP by default)."""

    def __init__(self, path: Path, providers: Iterable[str] = ("CPUExecutionProvider",), threads: int = 2, name: str = "onnxruntime",
                 session_config: Mapping[str, str] | None = None):
        """session_config: ONNX Runtime session config entries, e.g. the quantize stage's
        {"session.disable_quant_qdq": "1"} to run a TensorRT-form QDQ graph with TensorRT's arithmetic."""
        self.name = name
        self.path = Path(path)
        self.session = ort_session(self.path, threads, session_config, providers)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def predict(self, inputs: Inputs) -> np.ndarray:
        feed = {name: np.ascontiguousarray(inputs[name]) for name in self.input_names}
        (logits,) = self.session.run(None, feed)[:1]
        return np.asarray(logits, dtype=np.float32)


def run_batches(runner: Runner, batches: Iterable[Inputs]) -> np.ndarray:
    """Concatenated logits of runner over batches."""
    outputs = [runner.predict(batch) for batch in batches]
    return np.concatenate(outputs, axis=0)
