"""The image prefix of a prompt (everything up to and including the last image's embeddings) as
the pipeline keeps it: the one in llama.cpp's KV cache (`ImagePrefix`), and its KV state saved to
and restored from a cross-request `PrefixCache`, keyed by what shapes the KV bytes."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from eyecare_edge.llm import LlamaCppLM, LLMError
from eyecare_edge.pipeline.options import PipelineOptions
from eyecare_edge.prefix_cache import PrefixCache, PrefixState

# Options that do not change an image prefix's KV state (so pipelines differing only in
# these share prefix-cache entries).
_NOT_IN_PREFIX_KEY = frozenset({"verify", "build_engine", "seed"})


@dataclass
class ImagePrefix:
    """The image prefix currently in the KV cache."""

    key: tuple
    mark: int
    n_image_tokens: int


def prefix_cache_key(digest: str, llm_path: str, options: PipelineOptions, key: tuple) -> tuple:
    """What shapes the KV bytes: the bundle, the GGUF, the options (token budget, context size,
    KV type, threads...; not checks or the seed) and the prompt key (image digests,
    preprocessing, text)."""
    opts = {k: v for k, v in asdict(options).items() if k not in _NOT_IN_PREFIX_KEY}
    return (digest, llm_path, json.dumps(opts, sort_keys=True, default=str), key)


def restore_prefix(
    lm: LlamaCppLM, cache: PrefixCache, cache_key: tuple, key: tuple, timings: dict[str, float]
) -> ImagePrefix | None:
    """Load the cached KV state for `cache_key` into `lm`; None when there is none or it does not
    load (the context is then empty)."""
    state = cache.get(cache_key)
    if state is None:
        return None
    t = time.perf_counter()
    try:
        lm.load_state(state.blob, state.n_past)
    except LLMError:
        lm.reset()
        return None
    timings["restore_ms"] = 1000.0 * (time.perf_counter() - t)
    return ImagePrefix(key, state.n_past, state.n_image_tokens)


def save_prefix(
    lm: LlamaCppLM, cache: PrefixCache, cache_key: tuple, prefix: ImagePrefix, timings: dict[str, float]
) -> None:
    """Save the KV state of the freshly evaluated `prefix` under `cache_key`."""
    t = time.perf_counter()
    state = PrefixState(lm.save_state(), prefix.mark, prefix.n_image_tokens)
    cache.put(cache_key, state)
    timings["save_ms"] = 1000.0 * (time.perf_counter() - t)
