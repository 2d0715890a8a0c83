"""edgepipe: fused image+text model -> gated INT8 ONNX -> TensorRT engine or device bundle."""

__version__ = "0.1.0"
