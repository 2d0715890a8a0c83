"""Quantize stage: FP32 ONNX -> INT8 ONNX with explicit Q/DQ, calibrated on real data.

Built on onnxruntime.quantization: quant_pre_process (shape inference and
graph cleanup), then quantize_static in QDQ format. The "tensorrt" form is
symmetric S8 for activations and weights with per-channel weight scales and
no quantized bias (TensorRT's ONNX parser rejects INT32 bias DQ); ONNX Runtime
runs the same QDQ graph on the CPU, so its parity is measured here.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.artifacts import Artifact
from pipeline.data.encode import Encoded
from pipeline.stages.export import onnx_facts
from pipeline.store import sha256_file
from pipeline.targets import Quantize

CALIBRATION_BATCH = 16


class EncodedReader:
    """onnxruntime.quantization.CalibrationDataReader over encoded samples."""

    def __init__(self, data: Encoded, input_names: list[str], batch_size: int = CALIBRATION_BATCH):
        self._data = data
        self._names = input_names
        self._batch_size = batch_size
        self._iterator: Iterator[dict[str, np.ndarray]] | None = None
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iterator, None)
        return None if batch is None else {name: batch[name] for name in self._names}

    def rewind(self) -> None:
        self._iterator = iter(list(self._data.batches(self._batch_size)))


def quantize_settings(settings: Quantize) -> dict:
    """What changes the INT8 output: part of the stage's cache key."""
    return asdict(settings)


def _calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[name]


def _form_options(settings: Quantize) -> dict:
    from onnxruntime.quantization import QuantType

    extra = {"QuantizeBias": False, "CalibTensorRangeSymmetric": True, "WeightSymmetric": True, "ActivationSymmetric": True}
    if settings.method == "percentile":
        extra["CalibPercentile"] = settings.percentile
    if settings.form == "tensorrt":
        return {"activation_type": QuantType.QInt8, "weight_type": QuantType.QInt8, "per_channel": True, "extra_options": extra}
    # CPU form: U8 activations (asymmetric) / S8 weights, what ONNX Runtime's CPU kernels run fastest.
    extra.update({"ActivationSymmetric": False, "CalibTensorRangeSymmetric": False})
    return {"activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8, "per_channel": True, "extra_options": extra}


def quantize(fp32: Artifact, calibration: Encoded, settings: Quantize, workdir: Path) -> Artifact:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = workdir / "prepared.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        logging.getLogger().setLevel(logging.ERROR)
        quant_pre_process(str(fp32.path), str(prepared), skip_symbolic_shape=True)
    input_names = [i.name for i in ort.InferenceSession(str(prepared), providers=["CPUExecutionProvider"]).get_inputs()]
    output = workdir / "model.int8.onnx"
    quantize_static(
        str(prepared),
        str(output),
        EncodedReader(calibration, input_names),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(settings.op_types),
        calibrate_method=_calibration_method(settings.method),
        **_form_options(settings),
    )
    prepared.unlink()
    meta = {**onnx_facts(output), "form": settings.form, "method": settings.method, "op_types": list(settings.op_types),
            "calibration_samples": len(calibration)}
    return Artifact(kind="onnx", path=output, sha256=sha256_file(output), meta=meta)
