"""Export room (`eyecare_edge.export`): checkpoint -> bundle (vision ONNX/TensorRT, LLM GGUF), with validation."""
