"""Activation ranges from real data: minmax, percentile and entropy (KL), seeded and crash-free.

Why not onnxruntime's calibrators: its entropy calibrator crashes on the
default model ("Too many bins for data range", numpy's histogram on a
near-constant tensor), and each method lives in a different class with its own
state. Here one pass collects each tensor's min/max, a second (skipped for
minmax) builds fixed-range histograms, and the method only decides how a range
is read off them. Constant and all-zero tensors get a valid, exact range.

Deterministic: fixed batch order, fixed bins, float64 accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationMethod
from onnxruntime.quantization.calibrate import TensorData, TensorsData

from pipeline.data.encode import Encoded
from pipeline.progress import track
from pipeline.runners import ort_session

Method = Literal["minmax", "entropy", "percentile"]
CALIBRATION_BATCH = 16
HISTOGRAM_BINS = 2048
QUANTIZED_BINS = 128  # INT8 levels on one side of zero: what the KL search compares against
ENTROPY_STRIDE = 8  # candidate thresholds every 8 bins: 256 candidates, same answer to within 0.4 % of range
_TINY = 1e-30  # below this a tensor is treated as all zeros (a histogram cannot span it)


@dataclass(frozen=True)
class TensorRange:
    """The real-valued range a tensor's INT8 scale (and zero point) is computed from."""

    lowest: float
    highest: float
    method: str  # what produced it: the method, or "constant"/"zero" for degenerate tensors


@dataclass
class _Stats:
    """Running statistics of one tensor over the calibration batches."""

    minimum: float = np.inf
    maximum: float = -np.inf
    abs_hist: np.ndarray | None = None
    signed_hist: np.ndarray | None = None

    @property
    def absmax(self) -> float:
        return max(abs(self.minimum), abs(self.maximum))


def _session_with_outputs(model_path: Path, tensors: Sequence[str], threads: int,
                          session_config: Mapping[str, str] | None = None):
    """An ONNX Runtime session that also returns the given intermediate tensors."""
    model = onnx.load(str(model_path))
    present = {output.name for output in model.graph.output}
    for name in tensors:
        if name not in present:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    return ort_session(model.SerializeToString(), threads, session_config)


def run_with_intermediates(model_path: Path, tensors: Sequence[str], batches: Iterable[Mapping[str, np.ndarray]],
                           threads: int = 2, session_config: Mapping[str, str] | None = None
                           ) -> Iterable[dict[str, np.ndarray]]:
    """For each batch, the named intermediate tensors of model_path."""
    session = _session_with_outputs(model_path, tensors, threads, session_config)
    input_names = [i.name for i in session.get_inputs()]
    for batch in batches:
        values = session.run(list(tensors), {name: np.ascontiguousarray(batch[name]) for name in input_names})
        yield dict(zip(tensors, values))


def _update_minmax(stats: _Stats, value: np.ndarray) -> None:
    if value.size:
        stats.minimum = min(stats.minimum, float(np.min(value)))
        stats.maximum = max(stats.maximum, float(np.max(value)))


def _update_histograms(stats: _Stats, value: np.ndarray, signed: bool) -> None:
    if not value.size or stats.absmax < _TINY:
        return
    data = value.astype(np.float64, copy=False)
    # exact zeros (half of every post-ReLU tensor) are exact in INT8 at any scale; kept in the
    # histogram they form a spike that the KL search smears over the first chunk and then clips
    # the real values to avoid (the known failure of entropy calibration after ReLU)
    magnitudes = np.abs(data[data != 0.0])
    hist, _ = np.histogram(magnitudes, bins=HISTOGRAM_BINS, range=(0.0, stats.absmax))
    stats.abs_hist = hist if stats.abs_hist is None else stats.abs_hist + hist
    if signed and stats.maximum - stats.minimum > _TINY:
        hist, _ = np.histogram(data, bins=HISTOGRAM_BINS, range=(stats.minimum, stats.maximum))
        stats.signed_hist = hist if stats.signed_hist is None else stats.signed_hist + hist


def collect_statistics(model_path: Path, tensors: Sequence[str], data: Encoded, method: Method, symmetric: bool,
                       threads: int = 2) -> dict[str, _Stats]:
    """Min/max of every tensor, then (percentile, entropy) histograms over the fixed ranges found."""
    stats = {name: _Stats() for name in tensors}
    for values in run_with_intermediates(model_path, tensors, _tracked(data, "calibrating: ranges"), threads):
        for name, value in values.items():
            _update_minmax(stats[name], np.asarray(value))
    if method != "minmax":
        signed = method == "percentile" and not symmetric
        for values in run_with_intermediates(model_path, tensors, _tracked(data, f"calibrating: {method} histograms"), threads):
            for name, value in values.items():
                _update_histograms(stats[name], np.asarray(value), signed)
    return stats


def _tracked(data: Encoded, desc: str) -> Iterable[Mapping[str, np.ndarray]]:
    """The calibration batches, reported as they run (a CI log hears from a calibration pass longer than its interval)."""
    return track(data.batches(CALIBRATION_BATCH), total=-(-len(data) // CALIBRATION_BATCH), desc=desc, unit="batch", leave=False,
                 samples_per_step=CALIBRATION_BATCH)


def percentile_threshold(hist: np.ndarray, top: float, percentile: float) -> float:
    """The |x| below which `percentile` % of the values lie, from a histogram over [0, top]."""
    cdf = np.cumsum(hist, dtype=np.float64)
    index = int(np.searchsorted(cdf, cdf[-1] * percentile / 100.0))
    return min(top, top * (index + 1) / len(hist))


def _signed_percentiles(hist: np.ndarray, low: float, high: float, percentile: float) -> tuple[float, float]:
    cdf = np.cumsum(hist, dtype=np.float64) / max(float(hist.sum()), 1.0)
    width = (high - low) / len(hist)
    lower = low + width * int(np.searchsorted(cdf, 1.0 - percentile / 100.0))
    upper = low + width * (int(np.searchsorted(cdf, percentile / 100.0)) + 1)
    return max(low, lower), min(high, upper)


def _kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> float:
    p = reference / reference.sum()
    q = candidate / max(candidate.sum(), 1e-300)
    mask = p > 0
    # candidate bins where the reference has mass but the candidate none: smoothed, not infinite
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))


def _quantized_candidate(hist: np.ndarray, levels: int) -> np.ndarray:
    """hist squeezed into `levels` bins and expanded back, mass spread over each chunk's non-empty bins."""
    chunk = (np.arange(len(hist)) * levels) // len(hist)
    sums = np.bincount(chunk, weights=hist, minlength=levels)
    nonzero = np.bincount(chunk, weights=(hist > 0).astype(np.float64), minlength=levels)
    per_bin = np.divide(sums, nonzero, out=np.zeros_like(sums), where=nonzero > 0)
    return np.where(hist > 0, per_bin[chunk], 0.0)


def entropy_threshold(hist: np.ndarray, top: float, levels: int = QUANTIZED_BINS, stride: int = ENTROPY_STRIDE) -> float:
    """TensorRT's KL-divergence calibration: the |x| threshold whose INT8 histogram loses least information."""
    hist = hist.astype(np.float64)
    if hist.sum() <= 0 or np.count_nonzero(hist) <= levels:
        return top  # few distinct magnitudes: INT8 holds them all, clipping only hurts
    best_divergence, best_bins = np.inf, len(hist)
    for bins in range(levels, len(hist) + 1, stride):
        reference = hist[:bins].copy()
        reference[-1] += hist[bins:].sum()  # clipped outliers land in the last bin
        divergence = _kl_divergence(reference, _quantized_candidate(hist[:bins], levels))
        if divergence < best_divergence:
            best_divergence, best_bins = divergence, bins
    return top * best_bins / len(hist)


def range_of(stats: _Stats, method: Method, symmetric: bool, percentile: float) -> TensorRange:
    """The quantization range of one tensor; degenerate tensors get an exact, valid range."""
    if not np.isfinite(stats.minimum) or stats.absmax < _TINY:
        return TensorRange(-1.0, 1.0, "zero")  # all zeros (or never seen): any positive scale is exact
    if stats.maximum - stats.minimum < _TINY or stats.abs_hist is None or method == "minmax":
        kind = "constant" if stats.maximum - stats.minimum < _TINY else "minmax"
        return _finish(stats.minimum, stats.maximum, symmetric, kind)
    if method == "percentile" and not symmetric and stats.signed_hist is not None:
        low, high = _signed_percentiles(stats.signed_hist, stats.minimum, stats.maximum, percentile)
        return _finish(low, high, symmetric, method)
    if method == "percentile":
        threshold = percentile_threshold(stats.abs_hist, stats.absmax, percentile)
    else:
        threshold = entropy_threshold(stats.abs_hist, stats.absmax)
    return _finish(max(stats.minimum, -threshold), min(stats.maximum, threshold), symmetric, method)


def _finish(low: float, high: float, symmetric: bool, kind: str) -> TensorRange:
    if symmetric:
        bound = max(abs(low), abs(high))
        return TensorRange(-bound, bound, kind)
    return TensorRange(low, high, kind)


def calibrate(model_path: Path, tensors: Sequence[str], data: Encoded, method: Method, symmetric: bool,
              percentile: float, threads: int = 2) -> dict[str, TensorRange]:
    """Ranges of the named activation tensors of model_path over the calibration data."""
    ordered = sorted(set(tensors))
    stats = collect_statistics(model_path, ordered, data, method, symmetric, threads)
    return {name: range_of(stats[name], method, symmetric, percentile) for name in ordered}


def to_tensors_data(ranges: Mapping[str, TensorRange], method: Method):
    """onnxruntime.quantization's TensorsData, what its QDQ quantizer reads the ranges from."""
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    data = {name: TensorData(lowest=np.float32(r.lowest), highest=np.float32(r.highest)) for name, r in ranges.items()}
    return TensorsData(methods[method], data)
