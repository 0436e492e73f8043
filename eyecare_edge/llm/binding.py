"""The llama.cpp binding: loading llama-cpp-python, its version floor, and llama.cpp's
process-wide state (backend, log level).

Every other module of `eyecare_edge.llm` reaches llama.cpp through `lib` (None where
llama-cpp-python is not installed, so the runtime can still be imported for bundle checks and
CLI help; `IMPORT_ERROR` says why).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from eyecare_edge.cpus import WAIT_POLICY_MARK
from eyecare_edge.errors import EyecareError

try:  # the runtime can still be imported (bundle checks, CLI help) where llama.cpp is absent
    # llama.cpp's OpenMP workers spin between operations by default; on a busy 2-8 core clinic
    # PC one descheduled spinner stalls every step (measured: Q4_K_M decode 4 tok/s spinning vs
    # 22-27 tok/s with passive waits, prefill equal or better). Set before the library loads
    # OpenMP; an explicit OMP_WAIT_POLICY in the environment wins.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        # marked, so child processes can drop it (`eyecare_edge.cpus.child_environ`): a torch child
        # must not inherit llama.cpp's waits, and a llama.cpp child sets them again on import
        os.environ[WAIT_POLICY_MARK] = "PASSIVE"
    import llama_cpp.llama_cpp as lib
except ImportError as exc:  # pragma: no cover - exercised only on machines without llama-cpp-python
    lib = None
    IMPORT_ERROR: ImportError | None = exc
else:
    IMPORT_ERROR = None

# ggml_type values of the KV cache's element types (ggml.h; the bindings do not export BF16);
# `formats.KV_CACHES` pairs them into the caches a context takes (K and V may differ).
KV_TYPES: dict[str, int] = {"f32": 0, "f16": 1, "q8_0": 8, "bf16": 30}
_GGUF_MAGIC = b"GGUF"


class LLMError(EyecareError):
    """A model that cannot be loaded or a request the context cannot serve."""


def require_binding() -> None:
    """LLMError when llama-cpp-python could not be imported."""
    if lib is None:
        raise LLMError(f"llama-cpp-python is not installed ({IMPORT_ERROR})")


@functools.cache
def backend_init() -> None:
    """llama.cpp's process-wide backend initialisation, done once."""
    lib.llama_backend_init()


def set_log_level(verbose: bool) -> None:
    # llama-cpp-python routes llama.cpp's log through this logger (process-wide, like
    # `llama_cpp.Llama(verbose=...)` does); quiet means errors only.
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)


def binding_version() -> str:
    import llama_cpp

    return str(getattr(llama_cpp, "__version__", "unknown"))


def check_binding_version() -> None:
    """LLMError when llama-cpp-python is older than the floor whose API this package calls."""
    from eyecare_edge.versions import LLAMA_CPP_PYTHON_MIN, LLAMA_CPP_UPGRADE, at_least

    version = binding_version()
    if not at_least(version, LLAMA_CPP_PYTHON_MIN) or not hasattr(lib, "LLAMA_LOAD_MODE_MMAP"):
        raise LLMError(
            f"llama-cpp-python {version} is too old: eyecare-edge needs >= {LLAMA_CPP_PYTHON_MIN} "
            f"(llama_model_params.load_mode); {LLAMA_CPP_UPGRADE}"
        )


def check_gguf_file(path: Path) -> None:
    """LLMError unless `path` is a regular file that starts with the GGUF magic."""
    if not path.exists():
        raise LLMError(f"{path}: no such file")
    if not path.is_file():
        raise LLMError(f"{path}: not a file")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != _GGUF_MAGIC:
        raise LLMError(f"{path}: not a GGUF file (starts with {magic!r}, expected {_GGUF_MAGIC!r})")
