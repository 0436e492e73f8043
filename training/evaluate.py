"""Greedy answers from the PyTorch model, and closed-QA accuracy on a bench file.

`generate_answer` is the PyTorch reference the exported bundle must match: the prompt is rendered
exactly as the runtime renders it (`render` with the checkpoint's template and system prompt, one
`<image>` line per image before the question), images go through the one shared preprocessing,
and decoding is greedy until the template's end-of-turn token.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from eyecare_edge.training.encoding import encode_prompt

from eyecare_edge.images import load_image
from eyecare_edge.preprocess import preprocess_images
from eyecare_edge.prompts import Message, get_template, with_image_placeholders
from eyecare_edge.qa.answers import parse_choice
from eyecare_edge.qa.loaders import load_bench


@dataclass(frozen=True)
class PromptInputs:
    """Model inputs for one question (batch of one)."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_sizes: torch.Tensor | None
    image_n_tiles: torch.Tensor | None


def prompt_inputs(model, tokenizer, images_rgb: Sequence[np.ndarray], question: str) -> PromptInputs:
    """Tokens and tiles for asking `question` about `images_rgb`, as the runtime asks it."""
    cfg = model.config
    template = get_template(cfg.chat_template_name)
    pre = preprocess_images(list(images_rgb), cfg.preprocess_config())
    messages = [Message("user", with_image_placeholders(question, len(pre)))]
    ids = encode_prompt(
        messages,
        template,
        tokenizer,
        [p.plan.visual_tokens for p in pre],
        image_token_index=cfg.image_token_index,
        system=cfg.system_prompt,
    )
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    if not pre:
        return PromptInputs(input_ids, None, None, None)
    dtype = next(model.parameters()).dtype
    return PromptInputs(
        input_ids,
        torch.from_numpy(np.concatenate([p.tiles for p in pre], axis=0)).to(device=device, dtype=dtype),
        torch.tensor([p.plan.image_size for p in pre], dtype=torch.long, device=device),
        torch.tensor([p.plan.n_tiles for p in pre], dtype=torch.long, device=device),
    )


def stop_token_ids(tokenizer, template_name: str) -> list[int]:
    """Ids of the template's stop strings that are single tokens (end-of-turn, end-of-text)."""
    ids = []
    for s in get_template(template_name).stop_strings:
        tok = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(tok) == 1:
            ids.append(int(tok[0]))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut].strip()


@torch.no_grad()
def generate_answer(
    model,
    tokenizer,
    images_rgb: Sequence[np.ndarray],
    question: str,
    max_new_tokens: int = 256,
) -> str:
    """The model's greedy answer to `question` about RGB uint8 images (the PyTorch reference)."""
    was_training = model.training
    model.eval()
    try:
        inputs = prompt_inputs(model, tokenizer, images_rgb, question)
        stops = stop_token_ids(tokenizer, model.config.chat_template_name)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
        out = model.generate(
            inputs.input_ids,
            pixel_values=inputs.pixel_values,
            image_sizes=inputs.image_sizes,
            image_n_tiles=inputs.image_n_tiles,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=pad,
        )
    finally:
        model.train(was_training)
    text = tokenizer.decode(out[0].tolist(), skip_special_tokens=False)
    return cut_at_stop(text, get_template(model.config.chat_template_name).stop_strings)


def evaluate_closed_qa(
    model,
    tokenizer,
    bench_path: str | os.PathLike[str],
    limit: int | None = None,
    *,
    images_root: str | os.PathLike[str] | None = None,
    max_new_tokens: int = 16,
) -> dict[str, Any]:
    """Closed-QA accuracy of the PyTorch model on a bench file (JSONL or LLaVA JSON).

    Returns `{"accuracy", "n", "correct", "per_modality": {modality: {"accuracy", "n"}},
    "items": [{"id", "modality", "question", "answer", "output", "choice", "correct"}]}`; an
    answer that commits to no option counts as wrong.
    """
    records = [r for r in load_bench(bench_path, images_root=images_root) if r.task == "closed"]
    if limit is not None:
        records = records[:limit]
    images: dict[str, np.ndarray] = {}
    items = []
    for r in records:
        rgbs = []
        for p in r.images:
            if p not in images:
                images[p] = load_image(p).rgb
            rgbs.append(images[p])
        output = generate_answer(model, tokenizer, rgbs, r.prompt_text(), max_new_tokens=max_new_tokens)
        choice = parse_choice(output, r.options)
        items.append(
            {
                "id": r.id,
                "modality": r.modality,
                "question": r.question,
                "answer": r.answer,
                "output": output,
                "choice": choice,
                "correct": choice == r.answer,
            }
        )
    per: dict[str, dict[str, float]] = {}
    for m in sorted({it["modality"] for it in items}):
        sel = [it for it in items if it["modality"] == m]
        per[m] = {"accuracy": sum(it["correct"] for it in sel) / len(sel), "n": len(sel)}
    correct = sum(it["correct"] for it in items)
    return {
        "accuracy": correct / len(items) if items else 0.0,
        "n": len(items),
        "correct": correct,
        "per_modality": per,
        "items": items,
    }
