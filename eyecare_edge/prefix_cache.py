"""A bounded, cross-request cache of image prefixes (llama.cpp KV states), LRU by bytes.

A `Pipeline` keeps the *last* image prefix in its KV cache, so a second question about the same
photo is cheap as long as nothing else came in between. A server breaks that: two camera
stations interleave, or N pipelines take turns. With a `PrefixCache` attached
(`pipe.prefix_cache = PrefixCache(max_bytes)`), a pipeline saves the KV state of each fresh image
prefix (`LlamaCppLM.save_state`) and, for a prefix it has seen before (same image digest, same
token budget and preprocessing, same bundle and settings: the key), restores it instead of
running vision and prefill again. One cache may be shared by several pipelines of the same
bundle and options (the states are plain bytes; restoring is a copy into the context).

Memory is bounded by `max_bytes`: least recently used states are evicted first, and a state
larger than the whole budget is not kept. Sizes: the tiny test bundle ~0.15 MB per image (145 positions);
Phi-3.5 (3.8B) with f16 KV ~0.4 MB per position, ~1.1 GB for a 2.9k-token image.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True, eq=False)
class PrefixState:
    """One saved image prefix: the KV bytes, the positions they hold, how many are visual."""

    blob: bytearray
    n_past: int
    n_image_tokens: int

    @property
    def nbytes(self) -> int:
        return len(self.blob)


class PrefixCache:
    """Thread-safe LRU of `PrefixState`s bounded by their total size in bytes."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, PrefixState] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: Hashable) -> PrefixState | None:
        """The state stored under `key` (now the most recently used), or None."""
        with self._lock:
            state = self._items.get(key)
            if state is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return state

    def put(self, key: Hashable, state: PrefixState) -> bool:
        """Store `state`, evicting the least recently used ones until it fits. Returns False
        (and stores nothing) when it is larger than the whole budget."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if state.nbytes > self.max_bytes:
                return False
            while self._items and self._bytes + state.nbytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.evictions += 1
            self._items[key] = state
            self._bytes += state.nbytes
            return True

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._items),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }


__all__ = ["PrefixCache", "PrefixState"]
