"""The budget x method table of `eyecare-edge perf`: what each visual-token budget costs and what it keeps.

Speed rows are `measure_pipeline` children at the perf shapes (eyecare-3.8b width, cut depth,
extrapolated to full depth like every other figure); accuracy rows are closed-QA answers of a
trained (demo) bundle under the same budgets, with 95% bootstrap intervals, overall and per
question type (fine lesions such as haemorrhages and microaneurysms are the first to suffer, so
they are counted apart). The rule for the default budget is written here once:

    default = the budget with the fewest visual tokens whose closed-QA accuracy is within
              DEFAULT_RULE_POINTS points of the full-token accuracy on the same bench
              (budgets whose tile cap did not bind on the accuracy bundle are not eligible:
              their accuracy says nothing about the tiles they cut).

The KV cache type is compared the same way, at the default budget (F16 vs Q8_0, which
llama.cpp only supports with flash attention for V).
"""

from __future__ import annotations

import math
from collections import defaultdict

from eyecare_edge.perf.depth import Model, split_ttft, ttft_full
from eyecare_edge.perf.sections import rss_figures

from eyecare_edge.reduce import NAMED_BUDGETS

TOKEN_FRACTIONS = (0.5, 0.25, 0.15, 0.1)
TOKEN_METHODS = ("pool", "diverse")
DEFAULT_RULE_POINTS = 1.0
# KV cache variants timed at the default budget: label -> PipelineOptions changes.
KV_VARIANTS: dict[str, dict] = {
    "kv f16 + flash": {"kv_type": "f16", "flash_attn": True},
    "kv q8_0 + flash": {"kv_type": "q8_0", "flash_attn": True},
}

# Question types by keywords of the question (for records without a `kind`/`question_type`).
_TYPES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("haemorrhage/microaneurysm", ("haemorrhage", "hemorrhage", "microaneurysm")),
    ("exudate/cotton-wool", ("exudate", "cotton-wool", "cotton wool")),
    ("drusen", ("drusen",)),
    ("fluid", ("fluid",)),
    ("grade/diagnosis", ("grade", "diagnosis", "severe", "finding")),
    ("laterality/disc", ("which eye", "left eye", "right eye", "optic disc")),
    ("modality", ("modality", "type of image")),
)


def token_grid(
    fractions: tuple[float, ...] = TOKEN_FRACTIONS,
    methods: tuple[str, ...] = TOKEN_METHODS,
    named: bool = True,
) -> list[dict]:
    """Budgets to measure: every token, each fraction x method (all tiles), and the named `fast`
    budget (fewer tiles as well) per method. Rows: {name, max_tiles, visual_tokens, method}."""
    rows = [{"name": "full", "max_tiles": None, "visual_tokens": None, "method": None}]
    for f in fractions:
        for m in methods:
            rows.append({"name": f"{f:.0%} {m}", "max_tiles": None, "visual_tokens": f, "method": m})
    if named:
        fast = NAMED_BUDGETS["fast"]
        for m in methods:
            rows.append(
                {
                    "name": f"fast {m}",
                    "max_tiles": fast["max_tiles"],
                    "visual_tokens": fast["visual_tokens"],
                    "method": m,
                }
            )
    return rows


def pipeline_overrides(row: dict, bundle_max_tiles: int | None = None) -> dict:
    """PipelineOptions changes for a grid row; a tile cap never raises the bundle's own."""
    out: dict = {"visual_tokens": row["visual_tokens"] if row["visual_tokens"] is not None else "all"}
    if row.get("method"):
        out["token_reduction"] = row["method"]
    mt = row.get("max_tiles")
    if mt is not None and (bundle_max_tiles is None or mt < bundle_max_tiles):
        out["max_tiles"] = mt
    return out


def question_type(record) -> str:
    """`modality: type` of a closed question (its `kind` / `question_type` when the record has one)."""
    meta = getattr(record, "meta", {}) or {}
    kind = meta.get("kind") or meta.get("question_type")
    if not kind:
        q = record.question.lower()
        kind = next((name for name, words in _TYPES if any(w in q for w in words)), "other")
    return f"{record.modality}: {kind}"


def closed_qa_by_budget(
    bundle: str,
    bench: str,
    grid: list[dict],
    limit: int | None = None,
    options: dict | None = None,
    max_tokens: int = 8,
) -> list[dict]:
    """Closed-QA accuracy of `bundle` under each grid budget, overall and per question type
    (95% bootstrap CI), with the mean kept visual tokens and TTFT. Runs in a perf child."""
    import numpy as np

    from eyecare_edge.bench.metrics import accuracy_with_ci
    from eyecare_edge.bundle import read_manifest
    from eyecare_edge.pipeline import Pipeline
    from eyecare_edge.qa.answers import parse_choice
    from eyecare_edge.qa.loaders import load_bench

    records = [r for r in load_bench(bench) if r.task == "closed"]
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"{bench}: no closed-QA records")
    bundle_tiles = read_manifest(bundle).preprocess_config().max_tiles
    types = [question_type(r) for r in records]
    rows = []
    for row in grid:
        overrides = pipeline_overrides(row, bundle_tiles)
        try:
            pipe = Pipeline.load(bundle, **{**(options or {}), **overrides})
        except Exception as e:  # a budget the bundle cannot take
            rows.append({"name": row["name"], "skipped": f"{type(e).__name__}: {e}"})
            continue
        hits, kept, ttft = [], [], []
        with pipe:
            for r in records:
                ans = pipe.ask(r.images, r.prompt_text(), max_tokens=max_tokens)
                hits.append(parse_choice(ans.text, r.options) == r.answer)
                kept.append(ans.n_image_tokens)
                if not ans.cached_prefix:
                    ttft.append(ans.timings.get("first_token_ms", 0.0))
        acc, lo, hi = accuracy_with_ci(hits)
        by_type: dict[str, list[bool]] = defaultdict(list)
        for t, h in zip(types, hits, strict=True):
            by_type[t].append(h)
        per_type = {}
        for t, hs in sorted(by_type.items()):
            a, tl, th = accuracy_with_ci(hs)
            per_type[t] = {"accuracy": a, "ci_low": tl, "ci_high": th, "n": len(hs)}
        rows.append(
            {
                "name": row["name"],
                "accuracy": acc,
                "ci_low": lo,
                "ci_high": hi,
                "n": len(records),
                "correct": int(sum(hits)),
                "mean_kept_tokens": float(np.mean(kept)),
                "mean_ttft_ms": float(np.mean(ttft)) if ttft else None,
                "per_type": per_type,
                # whether the budget's tile cap bound on this bundle (a bundle trained with
                # fewer tiles cannot tell what cutting tiles costs)
                "tiles_as_budgeted": row.get("max_tiles") is None or "max_tiles" in overrides,
            }
        )
    return rows


# ------------------------------------------------------------------------- report side


def choose_default(rows: list[dict], points: float = DEFAULT_RULE_POINTS) -> dict | None:
    """The rule above on report rows (`n_image_tokens`, `accuracy`); None without accuracies."""
    full = next((r for r in rows if r["name"] == "full" and r.get("accuracy") is not None), None)
    if full is None:
        return None
    ok = [
        r
        for r in rows
        if r.get("accuracy") is not None
        and r.get("accuracy_tiles_as_budgeted", True)
        and r.get("n_image_tokens") is not None
        and 100.0 * (r["accuracy"] - full["accuracy"]) >= -points - 1e-9
    ]
    return min(ok, key=lambda r: (r["n_image_tokens"], r.get("ttft_ms_full") or math.inf))


def token_rows(raw: dict, model: Model) -> list[dict]:
    """Report rows: speed figures (measured and at full depth) joined with accuracy by name."""
    acc = {r["name"]: r for r in (raw.get("token_accuracy") or {}).get("rows", []) if isinstance(r, dict)}
    encode = _fastest_encode(raw.get("token_budgets", []))
    rows = []
    for b in raw.get("token_budgets", []):
        row = {k: b.get(k) for k in ("name", "max_tiles", "visual_tokens", "method", "kv")}
        res = b.get("result") or {}
        if "timings" in res:
            parts = split_ttft(res["timings"])
            # layout + reduction do not grow with depth: count them with the fixed part, and
            # take the tile encoding of the same tiles at its fastest over the rows (same work)
            layout = res["timings"].get("layout_ms", 0.0)
            parts.decode_preprocess_ms += layout
            parts.vision_ms = encode.get(res["n_tiles"], parts.vision_ms - layout)
            row["layout_ms"] = layout
            mem = rss_figures(res, model)
            row.update(
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
            )
        elif "error" in res:
            row["error"] = res["error"]
        a = None if b.get("kv") else acc.get(b.get("name"))  # accuracy was measured once per budget
        if a is not None and "accuracy" in a:
            row.update(
                accuracy=a["accuracy"],
                accuracy_ci=[a["ci_low"], a["ci_high"]],
                accuracy_n=a["n"],
                accuracy_per_type=a.get("per_type"),
                accuracy_mean_kept_tokens=a.get("mean_kept_tokens"),
                accuracy_tiles_as_budgeted=a.get("tiles_as_budgeted", True),
            )
        elif a is not None:
            row["accuracy_skipped"] = a.get("skipped") or a.get("error")
        rows.append(row)
    return rows


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


def token_summary(rows: list[dict]) -> tuple[dict, dict]:
    """(summary, ratios): the chosen default and fast rows, KV choice, and the perf.json ratios
    ttft_default_over_full, ttft_fast_over_full, accuracy_delta_default_points,
    peak_rss_over_bundle (at the default budget)."""
    speed = [r for r in rows if not r.get("kv")]
    full = next((r for r in speed if r["name"] == "full" and "ttft_ms_full" in r), None)
    default = choose_default(speed)
    rule = f"fewest visual tokens within {DEFAULT_RULE_POINTS:g} point of full-token closed-QA accuracy"
    if default is None:  # no accuracy: fall back to the named balanced budget, and say so
        b = NAMED_BUDGETS["balanced"]
        default = next(
            (
                r
                for r in speed
                if r.get("visual_tokens") == b["visual_tokens"] and r.get("method") == b["method"]
            ),
            None,
        )
        rule += " (no accuracy measured: the named `balanced` budget stands in)"
    fast_name = f"fast {NAMED_BUDGETS['fast']['method']}"
    fast = next((r for r in speed if r["name"] == fast_name and "ttft_ms_full" in r), None)

    def over(a: dict | None, key: str) -> float | None:
        if a is None or full is None or not a.get(key) or not full.get(key):
            return None
        return a[key] / full[key]

    kv = {r["kv"]: r for r in rows if r.get("kv") and "ttft_ms_full" in r}
    ratios = {
        "ttft_default_over_full": over(default, "ttft_ms_full"),
        "ttft_fast_over_full": over(fast, "ttft_ms_full"),
        "accuracy_delta_default_points": (
            100.0 * (default["accuracy"] - full["accuracy"])
            if default and full and default.get("accuracy") is not None and full.get("accuracy") is not None
            else None
        ),
        "peak_rss_over_bundle": default.get("peak_rss_over_bundle_full") if default else None,
    }
    summary = {
        "rule": rule,
        "default": default["name"] if default else None,
        "fast": fast_name,
        "kv_variants": {
            k: {"ttft_ms_full": v["ttft_ms_full"], "peak_rss_bytes_full": v.get("peak_rss_bytes_full")}
            for k, v in kv.items()
        },
    }
    return summary, ratios


def render_token_table(rows: list[dict], summary: dict, fmt) -> list[str]:
    """Plain-text lines of the budget x method table (`fmt` is the report's number formatter)."""
    out = [
        "",
        "Visual-token budgets x reduction method (full depth; accuracy on the --accuracy-bundle bench)",
    ]
    header = ["budget", "tiles", "tokens", "vision s", "prefill s", "TTFT s", "peak RSS", "accuracy [95% CI]"]
    table = []
    types: set[str] = set()
    for r in rows:
        types |= set(r.get("accuracy_per_type") or {})
        acc = "-"
        if r.get("accuracy") is not None:
            lo, hi = r["accuracy_ci"]
            acc = f"{r['accuracy']:.1%} [{lo:.0%}, {hi:.0%}] n={r['accuracy_n']}"
            if not r.get("accuracy_tiles_as_budgeted", True):
                acc += " (tiles not cut)"
        table.append(
            [
                r["name"] + (f" ({r['kv']})" if r.get("kv") else ""),
                fmt(r.get("n_tiles"), "{}"),
                fmt(r.get("n_image_tokens"), "{}"),
                fmt(r.get("vision_ms_full") and r["vision_ms_full"] / 1000, "{:.1f}"),
                fmt(r.get("prefill_ms_full") and r["prefill_ms_full"] / 1000, "{:.1f}"),
                fmt(r.get("ttft_ms_full") and r["ttft_ms_full"] / 1000, "{:.1f}"),
                fmt(r.get("peak_rss_bytes_full") and r["peak_rss_bytes_full"] / 1e9, "{:.2f} GB"),
                acc if "error" not in r else "failed: " + str(r["error"]).splitlines()[0][:50],
            ]
        )
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)] if table else []
    for cells in [header, ["-" * w for w in widths], *table]:
        out.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
        )
    if types:
        out += ["", "Closed-QA accuracy per question type"]
        names = sorted(types)
        for r in rows:
            per = r.get("accuracy_per_type")
            if per:
                cells = [f"{t} {per[t]['accuracy']:.0%} (n={per[t]['n']})" for t in names if t in per]
                out.append(f"  {r['name']}: " + "; ".join(cells))
    out.append(f"default budget: {summary.get('default')} ({summary.get('rule')})")
    return out
