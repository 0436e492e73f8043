"""Raw perf results -> the typed rows of each report section: vision per tile, LLM prefill and
decode, end to end, token budgets, memory, the llama.cpp settings sweep.

Pure functions of the dict `run.RunState.to_dict()` builds (the raw results come from child
processes as JSON), so the arithmetic is tested without running a model. A time box (see
`eyecare_edge.training.reference`) is visible in the rows: `prefill_tokens_measured` < `n_prompt`,
`vision_composed`, `decode_tokens_measured` < n_decode - 1.
"""

from __future__ import annotations

from typing import Any

from eyecare_edge.perf.depth import Model, kv_bytes, ok, split_ttft, ttft_full
from eyecare_edge.perf.rows import (
    BackendVision,
    BudgetAccuracy,
    BudgetRow,
    BudgetSpeed,
    DecodeBounds,
    DecodeFigures,
    E2ERow,
    EndToEnd,
    EndToEndFailed,
    Failed,
    LlamaRun,
    LLMFigures,
    LLMRow,
    LLMRun,
    Memory,
    PipelineEndToEnd,
    PrefillFigures,
    ReferenceRss,
    RssFigures,
    SweepRow,
    TileFigures,
    TorchVision,
    TtftParts,
    VisionRow,
)

from eyecare_edge import costs

LLAMA_SETTINGS = ("n_batch", "n_ubatch", "repack", "flash_attn", "kv_type", "n_threads")


def _failed(system: str | None, kind: str | None, raw: dict[str, Any]) -> Failed:
    return Failed(system, kind, skipped=raw.get("skipped"), error=raw.get("error"))


def vision_rows(raw: dict, model: Model) -> list[VisionRow]:
    rows: list[VisionRow] = []
    for ref in raw.get("references", []):
        if ok(ref) and ref.get("vision_ms_per_tile"):
            rows.append(TorchVision(f"torch eager {ref['dtype'].upper()}", "reference", ref["dtype"], ref["vision_ms_per_tile"]))
        elif "error" in ref:
            rows.append(Failed(f"torch eager ({ref.get('system')})", "reference", error=ref["error"]))
    for v in raw.get("vision", []):
        if ok(v):
            rows.append(
                BackendVision(
                    v["system"], v.get("kind", "cpu"), v["backend"], v["precision"], v["ms_per_tile"],
                    v.get("load_s"), v.get("peak_rss_bytes"),
                )
            )
        else:
            rows.append(_failed(v.get("system"), v.get("kind", "cpu"), v))
    flops = model.vision.flops_per_tile()
    for r in rows:
        if not isinstance(r, Failed) and r.ms_per_tile:
            gflops = flops / (r.ms_per_tile / 1000.0) / 1e9
            r.figures = TileFigures(
                ms_per_tile_full=r.ms_per_tile * model.vision_scale,
                gflops=gflops,
                fraction_of_peak=costs.fraction(gflops, model.peak_gflops),
            )
    return rows


def llm_figures(model: Model, row: dict, wb: costs.WeightBytes | None, kv: float, context: int) -> LLMFigures:
    """Prefill and decode figures of one raw LLM result, measured and at full depth, with bounds."""
    n = row["n_prompt"]
    out = LLMFigures()
    if row.get("prefill_tok_s"):
        r = row["prefill_tok_s"]
        bound = costs.prefill_bound_tok_s(model.peak_gflops, model.llm.prefill_flops(n), n)
        out.prefill = PrefillFigures(r, r / model.prefill_scale(n), bound, costs.fraction(r, bound))
    if row.get("decode_tok_s"):
        r = row["decode_tok_s"]
        out.decode = DecodeFigures(r)
        if wb is not None:
            b_meas = model.decode_bytes(wb, context, kv, full=False)
            b_full = model.decode_bytes(wb, context, kv, full=True)
            bound = costs.decode_bound_tok_s(model.bandwidth, b_meas)
            out.decode.bounds = DecodeBounds(
                decode_tok_s_full=r * model.decode_scale(wb, context, kv),
                decode_bytes_per_token=b_meas,
                decode_bytes_per_token_full=b_full,
                decode_bound_tok_s=bound,
                decode_bound_tok_s_full=costs.decode_bound_tok_s(model.bandwidth, b_full),
                decode_fraction_of_bound=costs.fraction(r, bound),
            )
    return out


def llm_rows(raw: dict, model: Model) -> list[LLMRow]:
    rows: list[LLMRow] = []
    for ref in raw.get("references", []):
        name = ref.get("system", "transformers")
        if not ok(ref):
            rows.append(Failed(name, "reference", skipped=ref.get("skipped"), error=ref.get("error")))
            continue
        dtype = ref["dtype"]
        wb = model.weight_bytes(dtype)
        context = ref.get("decode_context") or ref["n_prompt"]
        rows.append(
            LLMRun(
                name, "reference", dtype, ref["n_prompt"], ref.get("prefill_tokens_measured"),
                ref.get("decode_tokens_measured"),
                weight_bytes=wb.total(model.llm.layers) if wb else None,
                weight_bytes_full=wb.total(model.llm_full.layers) if wb else None,
                peak_rss_bytes=ref.get("peak_rss_bytes"),
                figures=llm_figures(model, ref, wb, costs.BYTES_PER_PARAM[dtype], context),
            )
        )
    for v in raw.get("llm", []):
        name = v.get("system", "llama.cpp")
        if not ok(v):
            rows.append(Failed(name, "llama.cpp", skipped=v.get("skipped"), error=v.get("error")))
            continue
        q = v["precision"]
        wb = model.weight_bytes(q)
        file_bytes = v.get("file_bytes")
        rows.append(
            LlamaRun(
                name, "llama.cpp", q, v["n_prompt"], v.get("prefill_tokens_measured"),
                v.get("decode_tokens_measured"),
                weight_bytes=file_bytes,
                weight_bytes_full=file_bytes + model.d_llm * wb.per_layer if wb and file_bytes else None,
                peak_rss_bytes=v.get("peak_rss_bytes"),
                figures=llm_figures(model, v, wb, kv_bytes(v.get("options")), v["n_prompt"]),
                source=v.get("from"),
            )
        )
    return rows


def _e2e(
    model: Model, name: str, parts: TtftParts, n_prompt: int, n_tiles: int | None,
    figures: LLMFigures | None, n_dec: int, src: dict[str, Any],
) -> EndToEnd:  # fmt: skip
    ttft = parts.total()
    full = ttft_full(model, parts, n_prompt)
    decode = figures.decode if figures else None
    dec = decode.decode_tok_s if decode else None
    dec_full = decode.bounds.decode_tok_s_full if decode and decode.bounds else None
    return EndToEnd(
        name, n_prompt, n_tiles, parts, ttft, full,
        total_ms=ttft + (n_dec - 1) * 1000.0 / dec if dec else None,
        total_ms_full=full + (n_dec - 1) * 1000.0 / dec_full if dec_full else None,
        vision_composed=src.get("vision_composed", False),
        peak_rss_bytes=src.get("peak_rss_bytes"),
    )


def e2e_rows(raw: dict, model: Model, llm: list[LLMRow]) -> list[E2ERow]:
    n_dec = raw.get("config", {}).get("n_decode", 64)
    figures = {r.system: r.figures for r in llm if isinstance(r, LLMRun)}
    rows: list[E2ERow] = []
    for ref in raw.get("references", []):
        if not ok(ref):
            continue
        parts = TtftParts(ref["decode_preprocess_ms"], ref["vision_ms"], ref["prefill_ms"])
        rows.append(
            _e2e(model, ref["system"], parts, ref["n_prompt"], ref.get("n_tiles"), figures.get(ref["system"]), n_dec, ref)
        )
    for key, name in (("pipeline", "eyecare-edge default"), ("proposed", "eyecare-edge proposed")):
        p = raw.get(key, {})
        if ok(p):
            rows.append(pipeline_row(model, name, p, n_dec))
        elif p:
            rows.append(EndToEndFailed(name, p.get("error")))
    return rows


def pipeline_row(model: Model, name: str, p: dict, n_dec: int) -> PipelineEndToEnd:
    """An end-to-end row of our Pipeline, with its own prefill/decode figures and bounds."""
    n = p["n_prompt"]
    src = {
        "n_prompt": n,
        "prefill_tok_s": n / (p["timings"]["prefill_ms"] / 1000.0),
        "decode_tok_s": p.get("decode_tok_s"),
    }
    figures = llm_figures(model, src, model.gguf.get(p.get("llm_precision")), kv_bytes(p.get("options")), n)
    base = _e2e(model, name, split_ttft(p["timings"]), n, p.get("n_tiles"), figures, n_dec, p)
    settings = p.get("proposed") or {k: (p.get("options") or {}).get(k) for k in LLAMA_SETTINGS}
    return PipelineEndToEnd(
        **vars(base),
        figures=figures,
        describe=p.get("describe"),
        settings=settings,
        total_ms_answer=p["timings"].get("total_ms") if p.get("n_generated", 0) >= n_dec else None,
    )


def budget_rows(raw: dict, model: Model) -> list[BudgetRow]:
    acc = {r["name"]: r for r in (raw.get("accuracy") or {}).get("rows", []) if isinstance(r, dict)}
    rows = []
    for b in raw.get("budgets", []):
        row = BudgetRow(b.get("name"), b.get("max_tiles"), b.get("anyres_max"), b.get("from"))
        if "timings" in b:
            parts = split_ttft(b["timings"])
            row.speed = BudgetSpeed(
                b["n_tiles"], b["n_image_tokens"], b["n_prompt"], b["timings"].get("first_token_ms"),
                ttft_full(model, parts, b["n_prompt"]), parts,
            )
        row.error, row.skipped = b.get("error"), b.get("skipped")
        a = acc.get(b.get("name"))
        if a is not None:
            ci = [a.get("ci_low"), a.get("ci_high")] if a.get("ci_low") is not None else None
            row.accuracy = BudgetAccuracy(a.get("accuracy"), a.get("n"), ci, a.get("skipped"))
        rows.append(row)
    return rows


def rss_figures(p: dict, model: Model) -> RssFigures | None:
    """Runtime peak RSS against the bundle files it loaded, measured and at full depth (None when
    the run `p` did not run)."""
    if not ok(p):
        return None
    files = p.get("loaded_files", {})
    loaded = float(sum(files.values()))
    rss = float(p["peak_rss_bytes"])
    wb = model.gguf.get(p.get("llm_precision"))
    vision_p = p.get("vision_precision", "fp32")
    v_layer = (
        costs.vision_weight_bytes(model.vision, vision_p)[0] if vision_p in costs.BYTES_PER_PARAM else 0.0
    )
    llm_layer = wb.per_layer if wb else 0.0
    kv_layer = model.llm.with_layers(1).kv_bytes(p.get("n_ctx") or 4096, kv_bytes(p.get("options", {})))
    loaded_full = loaded + model.d_llm * llm_layer + model.d_vision * v_layer
    rss_full = rss + model.d_llm * (llm_layer + kv_layer) + model.d_vision * v_layer
    return RssFigures(
        loaded_files=files,
        loaded_bytes=loaded,
        peak_rss_bytes=rss,
        baseline_rss_bytes=p.get("baseline_rss_bytes"),
        peak_rss_over_bundle=rss / loaded if loaded else None,
        loaded_bytes_full=loaded_full,
        peak_rss_bytes_full=rss_full,
        peak_rss_over_bundle_full=rss_full / loaded_full if loaded_full else None,
        kv_bytes_per_layer=kv_layer,
        n_ctx=p.get("n_ctx"),
    )


def reference_rss(raw: dict, model: Model) -> dict[str, ReferenceRss]:
    """The references' peak RSS, measured and with the missing layers' weights and KV cache added."""
    refs = {}
    for ref in raw.get("references", []):
        if ok(ref) and ref.get("peak_rss_bytes"):
            s = costs.BYTES_PER_PARAM[ref["dtype"]]
            per_layer = model.llm.layer_params * s + model.llm.with_layers(1).kv_bytes(ref["n_prompt"], s)
            refs[ref["system"]] = ReferenceRss(
                ref["peak_rss_bytes"],
                ref["peak_rss_bytes"] + model.d_llm * per_layer + model.d_vision * model.vision.layer_params * s,
            )
    return refs


def memory_section(raw: dict, model: Model) -> Memory:
    default = rss_figures(raw.get("pipeline", {}), model)
    refs = reference_rss(raw, model) if default is not None else {}
    proposed = bool(raw.get("proposed"))
    return Memory(default, refs, proposed, rss_figures(raw["proposed"], model) if proposed else None)


def sweep_rows(raw: dict) -> list[SweepRow]:
    return [
        SweepRow(
            r.get("setting"), r.get("prefill_tok_s"), r.get("decode_tok_s"), r.get("peak_rss_bytes"),
            error=r.get("error"), skipped=r.get("skipped"),
        )
        for r in raw.get("sweep", [])
    ]
