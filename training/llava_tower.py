"""The SigLIP tower of a LLaVA import: its config (from config.json, a local tower directory, the
known-towers table or the tensor shapes), which hidden states the connector reads, and the
connector's kind (plain, Dense Connector DCI or SCI)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from eyecare_edge.training.config import default_ldc_layers
from eyecare_edge.training.llava_keys import TOWER
from eyecare_edge.training.llava_tensors import TensorStore
from transformers import SiglipVisionConfig

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
# The SiglipVisionConfig fields taken over from a tower config (the depth is decided separately).
SIGLIP_FIELDS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_channels", "image_size", "patch_size",
    "hidden_act", "layer_norm_eps", "attention_dropout",
)  # fmt: skip


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
    keep = {*SIGLIP_FIELDS, "num_hidden_layers"}
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
