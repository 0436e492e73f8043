"""From the depth a perf run measured to the preset's full depth: shapes, the machine's limits and
the scalings (the work model of `eyecare_edge.costs`), and the time-to-first-token split they apply to.

Conventions: "measured" figures are at the depth the run used (`config.llm_layers`,
`config.vision_layers`); "full" figures are extrapolated to the preset's depth.
"""

from __future__ import annotations

from typing import Any

from eyecare_edge.perf.rows import TtftParts

from eyecare_edge import costs
from eyecare_edge.formats import KV_CACHES, kv_cache_value_bytes


def kv_bytes(options: dict[str, Any] | None) -> float:
    """Mean bytes per cached K/V value of a llama.cpp run's `kv_type` option (f16 when not set or
    not a cache name, e.g. "auto" of a run that did not report what it resolved to)."""
    kv = (options or {}).get("kv_type") or "f16"
    return kv_cache_value_bytes(kv if kv in KV_CACHES else "f16")


def ok(row: dict[str, Any]) -> bool:
    """A raw result that ran: not empty, no error, not skipped."""
    return bool(row) and "error" not in row and "skipped" not in row


def _wb_from(d: dict[str, float]) -> costs.WeightBytes:
    return costs.WeightBytes(**{k: d[k] for k in ("per_layer", "fixed_per_token", "resident_fixed")})


class Model:
    """The shapes at measured and full depth, the machine's limits, and the scalings."""

    def __init__(self, raw: dict) -> None:
        s = raw["shapes"]
        llm = {k: v for k, v in s["llm"].items() if k not in ("params", "layer_params")}
        vis = {k: v for k, v in s["vision"].items() if k not in ("params", "layer_params")}
        self.llm = costs.LLMShape(**llm)
        self.vision = costs.VisionShape(**vis)
        self.llm_full = self.llm.with_layers(s["full_llm_layers"])
        self.vision_full = self.vision.with_layers(s["full_vision_layers"])
        m = raw.get("machine", {})
        self.bandwidth = m.get("bandwidth_gb_s") or 0.0
        flops = {k: v for k, v in (m.get("matmul_gflops") or {}).items() if v}
        self.peak_gflops = max(flops.values()) if flops else 0.0
        self.gguf = {q: _wb_from(d) for q, d in (s.get("gguf_bytes") or {}).items()}

    @property
    def d_llm(self) -> int:
        return self.llm_full.layers - self.llm.layers

    @property
    def d_vision(self) -> int:
        return self.vision_full.layers - self.vision.layers

    @property
    def vision_scale(self) -> float:
        return self.vision_full.flops_per_tile() / self.vision.flops_per_tile()

    def prefill_scale(self, n: int) -> float:
        return self.llm_full.prefill_flops(n) / self.llm.prefill_flops(n)

    def decode_bytes(self, wb: costs.WeightBytes, context: int, kv: float, full: bool) -> float:
        shape = self.llm_full if full else self.llm
        return wb.per_token(shape.layers) + shape.kv_bytes(context, kv)

    def decode_scale(self, wb: costs.WeightBytes, context: int, kv: float) -> float:
        """Measured decode tok/s times this = at full depth: decode reads every weight and the KV
        cache once a token, so its speed scales with the bytes read."""
        return self.decode_bytes(wb, context, kv, full=False) / self.decode_bytes(wb, context, kv, full=True)

    def weight_bytes(self, system: str) -> costs.WeightBytes | None:
        """WeightBytes of `fp32`/`bf16` (transformers) or a GGUF type."""
        if system in ("fp32", "bf16", "fp16"):
            return costs.torch_weight_bytes(self.llm, system)
        return self.gguf.get(system)


def split_ttft(t: dict[str, float]) -> TtftParts:
    """Pipeline timings -> depth-independent part, vision, prefill and the rest (ms)."""
    fixed = t.get("decode_ms", 0.0) + t.get("preprocess_ms", 0.0)
    vision = t.get("vision_ms", 0.0)
    prefill = t.get("prefill_ms", 0.0)
    other = max(t.get("first_token_ms", 0.0) - fixed - vision - prefill, 0.0)
    return TtftParts(decode_preprocess_ms=fixed, vision_ms=vision, prefill_ms=prefill, other_ms=other)


def ttft_full(model: Model, parts: TtftParts, n_prompt: int) -> float:
    """Time to first token at full depth: vision and prefill scale with their work, the rest stays."""
    return (
        parts.decode_preprocess_ms
        + (parts.other_ms or 0.0)
        + parts.vision_ms * model.vision_scale
        + parts.prefill_ms * model.prefill_scale(n_prompt)
    )
