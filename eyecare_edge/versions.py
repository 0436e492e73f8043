"""Version floors of the native libraries the runtime drives, and the one comparison they need.

The floors are where the APIs the runtime calls appeared, not a taste: llama-cpp-python 0.3.35
brought `LLAMA_LOAD_MODE_*` (the GGUF load mode `llm.LlamaCppLM` sets); TensorRT 10 is the first
with the tensor-name I/O API (`set_input_shape`, `execute_async_v3`) and strongly typed networks
that `eyecare_edge.vision.tensorrt` builds and runs (JetPack 6 carries 10.x). pyproject.toml states the same
llama-cpp-python floor; TensorRT is not a pip dependency on Jetson, so it is checked at run time.
"""

from __future__ import annotations

import re

LLAMA_CPP_PYTHON_MIN = "0.3.35"
TENSORRT_MIN = "10"

LLAMA_CPP_UPGRADE = (
    "pip install --no-cache-dir -U 'llama-cpp-python>=0.3.35' "
    "(set CMAKE_ARGS for your hardware first, see README 'Installing llama.cpp for your hardware')"
)


def version_tuple(text: str) -> tuple[int, ...]:
    """`"10.3.0.26"` -> (10, 3, 0, 26); `"0.3.35+cu124"` -> (0, 3, 35); leading digits only."""
    parts: list[int] = []
    for piece in str(text).strip().split("."):
        m = re.match(r"\d+", piece)
        if m is None:
            break
        parts.append(int(m.group()))
        if m.end() != len(piece):  # "35+cu124", "0rc1": the rest is not a release number
            break
    return tuple(parts)


def at_least(version: str, floor: str) -> bool:
    """True when `version` is `floor` or newer (missing trailing parts count as 0)."""
    have, need = version_tuple(version), version_tuple(floor)
    if not have:
        return False
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))
