"""What each training stage trains: `align` (connector) and `sft` (connector + LLM, full or LoRA).

LLaVA's two-stage recipe, which EyecareGPT follows:

- `align`: only the Layer-wise Dense Connector's projector and `image_newline` learn; the vision
  tower and the LLM stay frozen, so the connector learns to map vision features into the LLM's
  embedding space without disturbing either;
- `sft`: connector + LLM learn (all LLM weights, or LoRA adapters on its linear layers); the
  vision tower stays frozen.

`train_vision` unfreezes the tower in either stage; the `tiny` preset needs it because its tower
starts random.

LoRA adapters are injected into the LLM in place (no `PeftModel` wrapper), so the Trainer saves
and resumes full state dicts like for any model, and `merge_lora_state_dict` folds them into
plain weights before the final save: export always sees an ordinary checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

STAGES = ("align", "sft")

# The linear layers of a decoder block, by the names Llama/Qwen2 (separate) and Phi-3 (fused) use.
LORA_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
)
ADAPTER = "default"


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float | None = None  # None: 2 * r (LLaVA's r=128, alpha=256 ratio)
    dropout: float = 0.05

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.r


@dataclass(frozen=True)
class StagePlan:
    """What is trainable, for the log line and the tests."""

    stage: str
    trainable: int
    total: int
    parts: tuple[str, ...]
    lora_scaling: dict[str, float]

    def describe(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return f"{self.stage}: training {', '.join(self.parts)} ({self.trainable:,} of {self.total:,} parameters, {share:.1f}%)"


def inject_lora(language_model: torch.nn.Module, settings: LoraSettings) -> dict[str, float]:
    """Put LoRA adapters on the LLM's decoder linear layers (in place); returns each adapted
    module's name (relative to `language_model`) -> its scaling (alpha / r)."""
    present = {name.rsplit(".", 1)[-1] for name, _ in language_model.named_modules()}
    targets = [t for t in LORA_TARGETS if t in present]
    if not targets:
        raise ValueError(f"no LoRA target layers ({', '.join(LORA_TARGETS)}) found in the LLM")
    cfg = LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
    )
    inject_adapter_in_model(cfg, language_model, adapter_name=ADAPTER)
    return {
        name: float(m.scaling[ADAPTER])
        for name, m in language_model.named_modules()
        if isinstance(m, LoraLayer) and ADAPTER in m.scaling
    }


def configure_stage(
    model: torch.nn.Module,
    stage: str,
    *,
    train_vision: bool = False,
    lora: LoraSettings | None = None,
) -> StagePlan:
    """Freeze/unfreeze `model` (an EyecareGPTForConditionalGeneration) for `stage`, in place."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    if lora is not None and stage != "sft":
        raise ValueError("LoRA applies to the LLM, which only the sft stage trains")
    model.requires_grad_(False)
    model.connector.requires_grad_(True)
    model.image_newline.requires_grad_(True)
    parts = ["connector", "image_newline"]
    if train_vision:
        model.vision_tower.requires_grad_(True)
        parts.append("vision tower")
    scaling: dict[str, float] = {}
    if stage == "sft":
        if lora is None:
            model.language_model.requires_grad_(True)
            parts.append("LLM")
        else:
            scaling = {f"language_model.{k}": v for k, v in inject_lora(model.language_model, lora).items()}
            for name, p in model.language_model.named_parameters():
                p.requires_grad_("lora_" in name)
            parts.append(f"LLM LoRA r={lora.r}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return StagePlan(stage, trainable, total, tuple(parts), scaling)


def merge_lora_state_dict(
    state: Mapping[str, torch.Tensor], scaling: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """A state dict with LoRA adapters folded into plain weights: W + scaling * B @ A.

    Works on any full state dict (a plain model, DDP's module, DeepSpeed's gathered ZeRO-3
    weights); `scaling` maps each adapted module's name to alpha / r. Keys come out as the
    model without adapters names them.
    """
    out: dict[str, torch.Tensor] = {}
    a_suffix, b_suffix = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"
    adapted = {k[: -len(a_suffix)] for k in state if k.endswith(a_suffix)}
    missing = adapted - set(scaling)
    if missing:
        raise ValueError(f"no LoRA scaling known for {sorted(missing)[:3]}")
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            prefix, leaf = key.split(".base_layer.", 1)
            plain = f"{prefix}.{leaf}"
            if leaf == "weight" and prefix in adapted:
                a = state[prefix + a_suffix].float()
                b = state[prefix + b_suffix].float()
                value = (value.float() + scaling[prefix] * (b @ a)).to(value.dtype)
            out[plain] = value
        else:
            out[key] = value
    return out
