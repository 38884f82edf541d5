"""From a trained student to deployable graphs: ONNX export with parity, INT8 quantization."""
