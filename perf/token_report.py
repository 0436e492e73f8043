"""The report side of the budget x method table (see `tokens`): typed rows, the default-budget
rule, the summary and ratios, and the text table. The rule is written here once:

    default = the budget with the fewest visual tokens whose closed-QA accuracy is within
              DEFAULT_RULE_POINTS points of the full-token accuracy on the same bench
              (budgets whose tile cap did not bind on the accuracy bundle are not eligible:
              their accuracy says nothing about the tiles they cut).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from eyecare_edge.perf.depth import Model, kv_bytes, split_ttft, ttft_full
from eyecare_edge.perf.rows import ABSENT_WHEN_NONE, Row
from eyecare_edge.perf.sections import rss_figures

from eyecare_edge import costs
from eyecare_edge.reduce import NAMED_BUDGETS

DEFAULT_RULE_POINTS = 1.0


@dataclass(frozen=True)
class Candidate:
    """What the rule reads of a budget: its kept visual tokens and closed-QA accuracy."""

    name: str
    n_image_tokens: int | None
    accuracy: float | None
    tiles_as_budgeted: bool = True
    ttft_ms_full: float | None = None


def choose_default(rows: list[Candidate], points: float = DEFAULT_RULE_POINTS) -> Candidate | None:
    """The rule above; None without accuracies (no full-token accuracy to compare with)."""
    full = next((r for r in rows if r.name == "full" and r.accuracy is not None), None)
    if full is None or full.accuracy is None:
        return None
    ok = [
        r
        for r in rows
        if r.accuracy is not None
        and r.tiles_as_budgeted
        and r.n_image_tokens is not None
        and 100.0 * (r.accuracy - full.accuracy) >= -points - 1e-9
    ]
    return min(ok, key=lambda r: (r.n_image_tokens, r.ttft_ms_full or math.inf))


@dataclass
class TokenSpeed(Row):
    """One budget's TTFT parts, measured and at full depth, and its peak RSS."""

    layout_ms: float
    n_tiles: int
    n_image_tokens: int
    n_prompt: int
    n_ctx: int | None
    vision_ms: float
    prefill_ms: float
    ttft_ms: float | None
    vision_ms_full: float
    prefill_ms_full: float
    ttft_ms_full: float
    peak_rss_bytes: float | None
    peak_rss_bytes_full: float | None
    peak_rss_over_bundle_full: float | None
    # the KV cache llama.cpp got (its kv_type, "+ flash" with flash attention)
    kv_cache: str | None = field(default=None, metadata=ABSENT_WHEN_NONE)
    # KV variant rows decode KV_DECODE_TOKENS (measured, and scaled to full depth by the bytes a
    # token reads: weights + KV cache, as `sections.llm_figures` does), with the measured speed's
    # fraction of the bandwidth bound (bytes of a token at this prompt length); absent elsewhere
    decode_tok_s: float | None = field(default=None, metadata=ABSENT_WHEN_NONE)
    decode_tok_s_full: float | None = field(default=None, metadata=ABSENT_WHEN_NONE)
    decode_fraction_of_bound: float | None = field(default=None, metadata=ABSENT_WHEN_NONE)


@dataclass
class TokenAccuracy(Row):
    """Closed-QA accuracy of the budget on the accuracy bundle (95% CI, per question type)."""

    accuracy: float
    accuracy_ci: list[float]
    accuracy_n: int
    accuracy_per_type: dict | None
    accuracy_mean_kept_tokens: float | None
    accuracy_tiles_as_budgeted: bool


@dataclass
class TokenRow(Row):
    """A row of the budget x method table (a KV cache variant has `kv` set)."""

    name: str
    max_tiles: int | None
    visual_tokens: float | int | None
    method: str | None
    kv: str | None
    speed: TokenSpeed | None = field(default=None, metadata=ABSENT_WHEN_NONE)
    error: str | None = field(default=None, metadata=ABSENT_WHEN_NONE)
    accuracy: TokenAccuracy | None = field(default=None, metadata=ABSENT_WHEN_NONE)
    accuracy_skipped: str | None = field(default=None, metadata=ABSENT_WHEN_NONE)

    def candidate(self) -> Candidate:
        a, s = self.accuracy, self.speed
        return Candidate(
            self.name,
            s.n_image_tokens if s else None,
            a.accuracy if a else None,
            a.accuracy_tiles_as_budgeted if a else True,
            s.ttft_ms_full if s else None,
        )


def _fastest_encode(budgets: list[dict]) -> dict[int, float]:
    """Tile-encoding ms (vision minus layout) per tile count: the fastest over the rows, since
    every row with the same tiles runs the very same encoder work."""
    best: dict[int, float] = {}
    for b in budgets:
        res = b.get("result") or {}
        t = res.get("timings")
        if t and "vision_ms" in t:
            ms = t["vision_ms"] - t.get("layout_ms", 0.0)
            best[res["n_tiles"]] = min(ms, best.get(res["n_tiles"], ms))
    return best


def _speed(res: dict, model: Model, encode: dict[int, float]) -> TokenSpeed:
    parts = split_ttft(res["timings"])
    # layout + reduction do not grow with depth: count them with the fixed part, and take the
    # tile encoding of the same tiles at its fastest over the rows (same work)
    layout = res["timings"].get("layout_ms", 0.0)
    parts.decode_preprocess_ms += layout
    parts.vision_ms = encode.get(res["n_tiles"], parts.vision_ms - layout)
    mem = rss_figures(res, model)
    decode = res.get("decode_tok_s")
    wb = model.gguf.get(res.get("llm_precision"))
    kv = kv_bytes(res.get("options"))
    decode_full = decode * model.decode_scale(wb, res["n_prompt"], kv) if decode and wb is not None else None
    bound = (
        costs.decode_bound_tok_s(model.bandwidth, model.decode_bytes(wb, res["n_prompt"], kv, full=False))
        if decode and wb is not None
        else None
    )
    options = res.get("options") or {}
    kv_cache = None
    if options.get("kv_type"):  # flash attention as llama.cpp got it (a GPU's "auto" matches no KV row)
        flash = res.get("llm_flash_attn") or ("enabled" if options.get("flash_attn") else "disabled")
        suffix = {"enabled": " + flash", "disabled": ""}.get(flash, f" + flash {flash}")
        kv_cache = options["kv_type"] + suffix
    return TokenSpeed(
        layout_ms=layout,
        n_tiles=res["n_tiles"],
        n_image_tokens=res["n_image_tokens"],
        n_prompt=res["n_prompt"],
        n_ctx=res.get("n_ctx"),
        vision_ms=parts.vision_ms + layout,
        prefill_ms=parts.prefill_ms,
        ttft_ms=res["timings"].get("first_token_ms"),
        vision_ms_full=parts.vision_ms * model.vision_scale + layout,
        prefill_ms_full=parts.prefill_ms * model.prefill_scale(res["n_prompt"]),
        ttft_ms_full=ttft_full(model, parts, res["n_prompt"]),
        peak_rss_bytes=mem.peak_rss_bytes if mem else None,
        peak_rss_bytes_full=mem.peak_rss_bytes_full if mem else None,
        peak_rss_over_bundle_full=mem.peak_rss_over_bundle_full if mem else None,
        kv_cache=kv_cache,
        decode_tok_s=decode,
        decode_tok_s_full=decode_full,
        decode_fraction_of_bound=costs.fraction(decode, bound) if decode and bound else None,
    )


def token_rows(raw: dict, model: Model) -> list[TokenRow]:
    """Report rows: speed figures (measured and at full depth) joined with accuracy by name."""
    acc = {r["name"]: r for r in (raw.get("token_accuracy") or {}).get("rows", []) if isinstance(r, dict)}
    encode = _fastest_encode(raw.get("token_budgets", []))
    rows = []
    for b in raw.get("token_budgets", []):
        row = TokenRow(b.get("name"), b.get("max_tiles"), b.get("visual_tokens"), b.get("method"), b.get("kv"))
        res = b.get("result") or {}
        if "timings" in res:
            row.speed = _speed(res, model, encode)
        elif "error" in res:
            row.error = res["error"]
        a = None if b.get("kv") else acc.get(b.get("name"))  # accuracy was measured once per budget
        if a is not None and "accuracy" in a:
            row.accuracy = TokenAccuracy(
                accuracy=a["accuracy"],
                accuracy_ci=[a["ci_low"], a["ci_high"]],
                accuracy_n=a["n"],
                accuracy_per_type=a.get("per_type"),
                accuracy_mean_kept_tokens=a.get("mean_kept_tokens"),
                accuracy_tiles_as_budgeted=a.get("tiles_as_budgeted", True),
            )
        elif a is not None:
            row.accuracy_skipped = a.get("skipped") or a.get("error")
        rows.append(row)
    return rows


def token_summary(rows: list[TokenRow]) -> tuple[dict, dict]:
    """(summary, ratios): the chosen default and fast rows, KV choice, and the perf.json ratios
    ttft_default_over_full, ttft_fast_over_full, accuracy_delta_default_points,
    peak_rss_over_bundle and decode_fraction_of_bound_default (at the default budget; decode from
    the KV variant row with the cache the default run got)."""
    speed = [r for r in rows if not r.kv]
    full = next((r for r in speed if r.name == "full" and r.speed is not None), None)
    chosen = choose_default([r.candidate() for r in speed])
    default = next((r for r in speed if r.name == chosen.name), None) if chosen else None
    rule = f"fewest visual tokens within {DEFAULT_RULE_POINTS:g} point of full-token closed-QA accuracy"
    if default is None:  # no accuracy: fall back to the named balanced budget, and say so
        b = NAMED_BUDGETS["balanced"]
        default = next(
            (r for r in speed if r.visual_tokens == b["visual_tokens"] and r.method == b["method"]), None
        )
        rule += " (no accuracy measured: the named `balanced` budget stands in)"
    fast_name = f"fast {NAMED_BUDGETS['fast']['method']}"
    fast = next((r for r in speed if r.name == fast_name and r.speed is not None), None)

    def over(a: TokenRow | None) -> float | None:
        if a is None or full is None or a.speed is None or full.speed is None:
            return None
        if not a.speed.ttft_ms_full or not full.speed.ttft_ms_full:
            return None
        return a.speed.ttft_ms_full / full.speed.ttft_ms_full

    def accuracy(r: TokenRow | None) -> float | None:
        return r.accuracy.accuracy if r is not None and r.accuracy is not None else None

    acc_default, acc_full = accuracy(default), accuracy(full)
    kv: dict[str, dict[str, TokenSpeed]] = {}
    for r in rows:
        if r.kv and r.speed is not None:
            kv.setdefault(r.name, {})[r.kv] = r.speed
    own_kv = default.speed.kv_cache if default is not None and default.speed is not None else None
    variants_here = kv.get(default.name, {}).values() if own_kv and default is not None else ()
    same_cache = next((v for v in variants_here if v.kv_cache == own_kv), None)
    decode_default = same_cache.decode_fraction_of_bound if same_cache else None
    ratios = {
        "ttft_default_over_full": over(default),
        "ttft_fast_over_full": over(fast),
        "accuracy_delta_default_points": 100.0 * (acc_default - acc_full)
        if acc_default is not None and acc_full is not None
        else None,
        "peak_rss_over_bundle": default.speed.peak_rss_over_bundle_full if default and default.speed else None,
        "decode_fraction_of_bound_default": decode_default,
    }
    summary = {
        "rule": rule,
        "default": default.name if default else None,
        "fast": fast_name,
        "kv_variants": {
            budget: {
                k: {
                    "ttft_ms_full": v.ttft_ms_full,
                    "peak_rss_bytes_full": v.peak_rss_bytes_full,
                    "peak_rss_over_bundle_full": v.peak_rss_over_bundle_full,
                    "decode_tok_s": v.decode_tok_s,
                    "decode_tok_s_full": v.decode_tok_s_full,
                    "decode_fraction_of_bound": v.decode_fraction_of_bound,
                }
                for k, v in variants.items()
            }
            for budget, variants in kv.items()
        },
    }
    return summary, ratios
