"""Planning a LLaVA import: config and tensor names (no weights) -> the whole decision.

Every source tensor goes through the key table (`llava_keys`) to a target tensor, or is dropped for
a documented reason, or is *unmapped*; every target tensor must be fed. `ImportPlan` holds the
outcome, says what stops the import (`problems`) and prints the mapping (`report`).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from eyecare_edge.training.config import EyecareGPTConfig
from eyecare_edge.training.llava_config import build_config, read_config
from eyecare_edge.training.llava_keys import (
    TOWER,
    KeyMapping,
    format_table,
    group_names,
    map_key,
    summarize,
    summarize_dropped,
)
from eyecare_edge.training.llava_lora import LoraAdapter, find_adapter, load_adapter, refuse_moe_adapter
from eyecare_edge.training.llava_tensors import LlavaImportError, TensorStore, add_dir
from eyecare_edge.training.modeling import EyecareGPTForConditionalGeneration
from transformers import AutoTokenizer

_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)  # fmt: skip


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
    cfg = read_config(d)
    notes: list[str] = []
    store = TensorStore()
    if add_dir(store, d, "checkpoint", allow_pickle) == 0 and find_adapter(d) is None:
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
        add_dir(store, base, "base", allow_pickle)
        notes.append(
            f"LLM weights from the base directory {base}; the checkpoint's own tensors take precedence"
        )
    # The tower: in the checkpoint, or in a local SigLIP directory.
    tower_name = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    tower_dir = Path(vision_dir) if vision_dir is not None else _local_dir(tower_name, d)
    if vision_dir is not None and not tower_dir.is_dir():
        raise LlavaImportError(f"{tower_dir}: vision tower directory not found")
    if tower_dir is not None and not store.has_prefix(TOWER):
        add_dir(store, tower_dir, "vision", allow_pickle)
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
        config, tied = build_config(cfg, store, tower_dir, tokenizer, notes)
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
