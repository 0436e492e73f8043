"""What a bundle's language model gets when it is loaded: which GGUF (`choose_llm`), which visual
token budget (`token_budget`) and how many context positions (`default_n_ctx`)."""

from __future__ import annotations

from eyecare_edge.bundle import BundleError, FileEntry, Manifest
from eyecare_edge.preprocess import PreprocessConfig
from eyecare_edge.reduce import TokenBudget, max_kept_tokens, parse_visual_tokens

# `llm="auto"`: the first of these the bundle holds (and export did not fail): Q4_K_M is the
# accuracy/speed point for CPUs and Jetsons (ANCHORS: ~1 benchmark point), then bigger files.
LLM_AUTO_ORDER = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0", "f16", "bf16", "f32")
# Positions kept free for the question and the answer when `n_ctx` is derived from the plan:
# the prompt's text (~100 tokens with a system prompt) and `ask`'s default 256 answer tokens, with
# room to spare. Every position costs KV memory (Phi-3.5, F16: 384 KiB, i.e. 192 MB for these 512
# at full depth), so it is not larger; a longer answer stops with "context_full", and `n_ctx=`
# (`--n-ctx`) gives more room.
TEXT_ROOM = 512
# Phi-3.5's LongRoPE switches factors at 4096 in HF but by allocated context in llama.cpp.
PHI3_MAX_CTX = 4096
# kv_type "auto" on the CPU: K in Q8_0, V in F16, no flash attention. A Q8_0 K is read by
# llama.cpp's quantized dot products, so it is faster as well as smaller; a quantized V needs the
# flash-attention kernel, which on the CPU slows prefill as the context grows (with a Q8_0 K too:
# 1457 vs 800 ms at n_ctx 1792). `perf`'s KV rows on the 2-core EPYC (AVX-512), eyecare-3.8b
# extrapolated to full depth, Q4_K_M, the HRF photo (TTFT s / decode tok/s / peak RSS GB):
#   n_ctx 1792 (25% pool, the default budget): q8_0/f16 21.6 / 9.0 / 3.74, F16 22.3 / 8.2 / 3.91,
#     F16 + flash 20.7 / 6.5 / 3.88, Q8_0 + flash 27.1 / 7.7 / 3.55;
#   n_ctx 2816 (50% pool): 38.4 / 7.1 / 4.10, F16 38.2 / 6.2 / 4.35, Q8_0 + flash 66.7 / 5.4 / 3.78;
#   n_ctx 4096 (every token): 79.8 / 5.5 / 4.58, F16 96.4 / 4.2 / 4.96, Q8_0 + flash 251 / 3.2 / 4.03.
# Q8_0 + flash attention is the smallest, but at the default budget it costs 25% more TTFT (0.35x
# full-token TTFT: that target missed instead). The demo model answered all 430 bench items (400
# closed, 30 open) word for word as with F16.
CPU_KV_CACHE = "q8_0/f16"
# n_ubatch on the CPU: llama.cpp's attention scratch without flash attention is n_ubatch x n_ctx x
# heads floats (117 MB at 512 x 1792 x 32). 256 lowered peak RSS by 55 MB at n_ctx 1792 and by
# 195 MB at 4096 (same probes), prefill within the run-to-run noise (848 vs 857 ms, 4.82 vs
# 5.34 s); 128 saved 21 MB more but prefilled 13% slower. On a GPU, n_batch (larger batches keep it busy).
CPU_UBATCH = 256


def choose_llm(manifest: Manifest, wanted: str) -> FileEntry:
    """The GGUF entry for `wanted` (a precision, or auto)."""
    have = manifest.precisions("llm", "gguf")
    if wanted != "auto":
        entry = manifest.find("llm", format="gguf", precision=wanted)
        if entry is None:
            raise BundleError(f"bundle has no {wanted} GGUF (it has: {', '.join(have) or 'none'})")
        return entry
    ok = [p for p in have if manifest.validation.get(f"llm_{p}", {}).get("passed", True)]
    for p in (*LLM_AUTO_ORDER, *ok):
        if p in ok:
            return manifest.find("llm", format="gguf", precision=p)  # type: ignore[return-value]
    raise BundleError(f"bundle has no usable GGUF (it has: {', '.join(have) or 'none'})")


def max_visual_tokens(config: PreprocessConfig) -> int:
    """An upper bound on one image's visual tokens under `config`: the global view, plus the
    largest allowed canvas's map, capped where anyres_max compression starts (a map is left
    alone up to a side ratio of 1.1, i.e. 1.21 x N tiles' worth of cells), plus row newlines."""
    n = config.tokens_per_side
    most = 0
    for h, w in config.allowed_pinpoints():
        rows, cols = (h // config.tile_size) * n, (w // config.tile_size) * n
        cells = rows * cols
        if config.anyres_max > 0:
            cells = min(cells, int(1.21 * config.anyres_max * n * n) + 1)
        most = max(most, cells + rows)
    return n * n + most


def default_n_ctx(manifest: Manifest, config: PreprocessConfig, budget: TokenBudget | None = None) -> int:
    """Enough positions for the largest image plan (after the token budget) plus TEXT_ROOM
    (multiple of 256), capped at the model's trained context (Phi-3.5: at most 4096). The KV
    cache is n_ctx positions (Phi-3.5 has no GQA: 384 KiB per position in F16), so a budget
    lowers peak memory too."""
    most = max_kept_tokens(max_visual_tokens(config), config, budget)
    want = -(-(most + TEXT_ROOM) // 256) * 256
    cap = int(manifest.model.get("context_length") or manifest.model.get("max_position_embeddings") or 4096)
    if manifest.model.get("llm_arch") == "phi3":
        cap = min(cap, PHI3_MAX_CTX)
    return max(256, min(want, cap))


def token_budget(manifest: Manifest, visual_tokens: object = None, method: str | None = None) -> TokenBudget:
    """The bundle's baked budget (`manifest.budget`) with run-time overrides applied."""
    baked = TokenBudget.from_dict(getattr(manifest, "budget", None) or {})
    k = baked.visual_tokens if visual_tokens is None else parse_visual_tokens(visual_tokens)  # type: ignore[arg-type]
    return TokenBudget(k, method or baked.method)


def choose_kv_cache(
    kv_type: str, flash_attn: bool | None, on_gpu: bool, llm_precision: str | None = None
) -> tuple[str, bool | None]:
    """(kv_type, flash_attn) for llama.cpp: what was asked, or for kv_type "auto":
    - an F32 GGUF, the export check against PyTorch: an F32 cache without flash attention (unless
      asked for), which matches transformers to ~1e-6;
    - on a GPU: F16 with llama.cpp's own flash attention choice;
    - on the CPU: CPU_KV_CACHE (K in Q8_0, V in F16) at every context size, flash attention as
      asked (off unless asked; see CPU_KV_CACHE for the measurements). The Pipeline lets a model
      whose head size a Q8_0 K cannot take fall back to F16 (`LLMOptions.kv_fallback`)."""
    if kv_type != "auto":
        return kv_type, flash_attn
    if llm_precision == "f32":
        return "f32", False if flash_attn is None else flash_attn
    if on_gpu:
        return "f16", flash_attn
    return CPU_KV_CACHE, flash_attn


def choose_ubatch(n_ubatch: int | None, n_batch: int, on_gpu: bool) -> int:
    """llama.cpp's n_ubatch: what was asked, else CPU_UBATCH on the CPU and n_batch on a GPU
    (never above n_batch)."""
    if n_ubatch is not None:
        return n_ubatch
    return n_batch if on_gpu else min(CPU_UBATCH, n_batch)
