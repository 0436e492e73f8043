"""Tensor sources of a LLaVA import: every weight file of the given directories under one
normalised name space, read lazily.

Names and shapes come from safetensors headers or mmapped pickles, so planning an import costs no
memory; a tensor is read only when the writer asks for it, one at a time. When the checkpoint, a
base LLM, a vision tower and an adapter give the same name, the priority table decides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from eyecare_edge.training.llava_keys import normalize_key

from eyecare_edge.errors import EyecareError


class LlavaImportError(EyecareError):
    """A LLaVA-convention directory that cannot be imported; the message names the file and why."""


_NOT_WEIGHTS = {"training_args.bin", "optimizer.bin", "scheduler.bin", "rng_state.bin"}


@dataclass(frozen=True)
class TensorEntry:
    name: str  # normalised LLaVA-convention name
    stored: str  # name inside the file
    file: Path
    origin: str  # "adapter" | "checkpoint" | "base" | "vision"
    shape: tuple[int, ...]


_PRIORITY = {"adapter": 0, "checkpoint": 1, "base": 2, "vision": 2}


class TensorStore:
    """Every source tensor by normalised name, read only on `load` (safetensors handles or mmapped
    pickles), so planning costs no memory and writing holds one tensor at a time."""

    def __init__(self) -> None:
        self.entries: dict[str, TensorEntry] = {}
        self.superseded: list[TensorEntry] = []
        self._handles: dict[Path, object] = {}
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}

    def open(self, path: Path) -> dict[str, tuple[int, ...]]:
        """Open a weight file lazily; returns its stored names and shapes."""
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise LlavaImportError(f"{path}: not a readable safetensors file ({e})") from e
            self._handles[path] = handle
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise LlavaImportError(
                f"{path}: cannot be read with torch.load(weights_only=True) ({e}); "
                "it holds more than tensors, which this importer will not unpickle"
            ) from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise LlavaImportError(f"{path}: not a state dict of tensors")
        self._pickles[path] = state
        return {k: tuple(v.shape) for k, v in state.items()}

    def read(self, path: Path, stored: str) -> torch.Tensor:
        if path in self._handles:
            return self._handles[path].get_tensor(stored)
        return self._pickles[path][stored]

    def put(self, entry: TensorEntry) -> None:
        """Register a tensor; a name already given by a higher-priority origin wins, the same name
        twice within one origin is an error (which copy is meant is unknowable)."""
        old = self.entries.get(entry.name)
        if old is not None:
            if old.origin == entry.origin:
                raise LlavaImportError(
                    f"tensor {entry.name!r} is in both {old.file} and {entry.file}; remove one of the files"
                )
            if _PRIORITY[old.origin] <= _PRIORITY[entry.origin]:
                self.superseded.append(entry)
                return
            self.superseded.append(old)
        self.entries[entry.name] = entry

    def add_file(self, path: Path, origin: str) -> None:
        for stored, shape in self.open(path).items():
            self.put(TensorEntry(normalize_key(stored, origin), stored, path, origin, shape))

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.entries)

    def load(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        return self.read(e.file, e.stored)

    def files(self) -> list[tuple[str, Path]]:
        seen = {(e.origin, e.file) for e in [*self.entries.values(), *self.superseded]}
        return sorted(seen, key=lambda x: (_PRIORITY[x[0]], str(x[1])))


def weight_files(directory: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickle .bin files) holding a directory's weights, adapters excluded.

    A `model.safetensors.index.json` names the shards (each must exist). HF repos often ship the
    same weights twice; `pytorch_model*.bin` is ignored when `model*.safetensors` is present.
    """
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise LlavaImportError(f"{index}: not a safetensors index (no weight_map: {e})") from e
        shards = sorted({directory / f for f in weight_map.values()})
        absent = [s.name for s in shards if not s.is_file()]
        if absent:
            raise LlavaImportError(f"{index}: lists shards that are not in {directory}: {', '.join(absent)}")
        safetensors = shards
    else:
        safetensors = sorted(p for p in directory.glob("*.safetensors") if not p.name.startswith("adapter_"))
    bins = [
        p
        for p in sorted(directory.glob("*.bin"))
        if not p.name.startswith("adapter_") and p.name not in _NOT_WEIGHTS
    ]
    if any(p.name.startswith("model") for p in safetensors):
        bins = [p for p in bins if not p.name.startswith("pytorch_model")]
    return safetensors, bins


def add_dir(store: TensorStore, directory: Path, origin: str, allow_pickle: bool) -> int:
    safetensors, bins = weight_files(directory)
    if bins and not allow_pickle:
        raise LlavaImportError(
            f"{directory}: weights in pickle files ({', '.join(p.name for p in bins)}). Unpickling can run "
            "code, so these are read only with --allow-pickle (then with torch.load(weights_only=True)); "
            "or convert them to safetensors first."
        )
    for path in [*safetensors, *bins]:
        store.add_file(path, origin)
    return len(safetensors) + len(bins)
