"""Settings of a LLaVA import: config.json (`mm_*` fields plus the LLM's own) -> our `EyecareGPTConfig`.

Anyres pinpoints and `anyres_max_N`, the LLM family and its chat template, the LLM's transformers
config, and the tower and connector (`llava_tower`); every assumption is appended to `notes`.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable
from pathlib import Path

from eyecare_edge.training.config import IMAGE_TOKEN_INDEX, EyecareGPTConfig
from eyecare_edge.training.llava_tensors import LlavaImportError, TensorStore
from eyecare_edge.training.llava_tower import SIGLIP_FIELDS, connector_type, resolve_layers, resolve_tower
from transformers import SiglipVisionConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from eyecare_edge.preprocess import PreprocessConfig

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


def read_config(llava_dir: Path) -> dict:
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


def build_config(
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
        **{k: getattr(tower, k) for k in SIGLIP_FIELDS},
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
