"""The language model's formats: the settings of a model and its context (`LLMOptions`), one
generated answer (`Generation`), and what a prompt is made of (`PromptPart`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from eyecare_edge.formats import DEFAULT_KV_CACHE_TYPE, KV_CACHES, kv_cache_needs_flash
from eyecare_edge.llm.binding import LLMError
from eyecare_edge.llm.device import resolve_flash_attn, resolve_gpu_layers

STOP_REASONS = ("eog", "stop_string", "max_tokens", "context_full")

# A prompt is text chunks and embedding arrays [n, n_embd], evaluated in order.
PromptPart = str | np.ndarray


@dataclass
class LLMOptions:
    """Settings of the model and its context; the perf work tunes these by measurement.

    n_gpu_layers: layers offloaded to a GPU build of llama.cpp; None (default) = every layer when
    `llama_supports_gpu_offload()` (a CUDA/Metal/Vulkan build), else 0; -1 = all; 0 = CPU only.
    flash_attn: None (default) = auto: llama.cpp's own per-device choice when layers are offloaded,
    off on the CPU (the Pipeline's kv_type "auto" takes "q8_0/f16" there, which needs none,
    `pipeline.plan.choose_kv_cache`); True/False force it.
    n_threads / n_threads_batch: None means the number of physical cores this process may use
    (SMT siblings share the FMA units that decode and prefill saturate). kv_type: the K and V
    caches' element types (`formats.KV_CACHES`: "q8_0/f16" is K in Q8_0, V in F16); a quantized V
    ("q8_0") needs flash attention (llama.cpp quantizes V only inside its flash-attention kernel).
    kv_fallback: the cache taken instead when the model's attention head size is not a multiple
    of kv_type's K block (a Q8_0 K needs heads of 32k values; llama.cpp would abort), None: refuse
    such a model with the reason; `LlamaCppLM.options.kv_type` then says which one was taken.
    n_ubatch: the rows llama.cpp computes at once; its attention scratch is n_ubatch x n_ctx per
    head without flash attention. repack: llama.cpp's weight repacking for CPU kernels
    (`use_extra_bufts`); measured on a 2-core AVX-512 CPU, turning it off prefilled 3.6k
    embedding rows 2.5x faster, so it is an option rather than a constant. seed: the sampling
    seed used when `generate(seed=None)`, so a deployed bundle answers reproducibly.
    """

    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int | None = None
    n_threads_batch: int | None = None
    n_gpu_layers: int | None = None
    kv_type: str = DEFAULT_KV_CACHE_TYPE
    kv_fallback: str | None = None
    flash_attn: bool | None = None
    use_mmap: bool = True
    repack: bool = False
    seed: int = 0
    verbose: bool = False

    def validate(self) -> None:
        for name in ("kv_type", "kv_fallback"):
            value = getattr(self, name)
            if (value is not None or name == "kv_type") and value not in KV_CACHES:
                raise LLMError(f"{name} {value!r} is not one of {', '.join(KV_CACHES)}")
        fa = resolve_flash_attn(self.flash_attn, resolve_gpu_layers(self.n_gpu_layers))
        if kv_cache_needs_flash(self.kv_type) and fa == "disabled":  # auto on the CPU is disabled too
            raise LLMError(
                f"kv_type {self.kv_type!r} needs flash_attn=True (llama.cpp quantizes V only with "
                "flash attention; 'q8_0/f16' quantizes K alone and needs none)"
            )
        for name in ("n_ctx", "n_batch", "n_ubatch"):
            if getattr(self, name) < 1:
                raise LLMError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_ubatch > self.n_batch:
            raise LLMError(f"n_ubatch ({self.n_ubatch}) must not exceed n_batch ({self.n_batch})")
        for name in ("n_threads", "n_threads_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LLMError(f"{name} must be >= 1 or None, got {value}")


@dataclass
class Generation:
    """One generated answer.

    tokens: every sampled token except an end-of-generation token (it includes the tokens of a
    stop string, which `text` does not). n_prompt: positions in the context when sampling
    started. timings: milliseconds per phase: `prefill_ms` (evaluating `prompt=`),
    `first_token_ms` (call start to first sampled token: time to first token), `sample_ms`
    (all sampling), `decode_ms` (feeding generated tokens back), `total_ms`.
    """

    text: str
    tokens: list[int]
    stop_reason: str
    n_prompt: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first per second after the first (time to first token excluded)."""
        n = len(self.tokens) - 1
        ms = self.timings.get("total_ms", 0.0) - self.timings.get("first_token_ms", 0.0)
        return 1000.0 * n / ms if n > 0 and ms > 0 else 0.0
