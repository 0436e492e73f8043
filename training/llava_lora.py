"""Adapters of a LLaVA import: a plain PEFT LoRA is merged tensor by tensor; a routed mixture of
LoRA experts (HealthGPT's H-LoRA) is refused with the reason."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from eyecare_edge.training.llava_keys import normalize_key
from eyecare_edge.training.llava_tensors import LlavaImportError, TensorEntry, TensorStore

# Marks of a mixture-of-LoRA-experts adapter (HealthGPT H-LoRA, MoLE-style): a router, or
# per-expert LoRA matrices.
_MOE_KEY = re.compile(
    r"lora_route|lora_router|lora_gate|lora_[AB]\d+\b|lora_[AB]\.\d+\.|experts?\.\d+.*lora_"
)
_MOE_CONFIG_FIELDS = ("lora_nums", "num_experts", "expert_num", "moe_type", "hlora_nums")

H_LORA_REASON = (
    "it is a mixture-of-LoRA-experts adapter (HealthGPT's H-LoRA: a `lora_route` router gives every "
    "token its own softmax mix of LoRA experts). The update W·x + B·(route(x) ⊙ A·x) depends on each "
    "token's hidden state, so it cannot be folded into one weight matrix, and llama.cpp has no "
    "per-token adapter routing at run time: such a model cannot be exported to GGUF. A checkpoint "
    "with merged full weights (or a plain LoRA adapter) can be imported."
)


def refuse_moe_adapter(where: Path | str, config: dict | None = None, keys: Iterable[str] = ()) -> None:
    """Raise if a file name, adapter config or tensor names show a mixture-of-LoRA-experts adapter."""
    name = Path(where).name.lower()
    moe_fields = [f for f in _MOE_CONFIG_FIELDS if config and (config.get(f) or 0) not in (0, 1, None)]
    moe_keys = [k for k in keys if _MOE_KEY.search(k)]
    if "hlora" in name or "h-lora" in name or moe_fields or moe_keys:
        found = (
            f" (found {', '.join(moe_fields)} in its config)"
            if moe_fields
            else f" (found tensors such as {moe_keys[0]})"
            if moe_keys
            else ""
        )
        raise LlavaImportError(f"{where}: cannot be imported: {H_LORA_REASON}{found}")


@dataclass(frozen=True)
class LoraDelta:
    """One low-rank update of one tensor, named by the tensors in the adapter file."""

    kind: str  # "linear" (W += s·B@A), "embedding" (W += s·(B@A)ᵀ) or "bias" (b += s·lora_B.bias)
    a: str
    b: str
    scale: float
    shape: tuple[int, ...]  # shape of the tensor it updates


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter, merged tensor by tensor as the weights stream by (scale = alpha/r, or
    alpha/sqrt(r) with rsLoRA; r from the tensors, so rank_pattern needs no parsing)."""

    directory: Path
    path: Path
    config: dict
    store: TensorStore
    deltas: dict[str, list[LoraDelta]] = field(default_factory=dict)  # by source tensor name
    overrides: list[str] = field(default_factory=list)  # full tensors the adapter replaces

    @property
    def n_modules(self) -> int:
        return len({k.rsplit(".", 1)[0] for k in self.deltas})

    def scale(self, module: str, rank: int) -> float:
        alpha = self.config.get("lora_alpha", 8)
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (the source tensor `name`) with its LoRA updates added, in float32 then cast back."""
        deltas = self.deltas.get(name)
        if not deltas:
            return tensor
        out = tensor.to(torch.float32).clone()
        for d in deltas:
            b = self.store.read(self.path, d.b).to(torch.float32)
            if d.kind == "bias":
                out += d.scale * b
                continue
            update = b @ self.store.read(self.path, d.a).to(torch.float32)
            if d.kind == "embedding" or self.config.get("fan_in_fan_out"):
                update = update.T
            out += d.scale * update
        return out.to(tensor.dtype)


def find_adapter(directory: Path) -> Path | None:
    """The folder holding `adapter_config.json`: DIR itself or one of its direct subfolders."""
    found = [directory] if (directory / "adapter_config.json").is_file() else []
    found += sorted(p for p in directory.iterdir() if p.is_dir() and (p / "adapter_config.json").is_file())
    if len(found) > 1:
        raise LlavaImportError(
            f"{directory}: several adapters ({', '.join(str(p) for p in found)}); keep the one to merge"
        )
    return found[0] if found else None


def load_adapter(adapter_dir: Path, store: TensorStore, allow_pickle: bool) -> LoraAdapter:
    cfg_file = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise LlavaImportError(f"{cfg_file}: not valid JSON ({e})") from e
    refuse_moe_adapter(cfg_file, config)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LlavaImportError(
            f"{cfg_file}: a {peft_type} adapter; only plain LoRA adapters are merged on import"
        )
    if config.get("use_dora"):
        raise LlavaImportError(
            f"{cfg_file}: a DoRA adapter (use_dora); merge it with peft's merge_and_unload() first"
        )
    weights = [adapter_dir / n for n in ("adapter_model.safetensors", "adapter_model.bin")]
    weights = [p for p in weights if p.is_file()]
    if not weights:
        raise LlavaImportError(f"{adapter_dir}: adapter_config.json without adapter_model.safetensors/.bin")
    path = weights[0]
    if path.suffix == ".bin" and not allow_pickle:
        raise LlavaImportError(
            f"{path}: the adapter is a pickle file; read it with --allow-pickle (torch.load(weights_only=True))"
        )
    names = store.open(path)
    refuse_moe_adapter(path, None, names)
    adapter = LoraAdapter(adapter_dir, path, config, store)
    lora: dict[str, dict[str, str]] = {}
    for stored, shape in names.items():
        key = normalize_key(stored, "adapter")
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_[AB])", key)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = stored
        elif "lora_" in key:
            raise LlavaImportError(f"{path}: unknown adapter tensor {stored!r} (not plain LoRA)")
        else:
            # Full tensors PEFT saved beside the LoRA matrices (modules_to_save, trained biases,
            # embedding base weights) replace the base model's tensors.
            store.put(TensorEntry(key, stored, path, "adapter", shape))
            adapter.overrides.append(key)
    for module, parts in lora.items():
        if {"lora_A.weight", "lora_B.weight"} <= set(parts):
            a, b = parts["lora_A.weight"], parts["lora_B.weight"]
            kind, shape = "linear", (names[b][0], names[a][1])
            if config.get("fan_in_fan_out"):
                shape = shape[::-1]
        elif {"lora_embedding_A", "lora_embedding_B"} <= set(parts):
            a, b = parts["lora_embedding_A"], parts["lora_embedding_B"]
            kind, shape = "embedding", (names[a][1], names[b][0])
        else:
            raise LlavaImportError(f"{path}: LoRA tensors of {module} are incomplete ({sorted(parts)})")
        scale = adapter.scale(module, names[a][0])
        adapter.deltas.setdefault(f"{module}.weight", []).append(LoraDelta(kind, a, b, scale, shape))
        if "lora_B.bias" in parts:
            bias = parts["lora_B.bias"]
            adapter.deltas.setdefault(f"{module}.bias", []).append(
                LoraDelta("bias", bias, bias, scale, names[bias])
            )
    return adapter
