"""The visual-token budget x reduction method stage of a perf run (see `tokens`): one TTFT child
per budget, closed-QA accuracy per budget on --accuracy-bundle, the KV cache variants."""

from __future__ import annotations

from pathlib import Path

from eyecare_edge.perf.options import PerfOptions
from eyecare_edge.perf.runner import Runner


def measure_token_budgets(
    runner: Runner, opts: PerfOptions, bundle: Path, image: Path, manifest, box: float
) -> None:
    """The budget x method table's raw rows: one TTFT child per budget (fastest of
    `token_repeats` asks), closed-QA accuracy per budget on --accuracy-bundle, then the KV cache
    variants (with decode) at the default budget the rule picks, at 50% and at every token."""
    from eyecare_edge.perf.token_report import Candidate, choose_default
    from eyecare_edge.perf.tokens import KV_DECODE_TOKENS, KV_VARIANTS, pipeline_overrides, token_grid

    from eyecare_edge.images import load_image
    from eyecare_edge.preprocess import plan_image
    from eyecare_edge.reduce import TokenBudget, kept_tokens

    state = runner.state
    grid = token_grid(tuple(opts.visual_tokens), tuple(opts.token_methods))
    base = {"n_threads": opts.threads, "vision_threads": opts.threads}
    bundle_tiles = manifest.preprocess_config().max_tiles

    def timed(name: str, overrides: dict, n_decode: int = 1) -> dict:
        return runner.child(
            f"tokens {name}",
            "eyecare_edge.perf.runtime:measure_pipeline",
            {
                "bundle": str(bundle),
                "image": str(image),
                "question": opts.question,
                "n_decode": n_decode,
                "options": {**base, **overrides},
                "time_box_s": box,
                "repeats": opts.token_repeats,
            },
        )

    # every row (the full-token one too) timed the same way: warm LLM, fastest of the repeats
    rows = [{**row, "result": timed(row["name"], pipeline_overrides(row, bundle_tiles))} for row in grid]
    state.token_budgets = rows

    if opts.accuracy_bundle is not None and opts.accuracy_data is not None:
        res = runner.child(
            "tokens accuracy",
            "eyecare_edge.perf.tokens:closed_qa_by_budget",
            {
                "bundle": str(opts.accuracy_bundle),
                "bench": str(opts.accuracy_data),
                "grid": grid,
                "limit": opts.accuracy_limit,
                "options": base,
            },
        )
        state.token_accuracy = {"source": str(opts.accuracy_bundle), "data": str(opts.accuracy_data)}
        state.token_accuracy.update(
            {"error": res["error"]} if "error" in res else {"rows": res.get("value", [])}
        )
    else:
        state.token_accuracy = {"skipped": "no --accuracy-bundle/--accuracy-data (a trained demo bundle)"}

    if not opts.kv_variants:
        return
    # the default budget by the rule, on this image's kept-token counts
    h, w = load_image(image).rgb.shape[:2]
    pre = manifest.preprocess_config()
    acc = {r["name"]: r for r in state.token_accuracy.get("rows", [])}
    tokens = []
    for row in grid:
        p = plan_image((h, w), pre.replace(max_tiles=row["max_tiles"]) if row["max_tiles"] else pre)
        budget = TokenBudget(row["visual_tokens"], row["method"] or "pool")
        a = acc.get(row["name"], {})
        tokens.append(
            Candidate(row["name"], kept_tokens(p, budget), a.get("accuracy"), a.get("tiles_as_budgeted", True))
        )
    chosen = choose_default(tokens)
    if chosen is not None:
        row = next(r for r in grid if r["name"] == chosen.name)
    else:
        from eyecare_edge.reduce import NAMED_BUDGETS

        b = NAMED_BUDGETS["balanced"]
        row = next(
            (r for r in grid if r["visual_tokens"] == b["visual_tokens"] and r["method"] == b["method"]),
            grid[0],
        )
    # at the default budget, at half the tokens and at every token: the context length decides
    # what flash attention and a quantized cache cost
    method = row["method"] or "pool"  # the full-token row has none
    half = next((r for r in grid if r["visual_tokens"] == 0.5 and r["method"] == method), None)
    at = [row] + [r for r in (half, grid[0]) if r is not None and r is not row]
    for r in at:
        for label, change in KV_VARIANTS.items():
            res = timed(
                f"{r['name']} {label}", {**pipeline_overrides(r, bundle_tiles), **change}, KV_DECODE_TOKENS
            )
            state.token_budgets.append({**r, "kv": label, "result": res})
