"""INT8 quantization internals: calibration, Q/DQ placement, the INT8 embedding,
evaluation on the tuning set and the accuracy-aware fallback.

The quantize stage (pipeline/stages/quantize.py) composes these; each module
is usable on its own (the benchmark in benchmarks/quantization.py does).
"""
