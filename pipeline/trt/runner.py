"""TrtRunner: runs a TensorRT plan, predict(inputs) -> logits, like every runner.

Device buffers are torch CUDA tensors (no pycuda): each input is copied to the
GPU with the dtype the engine declares, bound with set_tensor_address, and
the plan runs with execute_async_v3 on a torch CUDA stream. Batches larger
than the engine's optimization profile allows are split; a chunk smaller
than the profile's minimum (a static DLA batch) is padded and the padding dropped again.
`tensorrt` and `torch.cuda` are imported only here, when a runner is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from pipeline.errors import EngineRequired, PipelineError
from pipeline.trt.engine import TensorRTLog, read_engine_metadata

Inputs = Mapping[str, np.ndarray]


def trt_runner_status() -> tuple[bool, str]:
    """(True, "") when a plan can run here: TensorRT plus a torch build with CUDA and a GPU."""
    try:
        import tensorrt as trt
    except ImportError as error:
        return False, f"the 'tensorrt' Python module is not installed ({error})"
    if not hasattr(trt, "Runtime"):
        return False, "the 'tensorrt' module found is not TensorRT's runtime (only type stubs are installed)"
    try:
        import torch
    except ImportError as error:
        return False, f"torch is not installed ({error})"
    if not torch.cuda.is_available():
        return False, ("torch cannot use a CUDA GPU here (CPU-only build or no GPU); on Jetson install NVIDIA's "
                       "JetPack PyTorch wheel, or use `verify --runtime ort`")
    return True, ""


@dataclass(frozen=True)
class _Binding:
    name: str
    is_input: bool
    dtype: Any  # torch dtype
    shape: tuple[int, ...]  # -1 for dynamic axes
    min_batch: int | None  # from the optimization profile (or the static shape), inputs only
    max_batch: int | None


def _torch_dtype(trt: Any, torch: Any, data_type: Any) -> Any:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT8: torch.int8,
        trt.DataType.BOOL: torch.bool,
    }
    # INT64, BF16 and UINT8 I/O do not exist in every TensorRT version.
    for trt_name, torch_type in (("INT64", torch.int64), ("BF16", torch.bfloat16), ("UINT8", torch.uint8)):
        if hasattr(trt.DataType, trt_name):
            table[getattr(trt.DataType, trt_name)] = torch_type
    if data_type not in table:
        raise PipelineError(f"engine I/O tensor type {data_type} has no torch equivalent")
    return table[data_type]


class TrtRunner:
    """Runs a plan file built by pipeline.trt.engine (or trtexec) on CUDA device 0."""

    def __init__(self, plan_path: Path, name: str = "tensorrt", output_name: str | None = None):
        ok, reason = trt_runner_status()
        if not ok:
            raise EngineRequired(f"cannot run a TensorRT plan here: {reason}")
        import tensorrt as trt
        import torch

        self.name = name
        self.plan_path = Path(plan_path)
        self._torch = torch
        self._device = torch.device("cuda", 0)
        # The process's one TensorRT logger: TensorRT keeps the first logger it is given
        # (TensorRT#1475), so a private one here would starve later builds' error reports.
        trt_log = TensorRTLog.of(trt)
        runtime = trt.Runtime(trt_log.logger)
        version_compatible = bool(read_engine_metadata(self.plan_path).get("version_compatible"))
        if version_compatible:
            # A version-compatible plan embeds the lean runtime, which is host code: the runtime
            # refuses it unless allowed (as Polygraphy's EngineFromBytes does for such plans).
            runtime.engine_host_code_allowed = True
        with trt_log.capture() as captured:
            engine = runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if engine is None:
            logged = "; ".join(captured.errors[-5:]) or "TensorRT logged no error"
            hint = "" if version_compatible else (
                " If it was built version-compatible (trtexec --versionCompatible), its sidecar "
                f"{self.plan_path.name}.json must say \"version_compatible\": true so host code is allowed.")
            raise PipelineError(f"{self.plan_path}: TensorRT {trt.__version__} cannot load this plan (built by another "
                                "TensorRT version or for another GPU?); rebuild it with `python -m pipeline engine`. "
                                f"TensorRT: {logged}.{hint}")
        self._runtime = runtime  # the engine must not outlive its runtime
        self._engine = engine
        self._context = engine.create_execution_context()
        self._stream = torch.cuda.Stream(device=self._device)
        self._bindings = [self._binding(trt, torch, index) for index in range(engine.num_io_tensors)]
        outputs = [b.name for b in self._bindings if not b.is_input]
        if not outputs:
            raise PipelineError(f"{self.plan_path}: the engine has no outputs")
        self._output = output_name or ("logits" if "logits" in outputs else outputs[0])

    def _binding(self, trt: Any, torch: Any, index: int) -> _Binding:
        engine = self._engine
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        min_batch = max_batch = None
        if is_input and shape and shape[0] < 0:
            low, _opt, high = engine.get_tensor_profile_shape(name, 0)
            min_batch, max_batch = int(tuple(low)[0]), int(tuple(high)[0])
        elif is_input and shape:
            min_batch = max_batch = shape[0]
        dtype = _torch_dtype(trt, torch, engine.get_tensor_dtype(name))
        return _Binding(name, is_input, dtype, shape, min_batch, max_batch)

    @property
    def input_names(self) -> list[str]:
        return [b.name for b in self._bindings if b.is_input]

    def _batch_limits(self) -> tuple[int, int]:
        """(smallest, largest) batch one run accepts: the profile's range, or the static batch."""
        inputs = [b for b in self._bindings if b.is_input]
        lows = [b.min_batch for b in inputs if b.min_batch]
        highs = [b.max_batch for b in inputs if b.max_batch]
        return (max(lows) if lows else 1), (min(highs) if highs else 1 << 30)

    def predict(self, inputs: Inputs) -> np.ndarray:
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise PipelineError(f"{self.plan_path}: inputs {missing} missing (have {sorted(inputs)})")
        total = len(next(iter(inputs[name] for name in self.input_names)))
        low, high = self._batch_limits()
        outputs = [self._run_chunk(chunk, low) for chunk in _chunks(inputs, self.input_names, total, high)]
        return np.concatenate(outputs, axis=0).astype(np.float32, copy=False)

    def _run_chunk(self, chunk: dict[str, np.ndarray], min_batch: int) -> np.ndarray:
        torch = self._torch
        real = len(next(iter(chunk.values())))
        if real < min_batch:  # static-batch (DLA) engines, or a profile whose min is above 1
            chunk = {name: _pad_rows(array, min_batch) for name, array in chunk.items()}
        context = self._context
        keep_alive = []
        with torch.cuda.stream(self._stream):
            for binding in self._bindings:
                if not binding.is_input:
                    continue
                buffer = torch.from_numpy(np.ascontiguousarray(chunk[binding.name])).to(self._device, dtype=binding.dtype)
                keep_alive.append(buffer)  # the engine reads it asynchronously: keep it alive until synchronize()
                context.set_input_shape(binding.name, tuple(buffer.shape))
                context.set_tensor_address(binding.name, buffer.data_ptr())
            results = {}
            for binding in self._bindings:
                if binding.is_input:
                    continue
                shape = tuple(int(d) for d in context.get_tensor_shape(binding.name))
                results[binding.name] = torch.empty(shape, dtype=binding.dtype, device=self._device)
                context.set_tensor_address(binding.name, results[binding.name].data_ptr())
            if not context.execute_async_v3(self._stream.cuda_stream):
                raise PipelineError(f"{self.plan_path}: TensorRT execution failed (execute_async_v3 returned False)")
        self._stream.synchronize()
        return results[self._output][:real].float().cpu().numpy()


def _chunks(inputs: Inputs, names: list[str], total: int, limit: int) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, total, limit):
        yield {name: np.asarray(inputs[name])[start:start + limit] for name in names}


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """array with its last row repeated up to rows (static-batch engines need full batches)."""
    missing = rows - len(array)
    return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)], axis=0)
