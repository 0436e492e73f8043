"""Quantize an F32/F16 GGUF with llama.cpp's own quantizer (`llama_model_quantize`).

Why not `gguf.quants`: it implements only a few block types, and llama.cpp's quantizer also
chooses per-tensor types for the mixed formats (Q4_K_M keeps some tensors at Q6_K, Q8_0 for
tiny rows, ...), which is what "Q4_K_M" means to everyone comparing numbers.
"""

from __future__ import annotations

import ctypes
from contextlib import nullcontext
from pathlib import Path

import llama_cpp

from eyecare_edge.gguf_header import read_gguf_header


def _known_ftypes() -> dict[str, int]:
    """Lower-case type name ("q4_k_m", "f16", ...) -> llama_ftype, from the bindings' constants."""
    table: dict[str, int] = {}
    for attr in dir(llama_cpp):
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            table[attr.removeprefix("LLAMA_FTYPE_MOSTLY_").lower()] = int(getattr(llama_cpp, attr))
    table["f32"] = int(llama_cpp.LLAMA_FTYPE_ALL_F32)
    return table


KNOWN_QTYPES: dict[str, int] = _known_ftypes()


def ftype_for(qtype: str) -> int:
    """The llama_ftype for a type name like "Q4_K_M", "q8_0" or "bf16" (case-insensitive)."""
    key = qtype.strip().lower().replace("-", "_")
    if key not in KNOWN_QTYPES:
        raise ValueError(
            f"unknown GGUF quantization type {qtype!r}; known: {', '.join(sorted(KNOWN_QTYPES))}"
        )
    return KNOWN_QTYPES[key]


def quantize_gguf(
    src: str | Path, dst: str | Path, qtype: str, *, n_threads: int | None = None, verbose: bool = False
) -> Path:
    """Write `dst`, a copy of the GGUF `src` quantized to `qtype`; returns `dst`.

    k-quants (Q4_K_M, ...) need rows that are multiples of 256; llama.cpp falls back to other
    types for tensors that are not. IQ1/IQ2 types need an importance matrix and fail without one.
    """
    source, target = Path(src), Path(dst)
    ftype = ftype_for(qtype)
    if not source.is_file():
        raise FileNotFoundError(f"GGUF to quantize not found: {source}")
    if source.resolve() == target.resolve():
        raise ValueError(f"quantize_gguf: source and destination are the same file: {source}")
    target.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = int(n_threads or 0)  # 0: llama.cpp uses all hardware threads
    params.ftype = ftype
    quiet = nullcontext() if verbose else llama_cpp._utils.suppress_stdout_stderr(disable=False)
    with quiet:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if rc != 0 or not target.is_file():
        raise RuntimeError(
            f"llama_model_quantize failed (rc={rc}) quantizing {source} to {qtype}; rerun with verbose=True"
        )
    return target


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """Tensor name -> stored type name ("F32", "Q4_K", "Q6_K", ...) of a GGUF file (header only: fast)."""
    return {name: info.type_name for name, info in read_gguf_header(path).tensors.items()}
