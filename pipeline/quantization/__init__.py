"""INT8 quantization internals: calibration, Q/DQ placement, the INT8 embedding,
evaluation on the tuning set, the accuracy-aware fallback, and the weight form TensorRT 8.x
reads (weight_form.py: float weights -> QuantizeLinear -> DequantizeLinear).

quantize.py composes these (the quantize pass, pipeline/stages/quantize.py, calls it); each module
is usable on its own (the benchmark in benchmarks/quantization.py does).
"""
