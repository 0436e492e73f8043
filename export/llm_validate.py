"""GGUF vs torch: does the exported LLM compute what the checkpoint computes?

Probes are fixed prompts rendered with the checkpoint's chat template: plain text, and one with
an image whose visual tokens (from the torch vision path) are injected as embeddings, exactly as
the runtime injects them. Torch greedily continues each probe for a few tokens; llama.cpp is then
teacher-forced along the same tokens, and the next-token logits are compared at every step.

The torch side is computed once (`build_probes`) and kept as numpy, so the torch model can be
freed before llama.cpp loads a multi-GB GGUF next to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eyecare_edge import formats
from eyecare_edge.llm import LlamaCppLM, LLMOptions
from eyecare_edge.preprocess import preprocess_images
from eyecare_edge.prompts import (
    IMAGE_PLACEHOLDER,
    Message,
    get_template,
    render,
    strip_special_whitespace,
    with_image_placeholders,
)

TEXT_QUESTIONS = (
    "What are the typical signs of diabetic retinopathy on a fundus photograph?",
    "Which eye is shown?\nA. Right eye (OD)\nB. Left eye (OS)\nAnswer with the option's letter from the given choices directly.",
)
IMAGE_QUESTION = "Describe the findings in this image."

# Tolerances per GGUF type, from the formats table. F32 must reproduce torch (F32 KV, no flash
# attention: ~1e-6); 16-bit types and Q8_0 must keep the model's choices; 4/5/6-bit types are
# bounded loosely (4-bit LLMs lose ~1-1.5 benchmark points; see ANCHORS.md) and judged by the
# bench instead.
LLM_TOLERANCES: dict[str, dict[str, float]] = formats.tolerances("llm")
_UPPER = {"max_abs", "max_abs_rel", "kl_mean", "kl_max"}


@dataclass
class Probe:
    """One prompt: its pieces (token ids or visual rows), the torch continuation and logits."""

    name: str
    parts: list[np.ndarray]  # int64 token ids, or float32 [n, d] visual rows
    continuation: list[int]
    logits: np.ndarray  # [len(continuation) + 1, vocab]: next-token logits from the last prompt position on

    @property
    def n_positions(self) -> int:
        return sum(len(p) for p in self.parts) + len(self.continuation)


def _pieces(template_name: str, system: str | None, question: str, n_images: int) -> list[str]:
    prompt = render(
        get_template(template_name),
        [Message("user", with_image_placeholders(question, n_images))],
        system=system,
    )
    return prompt.split(IMAGE_PLACEHOLDER)


@torch.no_grad()
def build_probes(model, tokenizer, images: Sequence[np.ndarray], *, n_continue: int = 6) -> list[Probe]:
    """Torch reference for text probes and one probe per image in `images` (RGB uint8)."""
    cfg = model.config
    system = cfg.system_prompt
    embed = model.get_input_embeddings()
    specs: list[tuple[str, str, list[np.ndarray]]] = [
        (f"text{i}", q, []) for i, q in enumerate(TEXT_QUESTIONS)
    ]
    specs += [(f"image{i}", IMAGE_QUESTION, [im]) for i, im in enumerate(images)]
    probes = []
    for name, question, imgs in specs:
        texts = _pieces(cfg.chat_template_name, system, question, len(imgs))
        visual: list[torch.Tensor] = []
        if imgs:
            pre = preprocess_images(imgs, cfg.preprocess_config())
            pixel = torch.from_numpy(np.concatenate([p.tiles for p in pre]))
            sizes = torch.tensor([list(p.plan.image_size) for p in pre])
            n_tiles = torch.tensor([p.plan.n_tiles for p in pre])
            visual = model.image_features(pixel, sizes, n_tiles)
        parts: list[np.ndarray] = []
        rows: list[torch.Tensor] = []
        for i, text in enumerate(texts):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            if ids:
                parts.append(np.asarray(ids, dtype=np.int64))
                rows.append(embed(torch.tensor(ids)))
            if i < len(visual):
                parts.append(visual[i].float().numpy())
                rows.append(visual[i].to(rows[0].dtype if rows else visual[i].dtype))
        prompt = torch.cat(rows, dim=0)[None]
        new = model.language_model.generate(
            inputs_embeds=prompt,
            attention_mask=torch.ones(prompt.shape[:2], dtype=torch.long),
            max_new_tokens=n_continue,
            do_sample=False,
            min_new_tokens=n_continue,
        )[0].tolist()
        full = torch.cat([prompt, embed(torch.tensor([new]))], dim=1)
        logits = model.language_model(inputs_embeds=full).logits[0].float()
        n = prompt.shape[1]
        probes.append(Probe(name, parts, new, logits[n - 1 : n + len(new)].numpy()))
    return probes


def special_whitespace(tokenizer) -> tuple[list[str], list[str]]:
    """(rstrip, lstrip) special tokens of an HF tokenizer: those that swallow adjacent whitespace."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    rstrip = sorted({t.content for t in added.values() if getattr(t, "rstrip", False)})
    lstrip = sorted({t.content for t in added.values() if getattr(t, "lstrip", False)})
    return rstrip, lstrip


def tokenizer_agreement(gguf_path: str | Path, tokenizer, texts: Sequence[str]) -> list[str]:
    """Texts the runtime (GGUF tokenizer after `strip_special_whitespace`) splits differently
    from the checkpoint's tokenizer (empty = all agree)."""
    rstrip, lstrip = special_whitespace(tokenizer)
    with LlamaCppLM(gguf_path, LLMOptions(n_ctx=256, n_threads=1)) as lm:
        return [
            t
            for t in texts
            if lm.tokenize(strip_special_whitespace(t, rstrip, lstrip))
            != tokenizer(t, add_special_tokens=False)["input_ids"]
        ]


def gguf_logits(
    gguf_path: str | Path, probes: Sequence[Probe], *, n_threads: int | None = None
) -> list[np.ndarray]:
    """llama.cpp logits along each probe (F32 KV cache, flash attention off: the exact settings)."""
    n_ctx = max(p.n_positions for p in probes) + 16
    opts = LLMOptions(
        n_ctx=n_ctx, n_batch=512, n_ubatch=512, kv_type="f32", flash_attn=False, n_threads=n_threads
    )
    out = []
    with LlamaCppLM(gguf_path, opts) as lm:
        for p in probes:
            lm.reset()
            for part in p.parts:
                if part.dtype == np.int64:
                    lm.eval_tokens(part.tolist())
                else:
                    lm.eval_embeddings(part)
            steps = [lm.last_logits()]
            for t in p.continuation:
                lm.eval_tokens([t])
                steps.append(lm.last_logits())
            out.append(np.stack(steps))
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict[str, float]:
    ref = np.concatenate(reference)
    cand = np.concatenate(candidate)
    # the GGUF vocabulary may be padded past the tokenizer: compare the model's own rows
    v = min(ref.shape[1], cand.shape[1])
    ref, cand = ref[:, :v], cand[:, :v]
    lp, lq = _log_softmax(ref), _log_softmax(cand)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    max_abs = float(np.abs(ref - cand).max())
    return {
        "positions": int(ref.shape[0]),
        "max_abs": max_abs,
        "max_abs_rel": max_abs / max(1.0, float(np.abs(ref).max())),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1": float((ref.argmax(-1) == cand.argmax(-1)).mean()),
    }


def check(
    figures: dict, qtype: str, tolerances: dict[str, dict[str, float]] | None = None
) -> tuple[bool, list[str]]:
    limits = {**LLM_TOLERANCES, **(tolerances or {})}.get(qtype, dict(formats.LOW_BIT_LLM_TOLERANCE))
    failed = []
    for metric, bound in limits.items():
        value = figures[metric]
        ok = value <= bound if metric in _UPPER else value >= bound
        if not ok:
            failed.append(f"{metric} {value:.4g} {'>' if metric in _UPPER else '<'} {bound:g}")
    figures["check"] = ", ".join(f"{m} {'<=' if m in _UPPER else '>='} {b:g}" for m, b in limits.items())
    return not failed, failed


def validate_gguf(
    gguf_path: str | Path, qtype: str, probes: Sequence[Probe], *, n_threads: int | None = None
) -> dict:
    figures = compare_logits([p.logits for p in probes], gguf_logits(gguf_path, probes, n_threads=n_threads))
    passed, failed = check(figures, qtype)
    figures["passed"] = passed
    figures["failed"] = failed
    return figures


def probe_texts(cfg) -> list[str]:
    """The text pieces of every probe: the GGUF's tokenizer must split them as the checkpoint's does."""
    texts: list[str] = []
    for q in TEXT_QUESTIONS:
        texts += _pieces(cfg.chat_template_name, cfg.system_prompt, q, 0)
    texts += _pieces(cfg.chat_template_name, cfg.system_prompt, IMAGE_QUESTION, 1)
    return [t for t in texts if t]
