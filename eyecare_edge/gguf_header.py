"""Fast GGUF header reader: metadata and tensor infos, without touching tensor data.

`gguf.GGUFReader` builds a numpy view per array element while parsing, which takes 10-60 s
on a 50k-150k token vocabulary (SmolLM2, Qwen2). Checks that only need names, shapes, types
and keys read the header here in well under a second; tensor bytes can then be mapped one
tensor at a time (`tensor_bytes`).

Runtime code: struct and numpy only. The `gguf` package (the export room's writer) is not part of
the runtime install, so its two tables this reader needs are kept here (`GGML_TYPES`, the default
alignment) and tests/test_gguf_writer.py checks them against the package.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
# GGUF spec: tensor data starts at a multiple of this unless `general.alignment` says otherwise.
GGUF_DEFAULT_ALIGNMENT = 32
# ggml type id -> (name, elements per block, bytes per block), as gguf.GGML_QUANT_SIZES (gguf 0.19).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GgufTensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne0 (row length) first, as gguf.GGUFReader reports it
    type_name: str  # "F32", "Q4_K", ...
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int


@dataclass(frozen=True)
class GgufHeader:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GgufTensorInfo]


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str, size: int) -> Any:
        if self.pos + size > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF header at byte {self.pos}")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.unpack("<Q", 8)
        if self.pos + length > len(self.buf):
            raise ValueError(f"{self.path}: truncated string in GGUF header at byte {self.pos}")
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="surrogateescape")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(*_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("<I", 4), self.unpack("<Q", 8)
            if item_kind in _SCALARS:
                fmt, size = _SCALARS[item_kind]
                end = self.pos + size * count
                if end > len(self.buf):
                    raise ValueError(f"{self.path}: truncated array in GGUF header at byte {self.pos}")
                values = np.frombuffer(self.buf[self.pos : end], dtype=np.dtype(fmt)).tolist()
                self.pos = end
                return values
            return [self.value(item_kind) for _ in range(count)]
        raise ValueError(f"{self.path}: unknown GGUF value type {kind} at byte {self.pos}")


def read_gguf_header(path: str | Path) -> GgufHeader:
    """Metadata (key -> value; arrays as lists) and tensor infos of a GGUF file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"GGUF not found: {file}")
    with open(file, "rb") as handle:
        data = np.memmap(handle, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(data), file)
    if bytes(cur.buf[:4]) != _MAGIC:
        raise ValueError(f"{file} is not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.unpack("<I", 4)
    if version < 2:
        raise ValueError(f"{file}: GGUF version {version} is not supported")
    n_tensors, n_kv = cur.unpack("<Q", 8), cur.unpack("<Q", 8)
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I", 4))
    raw: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(n_tensors):
        name = cur.string()
        shape = tuple(cur.unpack("<Q", 8) for _ in range(cur.unpack("<I", 4)))
        raw.append((name, shape, cur.unpack("<I", 4), cur.unpack("<Q", 8)))
    alignment = int(metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    tensors = {}
    for name, shape, kind, offset in raw:
        if kind not in GGML_TYPES:
            raise ValueError(f"{file}: tensor {name!r} has unknown ggml type {kind}")
        type_name, block, type_size = GGML_TYPES[kind]
        n_bytes = int(np.prod(shape, dtype=np.int64)) // block * type_size
        tensors[name] = GgufTensorInfo(name, shape, type_name, data_start + offset, n_bytes)
    return GgufHeader(version=version, metadata=metadata, tensors=tensors)


def tensor_bytes(path: str | Path, info: GgufTensorInfo) -> np.ndarray:
    """The stored bytes of one tensor (read-only memory map)."""
    return np.memmap(Path(path), dtype=np.uint8, mode="r", offset=info.offset, shape=(info.n_bytes,))
