"""Vision backends: normalised tiles [T, 3, S, S] -> tile embeddings [T, n, d], one small interface.

Backends: ONNX Runtime on CPU, ONNX Runtime with CUDA, OpenVINO on request (`onnxruntime`), and
TensorRT (`tensorrt`), its engine built from the bundle on first use when missing or stale for
this GPU/TensorRT (`engines`, `engine_build`). `open_vision(..., backend="auto")` tries them
fastest first and records why each one before the chosen was skipped (`choice`).

Every backend reads files of the bundle; `open_vision` hands the manifest entries it is about to
load to a `check` callback first (`eyecare_edge.bundle.require_valid`), so the pipeline verifies
exactly the files it uses and a corrupt file is reported by name rather than as an obscure
parser error.

Importing this package loads neither onnxruntime, OpenVINO nor TensorRT: each is imported when a
backend is asked for, so a camera PC without TensorRT or a Jetson without OpenVINO imports it
cheaply. The modules, one job each:

- `encoder`: the `VisionEncoder` interface, `VisionError`, tensor names, precisions.
- `files`: which bundle files the vision half reads (ONNX with external data, `image_newline`).
- `onnxruntime`: ONNX Runtime (CPU, CUDA) and OpenVINO encoders.
- `tensorrt`: TensorRT availability, the CUDA driver through ctypes, the engine runner.
- `engine_build`: building one engine from the ONNX and checking it against the FP32 ONNX.
- `engines`: the engines a bundle records: keys, staleness, build lock, find or build.
- `choice`: the `auto` order, fallbacks and their reasons (`open_vision`).
"""

from eyecare_edge.vision.choice import (
    AUTO_ORDER,
    BACKENDS,
    GPU_BACKENDS,
    FileCheck,
    VisionChoice,
    backend_ready,
    candidates,
    cpu_precision_order,
    fp16_based,
    open_vision,
    validated,
)
from eyecare_edge.vision.encoder import (
    INPUT_NAME,
    OUTPUT_NAME,
    PRECISIONS,
    VisionEncoder,
    VisionError,
    default_threads,
    validate_tiles,
)
from eyecare_edge.vision.files import load_newline, newline_entry, onnx_entry, onnx_files

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "GPU_BACKENDS",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "PRECISIONS",
    "FileCheck",
    "VisionChoice",
    "VisionEncoder",
    "VisionError",
    "backend_ready",
    "candidates",
    "cpu_precision_order",
    "default_threads",
    "fp16_based",
    "load_newline",
    "newline_entry",
    "onnx_entry",
    "onnx_files",
    "open_vision",
    "validate_tiles",
    "validated",
]
