"""TrtRunner: runs a TensorRT plan, predict(inputs) -> logits, like every runner.

Through Polygraphy: the plan is loaded with EngineFromBytes (host code allowed,
so version-compatible plans load whatever their sidecar says) and run by
Polygraphy's TrtRunner, whose device buffers, stream and output allocator use
Polygraphy's own CUDA wrapper (libcudart through ctypes): no torch is needed on
the device (defect 12: a Jetson does not get a CUDA torch from `pip install`).

Ours, on top: batches larger than the engine's optimization profile allows are
split, and a chunk smaller than the profile's minimum (a static DLA batch) is
padded and the padding dropped again; inputs are cast to the types the engine
declares (an 8.x engine takes INT32 token ids where the ONNX says INT64).
`tensorrt` and Polygraphy are imported only here, when a runner is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from pipeline.errors import EngineRequired, PipelineError
from pipeline.trt.engine import TensorRTLog, load_engine, quiet_polygraphy, read_engine_metadata

Inputs = Mapping[str, np.ndarray]


def trt_runner_status() -> tuple[bool, str]:
    """(True, "") when a plan can run here: TensorRT, Polygraphy and the CUDA runtime library."""
    try:
        import tensorrt as trt
    except ImportError as error:
        return False, f"the 'tensorrt' Python module is not installed ({error})"
    if not hasattr(trt, "Runtime"):
        return False, "the 'tensorrt' module found is not TensorRT's runtime (only type stubs are installed)"
    try:
        from polygraphy import cuda
        from polygraphy.exception import PolygraphyException
    except ImportError as error:
        return False, f"Polygraphy is not installed ({error}): pip install polygraphy"
    try:
        with quiet_polygraphy():
            cuda.wrapper()
    except (OSError, PolygraphyException) as error:
        return False, (f"the CUDA runtime library (libcudart) cannot be loaded ({error}); on Jetson it comes with "
                       "JetPack, or use `verify --runtime ort`")
    return True, ""


class TrtRunner:
    """Runs a plan file built by pipeline.trt.engine (or trtexec) on CUDA device 0."""

    def __init__(self, plan_path: Path, name: str = "tensorrt", output_name: str | None = None):
        ok, reason = trt_runner_status()
        if not ok:
            raise EngineRequired(f"cannot run a TensorRT plan here: {reason}")
        import tensorrt as trt
        from polygraphy.backend.trt import TrtRunner as PolygraphyTrtRunner
        from polygraphy.datatype import DataType

        self.name = name
        self.plan_path = Path(plan_path)
        trt_log = TensorRTLog.of(trt)
        with trt_log.capture() as captured, quiet_polygraphy():
            try:
                engine = load_engine(self.plan_path.read_bytes(), captured,
                                     f"{self.plan_path}: TensorRT {trt.__version__} cannot load this plan")
            except PipelineError as error:
                raise PipelineError(f"{error}\n(built by another TensorRT version or for another GPU?) "
                                    "rebuild it with `python -m pipeline engine`") from None
            self._runner = PolygraphyTrtRunner(engine, name=name)
            self._runner.activate()
            metadata = self._runner.get_input_metadata(use_numpy_dtypes=False)
        self._engine = engine
        self._dtypes = {key: DataType.to_dtype(DataType.from_dtype(meta.dtype), "numpy") for key, meta in metadata.items()}
        self._limits = [_batch_limits(engine, key) for key in self._dtypes]
        outputs = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)
                   if engine.get_tensor_mode(engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT]
        if not outputs:
            self.close()
            raise PipelineError(f"{self.plan_path}: the engine has no outputs")
        self._output = output_name or ("logits" if "logits" in outputs else outputs[0])
        self.metadata = read_engine_metadata(self.plan_path)

    @property
    def input_names(self) -> list[str]:
        return list(self._dtypes)

    def _batch_range(self) -> tuple[int, int]:
        """(smallest, largest) batch one run accepts: the profile's range, or the static batch."""
        lows = [low for low, _ in self._limits if low]
        highs = [high for _, high in self._limits if high]
        return (max(lows) if lows else 1), (min(highs) if highs else 1 << 30)

    def predict(self, inputs: Inputs) -> np.ndarray:
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise PipelineError(f"{self.plan_path}: inputs {missing} missing (have {sorted(inputs)})")
        total = len(next(iter(inputs[name] for name in self.input_names)))
        low, high = self._batch_range()
        outputs = [self._run_chunk(chunk, low) for chunk in _chunks(inputs, self.input_names, total, high)]
        return np.concatenate(outputs, axis=0).astype(np.float32, copy=False)

    def _run_chunk(self, chunk: dict[str, np.ndarray], min_batch: int) -> np.ndarray:
        real = len(next(iter(chunk.values())))
        if real < min_batch:  # static-batch (DLA) engines, or a profile whose min is above 1
            chunk = {name: _pad_rows(array, min_batch) for name, array in chunk.items()}
        feed = {name: np.ascontiguousarray(chunk[name], dtype=self._dtypes[name]) for name in self.input_names}
        with quiet_polygraphy():
            results = self._runner.infer(feed)
        # Polygraphy reuses its output buffers between calls: copy.
        return np.array(results[self._output][:real], dtype=np.float32, copy=True)

    def close(self) -> None:
        """Free the device buffers and the stream (Polygraphy's deactivate)."""
        runner = getattr(self, "_runner", None)
        if runner is not None and runner.is_active:
            with quiet_polygraphy():
                runner.deactivate()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may be gone already
            pass


def _batch_limits(engine: Any, name: str) -> tuple[int | None, int | None]:
    """(min, max) batch of one input: its profile's range when the batch axis is dynamic, else its static batch.

    Our own TensorRT calls: Polygraphy's TrtRunner runs one batch as given and does not split or pad."""
    shape = tuple(int(d) for d in engine.get_tensor_shape(name))
    if not shape:
        return None, None
    if shape[0] >= 0:
        return shape[0], shape[0]
    low, _opt, high = engine.get_tensor_profile_shape(name, 0)
    return int(tuple(low)[0]), int(tuple(high)[0])


def _chunks(inputs: Inputs, names: list[str], total: int, limit: int) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, total, limit):
        yield {name: np.asarray(inputs[name])[start:start + limit] for name in names}


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """array with its last row repeated up to rows (static-batch engines need full batches)."""
    missing = rows - len(array)
    return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)], axis=0)
