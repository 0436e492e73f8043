"""Calibration room (`eyecare_edge.calibration`): INT8 calibration data and Q/DQ quantization of the vision ONNX."""
