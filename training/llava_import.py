"""Import a LLaVA-convention checkpoint (released EyecareGPT, LLaVA-NeXT, Dense Connector) as ours.

`eyecare-edge init --from-llava DIR -o CKPT` runs `import_llava`. A LLaVA-family directory holds
one `config.json` (the LLM's config plus `mm_*` fields), weights in safetensors shards (or pickle
`.bin` files), and the tokenizer. We read it in three steps, each a pure function of the files:

1. settings: `mm_*` fields -> our `EyecareGPTConfig` (SigLIP tower depth and selected layer,
   Dense-Connector groups, anyres pinpoints and `anyres_max_N`, LLM type and chat template);
2. plan: every source tensor goes through the key table (`llava_keys`) to a target tensor, or is
   dropped for a documented reason, or is *unmapped*; every target tensor must be fed. Unmapped
   and missing tensors fail the import with their names (unless `allow_missing`);
3. write: tensors are read lazily, one at a time (safetensors `safe_open`, mmapped `.bin`), a PEFT
   LoRA adapter is merged into each as it streams by, and the model is assembled on the meta
   device with `load_state_dict(assign=True)`, so a 7B import holds one copy of the weights.

Conventions verified against the code bases (LLaVA-NeXT `llava_arch.py`, `mm_utils.py`,
`siglip_encoder.py`; Dense Connector `dense_connector.py`; HealthGPT `peft/tuners/lora.py`):
- LLaVA's SigLIP tower deletes its last block and reads `hidden_states[-1]` of what is left; for
  a complete stored tower `mm_vision_select_layer = -2` picks the same hidden state.
- `image_grid_pinpoints` entries are [width, height] (`select_best_resolution` unpacks
  `width, height`); the string form "(1x1),...,(3x3)" lists (width, height) multiples of the tile.
  We store (height, width).
- Dense Connector DCI concatenates [selected layer, mean(h[0..12]), mean(h[13..25])] for SigLIP
  (27 hidden states) - the order of our LDC, so the projector's columns need no permutation.
  SCI concatenates [selected, h[7], h[15]]: an LDC with one-layer groups. STI appends pooled
  tokens along the token axis (not 729 tokens per tile), which our layout cannot express.
- HealthGPT's H-LoRA routes each token through a softmax mix of LoRA experts: refused.
"""

from __future__ import annotations

import ast
import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from eyecare_edge.training.config import IMAGE_TOKEN_INDEX, EyecareGPTConfig, default_ldc_layers
from eyecare_edge.training.llava_keys import (
    LLAVA_KEY_TABLE,
    TOWER,
    KeyMapping,
    format_table,
    group_names,
    map_key,
    normalize_key,
    summarize,
    summarize_dropped,
)
from eyecare_edge.training.modeling import EyecareGPTForConditionalGeneration
from eyecare_edge.training.tokenizer import JINJA_TEMPLATES
from torch import nn
from transformers import AutoTokenizer, SiglipVisionConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from eyecare_edge.errors import EyecareError
from eyecare_edge.preprocess import PreprocessConfig


class LlavaImportError(EyecareError):
    """A LLaVA-convention directory that cannot be imported; the message names the file and why."""


# --------------------------------------------------------------------------------------------
# Known SigLIP towers (by the last component of `mm_vision_tower`), for checkpoints that name a
# hub tower without shipping its config. Full depth: LLaVA's own deletion of the last block is
# applied on top.
_SIGLIP = {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
KNOWN_SIGLIP_TOWERS: dict[str, dict] = {
    **{
        f"siglip-so400m-patch14-{s}": dict(
            hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
            image_size=s, patch_size=14, **_SIGLIP,
        )
        for s in (224, 384)
    },
    **{
        f"siglip-base-patch16-{s}": dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=s, patch_size=16, **_SIGLIP,
        )
        for s in (224, 256, 384, 512)
    },
    **{
        f"siglip-large-patch16-{s}": dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=s, patch_size=16, **_SIGLIP,
        )
        for s in (256, 384)
    },
}  # fmt: skip
# Attention heads by width, for towers known only from their tensors (heads leave no trace in shapes).
SIGLIP_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1152: 16}

# LLM family -> (transformers model_type, our chat template).
LLM_TYPES: dict[str, tuple[str, str]] = {
    "phi3": ("phi3", "phi3_instruct"),
    "qwen2": ("qwen2", "qwen_2"),
    "llama": ("llama", "chatml"),
}
# Config keys of a causal LM that describe the saved object, not the architecture.
_LLM_SKIP = {
    "_name_or_path", "architectures", "dtype", "torch_dtype", "model_type", "transformers_version",
    "id2label", "label2id", "output_attentions", "output_hidden_states", "return_dict", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "auto_map",
}  # fmt: skip
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
_SIGLIP_FIELDS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_channels", "image_size", "patch_size",
    "hidden_act", "layer_norm_eps", "attention_dropout",
)  # fmt: skip
_NOT_WEIGHTS = {"training_args.bin", "optimizer.bin", "scheduler.bin", "rng_state.bin"}
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


# --------------------------------------------------------------------------------------------
# Tensor sources: lazily read files, one normalised name space.
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


def _add_dir(store: TensorStore, directory: Path, origin: str, allow_pickle: bool) -> int:
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


# --------------------------------------------------------------------------------------------
# Adapters: a plain PEFT LoRA is merged; a routed mixture of LoRA experts is refused.
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


# --------------------------------------------------------------------------------------------
# Settings: config.json -> our config.
def parse_pinpoints(value, tile: int) -> tuple[tuple[int, int], ...]:
    """LLaVA `image_grid_pinpoints` ([width, height] pairs, or "(1x1),...,(3x3)" in tile units,
    width first) -> our (height, width) canvases."""
    if isinstance(value, str) and re.search(r"\(\d+x\d+\)", value):
        cells = [tuple(map(int, m)) for m in re.findall(r"\((\d+)x(\d+)\)", value)]
        (w0, h0), (w1, h1) = cells[0], cells[-1]
        return tuple((j * tile, i * tile) for i in range(w0, w1 + 1) for j in range(h0, h1 + 1))
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"cannot parse image_grid_pinpoints {value!r}") from e
    try:
        return tuple((int(h), int(w)) for w, h in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"image_grid_pinpoints must be [width, height] pairs, got {value!r}") from e


def parse_anyres_max(aspect: str | None) -> int:
    """`image_aspect_ratio` -> our compression cap: anyres_max_N -> N, plain anyres -> 0 (none)."""
    if aspect == "anyres":
        return 0
    m = re.fullmatch(r"anyres_max_(\d+)", aspect or "")
    if not m:
        raise ValueError(
            f"image_aspect_ratio {aspect!r}: eyecare-edge lays images out as LLaVA-NeXT anyres "
            "('anyres' or 'anyres_max_N'); a single padded/square tile without newlines is not supported"
        )
    return int(m.group(1))


def detect_llm_type(cfg: dict, keys: Iterable[str]) -> str:
    """LLM family from model_type/architectures (LLaVA wraps them: llava_phi3, LlavaQwenForCausalLM,
    qwen2_5_vl, ...), with the weights' names breaking the tie for HealthGPT's `LlavaPhi...`."""
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    names = [
        str(cfg.get("model_type", "")),
        str(text.get("model_type", "")),
        *map(str, cfg.get("architectures") or []),
    ]
    low = " ".join(names).lower()
    if re.search(r"qwen3|qwen2_moe|qwen2moe|mistral|mixtral|gemma|vicuna", low):
        raise ValueError(
            f"unsupported LLM ({', '.join(n for n in names if n)}); supported: Phi-3, Qwen2, Llama"
        )
    if "phi3" in low or "phi-3" in low:
        return "phi3"
    if "qwen" in low:
        return "qwen2"
    if "llama" in low:
        return "llama"
    if "phi" in low and any(".qkv_proj." in k for k in keys):
        return "phi3"
    raise ValueError(
        f"cannot tell the LLM type from model_type/architectures {[n for n in names if n]}; "
        "supported: Phi-3 (phi3), Qwen2 / Qwen2.5(-VL) (qwen2), Llama (llama)"
    )


def llm_config(cfg: dict, llm_type: str, vocab_rows: int | None, notes: list[str]):
    """The LLM's own transformers config from LLaVA's (mm_* and wrapper fields removed).

    Qwen2.5-VL's multimodal RoPE (mrope) with the same position for its three sections is plain
    1-D RoPE, which is how a LLaVA-style model feeds it (text and image tokens in one sequence).
    """
    base = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg
    cls = CONFIG_MAPPING[LLM_TYPES[llm_type][0]]
    allowed = (set(cls().to_dict()) | {"rope_scaling", "rope_theta"}) - _LLM_SKIP
    fields = {k: v for k, v in base.items() if k in allowed}
    rope = fields.get("rope_scaling") or fields.get("rope_parameters")
    if isinstance(rope, dict) and (
        "mrope_section" in rope or "mrope" in (rope.get("type"), rope.get("rope_type"))
    ):
        theta = fields.pop("rope_theta", None) or rope.get("rope_theta") or 10000.0
        fields.pop("rope_scaling", None)
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": float(theta)}
        notes.append(
            "Qwen2.5-VL mrope -> 1-D RoPE (theta kept): equal for text positions; image tokens get "
            "sequence positions, as in LLaVA-style models built on Qwen2.5-VL's LLM"
        )
    if vocab_rows is not None and fields.get("vocab_size") != vocab_rows:
        if "vocab_size" in fields:
            notes.append(f"vocab_size {fields['vocab_size']} -> {vocab_rows} (rows of embed_tokens)")
        fields["vocab_size"] = vocab_rows
    try:
        return cls(**fields)
    except Exception as e:  # transformers' validation raises several types
        raise ValueError(f"the LLM config does not build as {cls.__name__}: {e}") from e


@dataclass(frozen=True)
class TowerSpec:
    """The SigLIP tower as stored, and which of its hidden states the connector reads."""

    depth: int  # blocks of the tower as released, before LLaVA drops one
    stored_layers: int
    select: int  # hidden-state index of LLaVA's selected feature
    fine: tuple[int, ...]
    coarse: tuple[int, ...]

    @property
    def used_layers(self) -> int:
        return max((self.select, *self.fine, *self.coarse))


def _siglip_from_dict(d: dict) -> SiglipVisionConfig | None:
    if d.get("model_type") == "siglip" and isinstance(d.get("vision_config"), dict):
        d = d["vision_config"]
    if d.get("model_type") not in ("siglip_vision_model", None) or "depth" in d:
        return None  # e.g. Qwen2.5-VL's own vision config
    need = {"hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size"}
    if not need <= set(d):
        return None
    keep = {*_SIGLIP_FIELDS, "num_hidden_layers"}
    return SiglipVisionConfig(**{**_SIGLIP, **{k: v for k, v in d.items() if k in keep}})


def _siglip_from_tensors(store: TensorStore, notes: list[str]) -> SiglipVisionConfig:
    def shape(k: str) -> tuple[int, ...]:
        e = store.entries.get(TOWER + k)
        if e is None:
            raise ValueError(f"cannot infer the tower's config: tensor {TOWER + k} is absent")
        return e.shape

    hidden, _, patch, _ = shape("embeddings.patch_embedding.weight")
    positions = shape("embeddings.position_embedding.weight")[0]
    side = math.isqrt(positions)
    if side * side != positions:
        raise ValueError(f"position_embedding has {positions} rows, not a square grid")
    if hidden not in SIGLIP_HEADS_BY_WIDTH:
        raise ValueError(
            f"a SigLIP tower of width {hidden} is not in the known-towers table, so its attention heads "
            "are unknown; add a `vision_config` block (SiglipVisionConfig fields) to config.json"
        )
    layers = 1 + max(int(k.split(".")[0]) for k in _tower_layer_keys(store))
    notes.append(
        "tower config inferred from tensor shapes (standard SigLIP activations/eps); assuming the stored "
        "tower is complete, so mm_vision_select_layer indexes its hidden states"
    )
    return SiglipVisionConfig(
        hidden_size=hidden,
        intermediate_size=shape("encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=layers,
        num_attention_heads=SIGLIP_HEADS_BY_WIDTH[hidden],
        image_size=side * patch,
        patch_size=patch,
        **_SIGLIP,
    )


def _tower_layer_keys(store: TensorStore) -> list[str]:
    p = TOWER + "encoder.layers."
    return [k[len(p) :] for k in store.entries if k.startswith(p)]


def resolve_tower(
    cfg: dict, store: TensorStore, tower_dir: Path | None, notes: list[str]
) -> SiglipVisionConfig:
    """The tower's full config: a SigLIP `vision_config` block in config.json, else the local tower
    directory's config, else the known-towers table by name, else inferred from tensor shapes."""
    name = str(cfg.get("mm_vision_tower") or cfg.get("vision_tower") or "")
    if store.has_prefix(TOWER + "embeddings.class_embedding") or store.has_prefix(TOWER + "pre_layrnorm"):
        raise ValueError(
            f"the vision tower {name!r} is CLIP (class token, pre-LayerNorm); EyecareGPT's exported vision "
            "graph is SigLIP (no class token), so CLIP-based LLaVA checkpoints are not supported"
        )
    if "clip" in name.lower() and "siglip" not in name.lower():
        raise ValueError(f"mm_vision_tower {name!r} is a CLIP tower; only SigLIP towers are supported")
    block = cfg.get("vision_config")
    if isinstance(block, dict) and (v := _siglip_from_dict(block)) is not None:
        notes.append("tower config from config.json's vision_config block")
        return v
    if tower_dir is not None and (tower_dir / "config.json").is_file():
        v = _siglip_from_dict(json.loads((tower_dir / "config.json").read_text()))
        if v is not None:
            notes.append(f"tower config from {tower_dir / 'config.json'}")
            return v
    key = name.rstrip("/").split("/")[-1].lower()
    if key in KNOWN_SIGLIP_TOWERS:
        notes.append(f"tower config of {key} from the known-towers table")
        return SiglipVisionConfig(**KNOWN_SIGLIP_TOWERS[key])
    return _siglip_from_tensors(store, notes)


def resolve_layers(
    cfg: dict, tower: SiglipVisionConfig, store: TensorStore, connector: str, notes: list[str]
) -> TowerSpec:
    """Which hidden states feed the connector, in our indexing (0 = embeddings)."""
    depth = tower.num_hidden_layers
    layer_keys = _tower_layer_keys(store)
    stored = 1 + max(int(k.split(".")[0]) for k in layer_keys) if layer_keys else depth
    if stored not in (depth, depth - 1):
        raise ValueError(f"the tower config says {depth} blocks but the checkpoint stores {stored}")
    select = int(cfg.get("mm_vision_select_layer", -2))
    if "mm_vision_select_layer" not in cfg:
        notes.append("mm_vision_select_layer absent: assuming LLaVA's usual -2")
    sel = select if select >= 0 else depth + 1 + select
    if stored == depth - 1:
        # LLaVA-NeXT / Dense Connector delete SigLIP's last block and read hidden_states[-1].
        if sel != stored:
            notes.append(
                f"the stored tower lacks its last block (LLaVA's SigLIP tower), which reads the last stored "
                f"hidden state h[{stored}] whatever mm_vision_select_layer ({select}) says"
            )
        sel = stored
    if not 0 <= sel <= stored:
        raise ValueError(f"mm_vision_select_layer {select} is outside the tower's hidden states 0..{stored}")
    feature = cfg.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise ValueError(f"mm_vision_select_feature {feature!r} is not supported (patch or cls_patch)")
    if connector == "dci":
        fine, coarse, _ = default_ldc_layers(sel)
    elif connector == "sci":
        fine, coarse = [7], [15]
        if sel < 15 or stored < 15:
            raise ValueError("Dense Connector SCI reads hidden states 7 and 15; this tower is shallower")
    else:
        fine, coarse = [], []
    return TowerSpec(depth, stored, sel, tuple(fine), tuple(coarse))


def connector_type(cfg: dict, store: TensorStore, hidden: int, notes: list[str]) -> str:
    """ "plain" | "dci" | "sci" from `mm_dense_connector_type`, else from the projector's width."""
    kind = str(cfg.get("mm_dense_connector_type") or "").lower()
    proj = store.entries.get("model.mm_projector.0.weight")
    width = proj.shape[1] if proj is not None else cfg.get("mm_hidden_size")
    if kind in ("", "none", "null"):
        if width == 3 * hidden:
            notes.append(
                "no mm_dense_connector_type, but the projector reads 3 x the tower width: assuming Dense "
                "Connector DCI (EyecareGPT's Layer-wise Dense Connector)"
            )
            kind = "dci"
        else:
            kind = "plain"
    if kind == "sti":
        raise ValueError(
            "Dense Connector STI appends average-pooled tokens of layers 8 and 16 along the token axis, so a "
            "tile has more than (size/patch)^2 tokens; eyecare-edge's anyres layout (and its LDC) cannot "
            "express that. Only DCI (and SCI) map onto the Layer-wise Dense Connector"
        )
    if kind not in ("plain", "dci", "sci"):
        raise ValueError(f"unknown mm_dense_connector_type {kind!r} (known: dci, sci, sti)")
    groups = 1 if kind == "plain" else 3
    if width is not None and width != groups * hidden:
        raise ValueError(
            f"the projector reads {width} channels but a {kind} connector over a {hidden}-wide tower gives "
            f"{groups * hidden}"
        )
    return kind


# --------------------------------------------------------------------------------------------
@dataclass
class ImportPlan:
    """Everything decided before any weight is read: the config, the fate of every source tensor,
    the target tensors nobody feeds, and the notes (assumptions) that went into it."""

    llava_dir: Path
    config: EyecareGPTConfig
    store: TensorStore
    mappings: list[KeyMapping]
    missing: list[str]
    mismatched: list[str]
    adapter: LoraAdapter | None
    tokenizer: object
    tokenizer_dir: Path
    notes: list[str]
    tied: bool

    @property
    def mapped(self) -> list[KeyMapping]:
        return [m for m in self.mappings if m.target is not None]

    @property
    def dropped(self) -> list[KeyMapping]:
        return [m for m in self.mappings if m.target is None and m.rule is not None]

    @property
    def unmapped(self) -> list[KeyMapping]:
        return [m for m in self.mappings if m.target is None and m.rule is None]

    def problems(self, allow_missing: bool) -> str | None:
        parts = []
        if self.mismatched:
            parts.append(
                "tensors whose shapes do not fit EyecareGPT:\n" + "\n".join(f"  {s}" for s in self.mismatched)
            )
        if not allow_missing:
            if self.unmapped:
                parts.append(
                    f"{len(self.unmapped)} source tensors map to no EyecareGPT tensor:\n"
                    + group_names(m.source for m in self.unmapped)
                )
            if self.missing:
                parts.append(
                    f"{len(self.missing)} EyecareGPT tensors have no source tensor:\n"
                    + group_names(self.missing)
                )
                if any(k.startswith("vision_tower.") for k in self.missing) and not self.store.has_prefix(
                    TOWER
                ):
                    parts.append(
                        "the checkpoint holds no vision tower (LLaVA leaves a frozen tower out): point "
                        "mm_vision_tower at a local SigLIP directory or pass one as the vision directory"
                    )
        if not parts:
            return None
        hint = (
            ""
            if allow_missing or self.mismatched
            else "\n(--allow-missing imports anyway; missing tensors are initialised)"
        )
        return f"{self.llava_dir}: cannot import:\n" + "\n".join(parts) + hint

    def report(self) -> str:
        lines = ["sources:"]
        lines += [f"  {origin:<10} {path}" for origin, path in self.store.files()]
        if self.adapter is not None:
            lines.append(
                f"adapter: LoRA in {self.adapter.directory}, merged into {self.adapter.n_modules} modules "
                f"(r from tensors, lora_alpha={self.adapter.config.get('lora_alpha')}, "
                f"rslora={bool(self.adapter.config.get('use_rslora'))}); it replaces "
                f"{len(self.adapter.overrides)} full tensors"
            )
        lines.append(f"mapped ({len(self.mapped)} tensors):")
        lines.append(format_table(summarize(self.mapped)))
        lines.append(f"dropped on purpose ({len(self.dropped)} tensors):")
        lines.append(format_table(summarize_dropped(self.dropped)))
        if self.store.superseded:
            lines.append(f"superseded by a higher-priority source ({len(self.store.superseded)}):")
            lines.append(group_names(f"{e.name} ({e.origin})" for e in self.store.superseded))
        lines.append(f"unmapped ({len(self.unmapped)}):")
        lines.append(group_names(m.source for m in self.unmapped) if self.unmapped else "  (none)")
        lines.append(f"missing ({len(self.missing)}):")
        lines.append(group_names(self.missing) if self.missing else "  (none)")
        if self.notes:
            lines.append("assumptions and notes:")
            lines += [f"  - {n}" for n in self.notes]
        return "\n".join(lines)


def _read_config(llava_dir: Path) -> dict:
    f = llava_dir / "config.json"
    if not f.is_file():
        raise LlavaImportError(
            f"{llava_dir}: no config.json; a LLaVA-convention checkpoint has config.json with the LLM's "
            "fields plus mm_* fields (mm_vision_tower, mm_projector_type, ...)"
        )
    try:
        cfg = json.loads(f.read_text())
    except ValueError as e:
        raise LlavaImportError(f"{f}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict) or not (cfg.get("mm_vision_tower") or cfg.get("vision_tower")):
        raise LlavaImportError(f"{f}: no mm_vision_tower field; not a LLaVA-convention multimodal checkpoint")
    return cfg


def _local_dir(value: str | None, llava_dir: Path) -> Path | None:
    if not value:
        return None
    for p in (Path(value).expanduser(), llava_dir / value):
        if p.is_dir():
            return p
    return None


def _has_tokenizer(d: Path | None) -> bool:
    return d is not None and any(
        (d / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")
    )


def plan_import(
    llava_dir: str | Path,
    *,
    allow_pickle: bool = False,
    vision_dir: str | Path | None = None,
    base_dir: str | Path | None = None,
) -> ImportPlan:
    """Read config and tensor names (no weights) and decide the whole import."""
    d = Path(llava_dir)
    if not d.is_dir():
        raise LlavaImportError(f"{d}: not a directory")
    for p in [*d.glob("*.bin"), *d.glob("*.safetensors")]:
        refuse_moe_adapter(p)  # by name, before reading a pickle
    cfg = _read_config(d)
    notes: list[str] = []
    store = TensorStore()
    if _add_dir(store, d, "checkpoint", allow_pickle) == 0 and find_adapter(d) is None:
        raise LlavaImportError(f"{d}: no weights (*.safetensors, or *.bin with --allow-pickle)")
    refuse_moe_adapter(d, None, store.entries)

    adapter_dir = find_adapter(d)
    adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text()) if adapter_dir else {}
    # The LLM: in the checkpoint, or (LLaVA LoRA releases) in a local base directory.
    base = Path(base_dir) if base_dir is not None else None
    if (
        base is None
        and not store.has_prefix("model.layers.")
        and not store.has_prefix("model.language_model.")
    ):
        base = _local_dir(adapter_cfg.get("base_model_name_or_path"), d)
    if base is not None:
        if not base.is_dir():
            raise LlavaImportError(f"{base}: base LLM directory not found")
        _add_dir(store, base, "base", allow_pickle)
        notes.append(
            f"LLM weights from the base directory {base}; the checkpoint's own tensors take precedence"
        )
    # The tower: in the checkpoint, or in a local SigLIP directory.
    tower_name = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    tower_dir = Path(vision_dir) if vision_dir is not None else _local_dir(tower_name, d)
    if vision_dir is not None and not tower_dir.is_dir():
        raise LlavaImportError(f"{tower_dir}: vision tower directory not found")
    if tower_dir is not None and not store.has_prefix(TOWER):
        _add_dir(store, tower_dir, "vision", allow_pickle)
        notes.append(f"vision tower weights from {tower_dir}")
    adapter = load_adapter(adapter_dir, store, allow_pickle) if adapter_dir is not None else None
    qwen_visual = next((k for k in store.entries if (r := map_key(k)[1]) and r.part == "qwen_visual"), None)
    if qwen_visual and not store.has_prefix(TOWER + "embeddings."):
        raise LlavaImportError(
            f"{d}: {qwen_visual} belongs to Qwen2.5-VL's own vision encoder and the checkpoint has no SigLIP "
            "tower; EyecareGPT sees through SigLIP + LDC, so this is not an EyecareGPT checkpoint"
        )

    tokenizer_dir = next((p for p in (d, base) if _has_tokenizer(p)), None)
    if tokenizer_dir is None:
        raise LlavaImportError(
            f"{d}: no tokenizer files (tokenizer.json / tokenizer.model) here or in the base LLM"
        )
    tokenizer = _load_tokenizer(tokenizer_dir)
    try:
        config, tied = _build_config(cfg, store, tower_dir, tokenizer, notes)
    except ValueError as e:
        raise LlavaImportError(f"{d / 'config.json'}: {e}") from e
    rows = config.text_config.vocab_size
    beyond = sorted((i, t) for t, i in tokenizer.get_vocab().items() if i >= rows)
    if beyond:
        raise LlavaImportError(
            f"{tokenizer_dir}: tokens {[t for _, t in beyond[:8]]} have ids beyond the LLM's {rows} embedding rows "
            "(LLaVA adds <image> to the tokenizer only with mm_use_im_patch_token); such ids can never be embedded"
        )

    from accelerate import init_empty_weights

    with init_empty_weights():
        skeleton = EyecareGPTForConditionalGeneration(config)
    targets = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    used = config.vision_config.num_hidden_layers
    mappings, mismatched, fed = [], [], set()
    for name in sorted(store.entries):
        target, rule = map_key(name)
        if rule is None:
            mappings.append(KeyMapping(name, None, None, "no rule of the key table matches"))
        elif target is None:
            mappings.append(KeyMapping(name, None, rule, rule.why))
        elif (m := re.fullmatch(r"vision_tower\.encoder\.layers\.(\d+)\..+", target)) and int(
            m.group(1)
        ) >= used:
            why = f"SigLIP block {m.group(1)} is past hidden state {used}, the deepest the connector reads"
            mappings.append(KeyMapping(name, None, rule, why))
        elif target not in targets:
            mappings.append(KeyMapping(name, None, None, f"EyecareGPT has no tensor {target}"))
        else:
            shape = store.entries[name].shape
            if shape != targets[target]:
                mismatched.append(f"{name} {list(shape)} -> {target} expects {list(targets[target])}")
            mappings.append(KeyMapping(name, target, rule, ""))
            fed.add(target)
    if adapter is not None:
        orphans = [k for k in adapter.deltas if k not in store.entries]
        if orphans:
            raise LlavaImportError(
                f"{adapter.path}: LoRA targets with no base tensor:\n" + group_names(orphans)
            )
        for k, deltas in adapter.deltas.items():
            for delta in deltas:
                if delta.shape != store.entries[k].shape:
                    mismatched.append(
                        f"LoRA update of {k} {list(delta.shape)} vs {list(store.entries[k].shape)}"
                    )
    missing = [k for k in targets if k not in fed and not (tied and k == "language_model.lm_head.weight")]
    return ImportPlan(
        d, config, store, mappings, missing, mismatched, adapter, tokenizer, tokenizer_dir, notes, tied
    )


def _build_config(
    cfg: dict, store: TensorStore, tower_dir: Path | None, tokenizer, notes: list[str]
) -> tuple[EyecareGPTConfig, bool]:
    projector = cfg.get("mm_projector_type")
    if projector is None and store.has_prefix("model.mm_projector.2."):
        projector = "mlp2x_gelu"
        notes.append("mm_projector_type absent: the projector tensors are Linear-GELU-Linear (mlp2x_gelu)")
    if projector != "mlp2x_gelu":
        raise ValueError(
            f"mm_projector_type {projector!r}: EyecareGPT's projector is mlp2x_gelu (Linear-GELU-Linear); "
            "other projectors are not part of the exported vision graph"
        )
    merge = cfg.get("mm_patch_merge_type", "flat")
    if merge != "spatial_unpad":
        raise ValueError(
            f"mm_patch_merge_type {merge!r}: eyecare-edge's layout is LLaVA-NeXT's spatial_unpad (unpadded "
            "tile grid with an image_newline after each row); other merges give a different token sequence"
        )
    anyres_max = parse_anyres_max(cfg.get("image_aspect_ratio"))
    tower = resolve_tower(cfg, store, tower_dir, notes)
    kind = connector_type(cfg, store, tower.hidden_size, notes)
    spec = resolve_layers(cfg, tower, store, kind, notes)
    vision = SiglipVisionConfig(
        **{k: getattr(tower, k) for k in _SIGLIP_FIELDS},
        num_hidden_layers=spec.used_layers,
        vision_use_head=False,
    )

    llm_type = detect_llm_type(cfg, store.entries)
    embed = store.entries.get("model.embed_tokens.weight") or store.entries.get(
        "model.language_model.embed_tokens.weight"
    )
    text = llm_config(cfg, llm_type, embed.shape[0] if embed else None, notes)
    template = LLM_TYPES[llm_type][1]
    if llm_type == "llama" and "<|im_start|>" not in tokenizer.get_vocab():
        raise ValueError(
            "a Llama LLM without ChatML tokens: LLaVA-Llama checkpoints use Vicuna/Llama-3 conversation "
            "formats, which eyecare-edge's prompts do not implement (phi3_instruct, qwen_2, chatml)"
        )
    pinpoints = cfg.get("image_grid_pinpoints")
    if pinpoints is None:
        raise ValueError("image_grid_pinpoints is absent; anyres needs the candidate canvases")
    pre = PreprocessConfig(
        tile_size=tower.image_size,
        patch_size=tower.patch_size,
        pinpoints=parse_pinpoints(pinpoints, tower.image_size),
        anyres_max=anyres_max,
    )
    config = EyecareGPTConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_INDEX,
        ldc_fine_layers=list(spec.fine),
        ldc_coarse_layers=list(spec.coarse),
        ldc_last_layer=spec.select,
        projector_type="mlp2x_gelu",
        projector_hidden_act="gelu",
        preprocess=pre.to_dict(),
        chat_template_name=template,
    )
    notes.append(
        f"tower: {spec.stored_layers} stored blocks of {tower.num_hidden_layers}; connector {kind} reads "
        f"h[{spec.select}]"
        + (f", fine {list(spec.fine)}, coarse {list(spec.coarse)}" if spec.fine else "")
        + f"; our tower keeps {spec.used_layers} blocks"
    )
    tied = bool(getattr(text, "tie_word_embeddings", False)) and "lm_head.weight" not in store.entries
    return config, tied


# --------------------------------------------------------------------------------------------
def _materialize_missing(model: nn.Module, missing: list[str], dtype: torch.dtype) -> None:
    """Give tensors no source fed their fresh-model initialisation (only with allow_missing)."""
    owners: dict[str, list[str]] = {}
    for name in missing:
        owner, _, attr = name.rpartition(".")
        owners.setdefault(owner, []).append(attr)
    for owner_name, attrs in owners.items():
        owner = model.get_submodule(owner_name) if owner_name else model
        kept = {n: p for n, p in owner.named_parameters(recurse=False) if n not in attrs}
        for attr in attrs:
            old = getattr(owner, attr)
            setattr(
                owner,
                attr,
                nn.Parameter(torch.empty(old.shape, dtype=dtype), requires_grad=old.requires_grad),
            )
        model._init_weights(owner)
        for n, p in kept.items():
            setattr(owner, n, p)


def _load_tokenizer(src: Path):
    """The tokenizer alone: files copied aside so a LLaVA config.json (model_type llava_*, unknown to
    transformers) next to them cannot get in the way."""
    with tempfile.TemporaryDirectory() as tmp:
        for f in _TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy(src / f, Path(tmp) / f)
        try:
            return AutoTokenizer.from_pretrained(tmp)
        except Exception as e:  # tokenizers raise many types for bad files
            raise LlavaImportError(f"{src}: cannot load the tokenizer ({e})") from e


def import_llava(
    llava_dir: str | Path,
    out_dir: str | Path,
    *,
    dry_run: bool = False,
    allow_pickle: bool = False,
    allow_missing: bool = False,
    dtype: str = "float32",
    echo: Callable[[str], object] = print,
    vision_dir: str | Path | None = None,
    base_dir: str | Path | None = None,
) -> Path | None:
    """Import a LLaVA-convention checkpoint into an EyecareGPT checkpoint at `out_dir`.

    Returns the checkpoint path, or None for a dry run (which prints the mapping and the resulting
    config, writes nothing, and still raises when the import would fail). `vision_dir`/`base_dir` supply a SigLIP tower or base LLM that the
    checkpoint leaves out. Raises `LlavaImportError` with a message naming files and tensors.
    """
    from eyecare_edge.training.checkpoint import _dtype, save_checkpoint

    plan = plan_import(llava_dir, allow_pickle=allow_pickle, vision_dir=vision_dir, base_dir=base_dir)
    problem = plan.problems(allow_missing)
    if dry_run:
        echo(plan.report())
        echo("resulting config:")
        echo(json.dumps(plan.config.to_dict(), indent=2, sort_keys=True, default=str))
        if problem:  # a dry run that finds the import would fail exits like the import would
            raise LlavaImportError(problem)
        return None
    if problem:
        raise LlavaImportError(problem)
    tdtype = _dtype(dtype)
    tokenizer = plan.tokenizer
    if tokenizer.chat_template is None:
        tokenizer.chat_template = JINJA_TEMPLATES[plan.config.chat_template_name]

    from accelerate import init_empty_weights

    with init_empty_weights():
        model = EyecareGPTForConditionalGeneration(plan.config)
    state = {}
    for m in plan.mapped:
        t = plan.store.load(m.source)
        if plan.adapter is not None:
            t = plan.adapter.apply(m.source, t)
        state[m.target] = t.to(tdtype).contiguous()
    model.load_state_dict(state, strict=False, assign=True)
    del state
    if plan.missing:
        _materialize_missing(model, plan.missing, tdtype)
        echo(f"initialised {len(plan.missing)} missing tensors (--allow-missing)")
    if plan.tied:
        model.language_model.tie_weights()
    model.config.dtype = tdtype
    model.eval()
    out = save_checkpoint(model, tokenizer, out_dir)
    echo(
        f"imported {len(plan.mapped)} tensors ({len(plan.dropped)} dropped on purpose"
        + (f", {len(plan.unmapped)} unmapped ignored" if plan.unmapped else "")
        + f") from {plan.llava_dir} into {out} [{plan.config.chat_template_name}, dtype {dtype}]"
    )
    for n in plan.notes:
        echo(f"  - {n}")
    return out


__all__ = [
    "LLAVA_KEY_TABLE",
    "ImportPlan",
    "LlavaImportError",
    "import_llava",
    "parse_pinpoints",
    "plan_import",
]
