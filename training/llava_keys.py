"""The key table: LLaVA-convention tensor names -> EyecareGPT tensor names, as data.

LLaVA-family code bases (LLaVA-1.5/NeXT/OneVision, Dense Connector, HealthGPT) keep one flat
state dict: the LLM's own `*ForCausalLM` names (`model.embed_tokens`, `model.layers.N.*`,
`model.norm`, `lm_head`) with the multimodal parts hung under `model.`:
`model.vision_tower.vision_tower.vision_model.*` (a `SiglipVisionModel` inside LLaVA's tower
wrapper), `model.mm_projector.{0,2}` (Linear-GELU-Linear) and `model.image_newline`.

Each `KeyRule` says where one family of source tensors goes, or why it is dropped on purpose.
Rules are tried in order and the first full match wins, so the LLM catch-all comes last. A source
tensor that no rule maps to an existing EyecareGPT tensor is *unmapped* and fails the import: the
importer never silently ignores a weight it does not understand.

Source names are first normalised (`normalize_key`): PEFT-wrapped state dicts (`base_model.model.`,
LLaVA's `non_lora_trainables.bin`, HealthGPT) lose that prefix, and a stand-alone SigLIP directory's
`vision_model.*` names are placed under LLaVA's tower prefix, so one table serves every source.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

TOWER = "model.vision_tower.vision_tower.vision_model."


@dataclass(frozen=True)
class KeyRule:
    """One family of LLaVA tensor names and where it lands in EyecareGPT.

    `source` is a regular expression matched against the whole (normalised) name; `target` is its
    replacement template (`\\1` = first group), or None for tensors dropped on purpose, with `why`
    saying why that is correct. `part` groups rules for reports (vision, connector, newline, llm).
    """

    source: str
    target: str | None
    part: str
    why: str

    def match(self, key: str) -> re.Match | None:
        return re.fullmatch(self.source, key)


_T = re.escape(TOWER)

LLAVA_KEY_TABLE: tuple[KeyRule, ...] = (
    KeyRule(
        _T + r"embeddings\.(.+)",
        r"vision_tower.embeddings.\1",
        "vision",
        "SigLIP patch and position embeddings (hidden state 0)",
    ),
    KeyRule(
        _T + r"encoder\.layers\.(\d+)\.(.+)",
        r"vision_tower.encoder.layers.\1.\2",
        "vision",
        "SigLIP blocks; blocks past the deepest layer the connector reads are dropped "
        "(LLaVA's SigLIP tower deletes its last block)",
    ),
    KeyRule(
        _T + r"post_layernorm\.(weight|bias)",
        None,
        "vision",
        "LLaVA reads hidden_states (taken before SigLIP's final LayerNorm), so the LayerNorm never runs",
    ),
    KeyRule(
        _T + r"head\..+",
        None,
        "vision",
        "SigLIP's attention-pooling head; LLaVA replaces it with Identity",
    ),
    KeyRule(
        r"model\.vision_tower\.vision_tower\.(?:text_model\..+|logit_scale|logit_bias)",
        None,
        "vision",
        "SigLIP's text tower and contrastive logit scale (from a full SiglipModel directory) are not "
        "part of a VLM",
    ),
    KeyRule(
        r"model\.mm_projector\.([02])\.(weight|bias)",
        r"connector.mm_projector.\1.\2",
        "connector",
        "mlp2x_gelu projector: Linear(mm_hidden_size -> d), GELU, Linear(d -> d)",
    ),
    KeyRule(r"model\.image_newline", "image_newline", "newline", "the learned end-of-row token of anyres"),
    KeyRule(r"lm_head\.weight", "language_model.lm_head.weight", "llm", "LLM output head"),
    KeyRule(
        r"model\.language_model\.(.+)",
        r"language_model.model.\1",
        "llm",
        "LLM body in transformers' newer Qwen2.5-VL layout (model.language_model.*)",
    ),
    KeyRule(
        r"(?:model\.)?visual\..+",
        None,
        "qwen_visual",
        "Qwen2.5-VL's own vision encoder; EyecareGPT sees through SigLIP + LDC instead "
        "(refused when the checkpoint has no SigLIP tower)",
    ),
    KeyRule(
        r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
        None,
        "llm",
        "rotary frequencies are a buffer recomputed from the config, not a weight",
    ),
    KeyRule(r"model\.(.+)", r"language_model.model.\1", "llm", "LLM body (embeddings, decoder layers, norm)"),
)

# PEFT wraps the model it adapts; its saved names carry these pieces, which the plain model lacks.
_PEFT_PREFIX = "base_model.model."
_SIGLIP_PARTS = ("embeddings.", "encoder.", "post_layernorm.", "head.")
_PEFT_INFIXES = (".base_layer.", ".modules_to_save.default.", ".original_module.")


def normalize_key(key: str, origin: str) -> str:
    """A stored tensor name -> the LLaVA-convention name the key table speaks.

    `origin` is "checkpoint", "base" (a plain HF causal LM: its names already are LLaVA's LLM
    names) or "vision" (a stand-alone SigLIP directory: `vision_model.*`, `text_model.*`).
    """
    if key.startswith(_PEFT_PREFIX):
        key = key[len(_PEFT_PREFIX) :]
    for infix in _PEFT_INFIXES:
        key = key.replace(infix, ".")
    if origin == "vision" and key.startswith(_SIGLIP_PARTS):
        key = "vision_model." + key  # transformers 5 saves SiglipVisionModel without this level
    if origin == "vision" and key.startswith(("vision_model.", "text_model.", "logit_")):
        return "model.vision_tower.vision_tower." + key
    if key.startswith("model.vision_tower.vision_tower.") and key[32:].startswith(_SIGLIP_PARTS):
        return "model.vision_tower.vision_tower.vision_model." + key[32:]
    return key


@dataclass(frozen=True)
class KeyMapping:
    """Where one source tensor goes: `target` (None when dropped) and the rule that decided it."""

    source: str
    target: str | None
    rule: KeyRule | None
    reason: str  # for dropped or unmapped tensors


def map_key(key: str, table: Iterable[KeyRule] = LLAVA_KEY_TABLE) -> tuple[str | None, KeyRule | None]:
    """(target name or None, matching rule or None) for one normalised source name."""
    for rule in table:
        m = rule.match(key)
        if m:
            return (m.expand(rule.target) if rule.target is not None else None), rule
    return None, None


def pattern_of(key: str) -> str:
    """A name with its layer numbers replaced by N, to summarise thousands of keys as a few lines."""
    return re.sub(r"\b(layers|blocks|h)\.\d+\.", r"\1.N.", key)


def summarize(mappings: Iterable[KeyMapping]) -> list[tuple[str, str, int]]:
    """(source pattern, target pattern or '(dropped: why)', count) rows in first-seen order."""
    counts: Counter[tuple[str, str]] = Counter()
    for m in mappings:
        target = pattern_of(m.target) if m.target is not None else f"(dropped: {m.reason})"
        counts[(pattern_of(m.source), target)] += 1
    return [(s, t, n) for (s, t), n in counts.items()]


def summarize_dropped(mappings: Iterable[KeyMapping]) -> list[tuple[str, str, int]]:
    """Dropped tensors grouped by reason: (common name prefix + '*', '(dropped: why)', count)."""
    groups: dict[str, list[str]] = {}
    for m in mappings:
        groups.setdefault(m.reason, []).append(pattern_of(m.source))
    rows = []
    for reason, names in groups.items():
        uniq = sorted(set(names))
        if len(uniq) == 1:
            label = uniq[0]
        else:
            parts = [n.split(".") for n in uniq]
            common = []
            for level in zip(*parts, strict=False):
                if len(set(level)) > 1:
                    break
                common.append(level[0])
            label = ".".join(common) + ".*"
        rows.append((label, f"(dropped: {reason})", len(names)))
    return rows


def format_table(rows: Iterable[tuple[str, str, int]]) -> str:
    rows = list(rows)
    if not rows:
        return "(none)"
    width = max(len(s) for s, _, _ in rows)
    return "\n".join(f"  {s:<{width}}  ->  {t}  [{n}]" for s, t, n in rows)


def key_table_markdown(table: Iterable[KeyRule] = LLAVA_KEY_TABLE) -> str:
    """The table as Markdown, for documentation."""
    lines = ["| LLaVA name (regex) | EyecareGPT name | why |", "|---|---|---|"]
    for r in table:
        target = f"`{r.target}`" if r.target is not None else "dropped"
        lines.append(f"| `{r.source}` | {target} | {r.why} |")
    return "\n".join(lines)


def group_names(names: Iterable[str], limit: int = 40) -> str:
    """A readable list of names for an error message: every name when there are few, else
    patterns with counts; at most `limit` lines."""
    names = sorted(names)
    if len(names) <= limit:
        return "\n".join(f"  {n}" for n in names)
    counts: Mapping[str, int] = Counter(pattern_of(n) for n in names)
    lines = [f"  {p}" + (f"  [{n}]" if n > 1 else "") for p, n in counts.items()]
    if len(lines) > limit:
        lines = [*lines[:limit], f"  ... and {len(lines) - limit} more patterns"]
    return "\n".join(lines)
