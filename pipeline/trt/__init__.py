"""TensorRT: building, inspecting and running engines (TensorRT itself is imported lazily)."""
