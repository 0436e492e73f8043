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
# kv_type "auto" on the CPU: a Q8_0 KV cache (with the flash attention llama.cpp needs for it) up
# to this many positions, F16 without flash attention above. Measured at eyecare-3.8b shapes
# (`perf`, 2-core EPYC, Q4_K_M, extrapolated to full depth), Q8_0 + flash against F16, two runs:
#   n_ctx 1280 (15% pool): peak RSS 3.58-3.60 vs 3.85-3.87 GB (1.27x vs 1.37x the bundle), TTFT
#     +4% and +8%, decode -10% and +9% (noise);
#   n_ctx 1792 (25% pool, the default budget since the demo model reads drusen; one run): 3.72
#     vs 4.07 GB (1.32x vs 1.45x), but TTFT +25% (27.7 vs 22.2 s);
#   n_ctx 2816 (50% pool): 3.90 vs 4.56 GB, but TTFT +58% and +71%;
#   n_ctx 4096 (every token): 4.18 vs 5.27 GB, TTFT 2.8x in both.
# llama.cpp's CPU flash-attention kernel slows prefill as the context grows, so the cheaper cache
# is taken only where it was measured to cost under 10% of TTFT.
KV_Q8_MAX_CTX = 1280


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
    kv_type: str, flash_attn: bool | None, n_ctx: int, on_gpu: bool, llm_precision: str | None = None
) -> tuple[str, bool | None]:
    """(kv_type, flash_attn) for llama.cpp: what was asked, or for kv_type "auto":
    - an F32 GGUF, the export check against PyTorch: an F32 cache without flash attention (unless
      asked for), which matches transformers to ~1e-6, where a Q8_0 cache changed 1 of 9 greedy
      answers of the test bundle;
    - else a Q8_0 cache with flash attention when the LLM runs on the CPU, flash attention was not
      turned off and n_ctx <= KV_Q8_MAX_CTX; F16 otherwise (on a GPU, llama.cpp's own flash
      attention choice)."""
    if kv_type != "auto":
        return kv_type, flash_attn
    if llm_precision == "f32":
        return "f32", False if flash_attn is None else flash_attn
    if on_gpu or flash_attn is False or n_ctx > KV_Q8_MAX_CTX:
        return "f16", flash_attn
    return "q8_0", True
