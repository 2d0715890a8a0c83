"""INT8 quantization internals: calibration, Q/DQ placement, the INT8 embedding,
evaluation on the tuning set and the accuracy-aware fallback.

quantize.py composes these (the quantize pass, pipeline/stages/quantize.py, calls it); each module
is usable on its own (the benchmark in benchmarks/quantization.py does).
"""
