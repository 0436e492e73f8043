"""Run a GGUF in llama.cpp for parity checks: tokenize text, get logits at every position.

Export validation compares these against the torch model. The settings default to the ones
under which llama.cpp reproduces transformers to ~1e-6 in F32: F32 K/V cache and flash
attention off (an F16 cache or flash attention alone adds ~1e-3).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import llama_cpp
import numpy as np


def _model_path(path: str | Path) -> str:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"GGUF not found: {file}")
    return str(file)


def llama_cpp_tokenize(
    path: str | Path, texts: Sequence[str], *, add_bos: bool = False, special: bool = True
) -> list[list[int]]:
    """Token ids llama.cpp gives each text with the GGUF's own tokenizer (vocabulary only is loaded).

    `special=True` matches special-token text like `<|im_start|>` as one token, as HF does.
    """
    with llama_cpp._utils.suppress_stdout_stderr(disable=False):  # it logs a context warning even when quiet
        llm = llama_cpp.Llama(_model_path(path), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special) for text in texts]
    finally:
        llm.close()


def llama_cpp_logits(
    path: str | Path,
    prompts: Sequence[Sequence[int]],
    *,
    n_ctx: int | None = None,
    f32_kv: bool = True,
    flash_attn: bool = False,
    n_threads: int | None = None,
) -> list[np.ndarray]:
    """Logits [len(prompt), n_vocab] (float32) for every position of each prompt, each from an empty cache.

    `n_ctx` defaults to the longest prompt rounded up to 32. For Phi-3.5 LongRoPE, llama.cpp picks
    short or long factors by `n_ctx` rounded up to a multiple of 256 (HF by sequence length): keep
    that <= the original context (4096) to compare with HF on prompts shorter than it.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("llama_cpp_logits needs non-empty prompts")
    longest = max(len(p) for p in prompts)
    ctx = n_ctx or ((longest + 31) // 32) * 32
    if longest > ctx:
        raise ValueError(f"prompt of {longest} tokens does not fit n_ctx={ctx}")
    kv_type = llama_cpp.GGML_TYPE_F32 if f32_kv else llama_cpp.GGML_TYPE_F16
    llm = llama_cpp.Llama(
        _model_path(path),
        n_ctx=ctx,
        n_batch=ctx,
        n_ubatch=ctx,
        logits_all=True,
        type_k=kv_type,
        type_v=kv_type,
        flash_attn=flash_attn,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        verbose=False,
    )
    try:
        out = []
        for prompt in prompts:
            llm.reset()
            llm.eval(list(prompt))
            out.append(np.array(llm.scores[: len(prompt)], dtype=np.float32, copy=True))
        return out
    finally:
        llm.close()


def top1_agreement(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Fraction of positions (over all prompts) where both logit sets pick the same argmax token."""
    hits = [np.argmax(r, -1) == np.argmax(c, -1) for r, c in zip(reference, candidate, strict=True)]
    return float(np.mean(np.concatenate(hits)))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def mean_kl(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Mean KL(reference || candidate) of the next-token distributions over all positions (nats)."""
    values = []
    for r, c in zip(reference, candidate, strict=True):
        lr, lc = _log_softmax(r), _log_softmax(c)
        values.append((np.exp(lr) * (lr - lc)).sum(-1))
    return float(np.mean(np.concatenate(values)))


def max_abs_diff(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Largest |reference - candidate| over all prompts and positions."""
    return float(max(np.abs(r - c).max() for r, c in zip(reference, candidate, strict=True)))
