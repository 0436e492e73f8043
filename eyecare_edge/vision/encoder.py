"""What every vision backend is: normalised tiles [T, 3, S, S] -> tile embeddings [T, n, d].

The interface (`VisionEncoder`), its one error (`VisionError`), the graph's tensor names and the
vision precisions a bundle may hold. The backends (`onnxruntime`, `tensorrt`) and the choice
among them (`choice`) build on this module and nothing here imports them.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from eyecare_edge.errors import EyecareError
from eyecare_edge.formats import format_names

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeds"
# Vision precisions a bundle may hold; `int8_u8s8` is the ONNX Runtime CPU-fast INT8 variant
# (uint8 activations), `int8` the symmetric Q/DQ graph TensorRT builds from.
PRECISIONS = format_names("vision")  # the formats table (eyecare_edge/formats.py)


class VisionError(EyecareError):
    """A vision backend that cannot load or run; the message says which and why."""


class VisionEncoder(Protocol):
    """What the pipeline needs from a backend. `width` is the embedding width d when the backend
    knows it before running (a static graph output), else None."""

    name: str
    precision: str
    width: int | None

    def encode(self, tiles: np.ndarray) -> np.ndarray: ...


def validate_tiles(tiles: np.ndarray) -> np.ndarray:
    """float32 C-contiguous [T, 3, S, S]; anything else is a VisionError naming the shape."""
    if tiles.ndim != 4 or tiles.shape[1] != 3 or tiles.shape[0] < 1:
        raise VisionError(f"tiles must be [T>=1, 3, S, S], got {tiles.shape}")
    return np.ascontiguousarray(tiles, dtype=np.float32)


def default_threads() -> int:
    """Physical cores: hyper-threads slow matrix kernels down rather than up."""
    from eyecare_edge.llm import physical_cores

    return physical_cores()
