"""The budget x method table of `eyecare-edge perf`: what each visual-token budget costs and what it keeps.

Speed rows are `measure_pipeline` children at the perf shapes (eyecare-3.8b width, cut depth,
extrapolated to full depth like every other figure); accuracy rows are closed-QA answers of a
trained (demo) bundle under the same budgets, with 95% bootstrap intervals, overall and per
question type (fine lesions such as haemorrhages and microaneurysms are the first to suffer, so
they are counted apart). The rule for the default budget is `token_report.choose_default`.

The KV cache type is compared the same way (F16, F16 + flash attention, Q8_0 + flash attention,
which llama.cpp needs for a quantized V, and K alone in Q8_0), with decode, at the default budget,
at 50% and at every token: what `pipeline.plan.CPU_KV_CACHE` was chosen from. This module holds
the grid and the accuracy child; the report side (typed rows, the rule, the table) is
`token_report`.
"""

from __future__ import annotations

from collections import defaultdict

from eyecare_edge.reduce import METHODS, NAMED_BUDGETS

TOKEN_FRACTIONS = (0.5, 0.25, 0.15, 0.1)
TOKEN_METHODS = METHODS
# KV cache variants timed at the default budget and at every token, with decode: label ->
# PipelineOptions changes. `kv f16` pins what was the default before `auto` (F16, no flash);
# `kv q8_0/f16` is what `auto` takes on the CPU.
KV_VARIANTS: dict[str, dict] = {
    "kv f16": {"kv_type": "f16", "flash_attn": False},
    "kv f16 + flash": {"kv_type": "f16", "flash_attn": True},
    "kv q8_0 + flash": {"kv_type": "q8_0", "flash_attn": True},
    "kv q8_0/f16": {"kv_type": "q8_0/f16", "flash_attn": False},
}
# Answer tokens decoded in each KV variant's run (decode speed depends on the KV type and on
# flash attention, the prefill rows decode one token only)
KV_DECODE_TOKENS = 32

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
