"""A quick estimate of the LLM prefill time on this machine (for `inspect`), no model loaded.

    prefill_s ~= prefill FLOPs(n tokens) / (PREFILL_EFFICIENCY x numpy FP32 matmul GFLOP/s)

The matmul rate is measured here in ~0.1 s (one 512x3072 @ 3072x3072 product, the prefill's
shape class); PREFILL_EFFICIENCY is the fraction of that rate llama.cpp's Q4_K_M prefill reached
in `eyecare-edge perf` at eyecare-3.8b shapes on this project's 2-core CPU (0.60; 250 tok/s at
2 layers for 3,712 tokens). The estimate is as good as that fraction is for the machine at hand:
run `eyecare-edge perf` for measured figures.
"""

from __future__ import annotations

import time

import numpy as np

from eyecare_edge.costs import LLMShape

PREFILL_EFFICIENCY = 0.60

# LLM shapes of the presets with published weights (Phi-3.5-mini, Qwen2-7B), for estimates
# without a checkpoint; a bundle's own depth replaces `layers`.
PRESET_LLM: dict[str, LLMShape] = {
    "eyecare-3.8b": LLMShape(hidden=3072, intermediate=8192, layers=32, heads=32, kv_heads=32, vocab=32064),
    "eyecare-7b": LLMShape(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064),
}


def llm_shape_for(preset: str | None, layers: int | None = None) -> LLMShape | None:
    """The preset's LLM shape (at `layers` when given), or None for presets without one."""
    shape = PRESET_LLM.get(preset or "")
    if shape is None:
        return None
    return shape.with_layers(int(layers)) if layers else shape


def prefill_seconds(shape: LLMShape, n_tokens: int, matmul_gflops: float) -> float:
    """Estimated seconds to prefill `n_tokens` positions from scratch."""
    return shape.prefill_flops(n_tokens) / (PREFILL_EFFICIENCY * matmul_gflops * 1e9)


def measure_numpy_matmul(m: int = 512, k: int = 3072, n: int = 3072, repeats: int = 3) -> float:
    """FP32 GFLOP/s of numpy's BLAS on an (m, k) @ (k, n) product (the prefill's shape class):
    the best of `repeats` timed products after a warm one (BLAS threads, packing buffers)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    a @ b
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        dt = time.perf_counter() - t
        if dt > 0:
            best = max(best, 2.0 * m * k * n / 1e9 / dt)
    return best


def measure_matmul_gflops() -> float:
    """This machine's numpy FP32 matmul rate (best of 3)."""
    return measure_numpy_matmul(repeats=3)
