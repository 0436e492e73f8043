"""Raw perf results -> the report (perf.json): the typed rows of each section, memory, ratios and
targets, the configuration and where each half ran, and the raw results themselves under `raw`.

A pure function of the dict `run.RunState.to_dict()` builds, so it is tested without running a
model. The sections are built in `sections`, their rows are the dataclasses of `rows`, the ratios
and targets come from `ratios`, the scalings to full depth from `depth`; `table` draws the text.
"""

from __future__ import annotations

from eyecare_edge.perf.depth import Model, ok
from eyecare_edge.perf.ratios import DEFAULT, compute_ratios, evaluate_targets
from eyecare_edge.perf.rows import E2ERow, EndToEnd
from eyecare_edge.perf.sections import (
    LLAMA_SETTINGS,
    budget_rows,
    e2e_rows,
    llm_rows,
    memory_section,
    sweep_rows,
    vision_rows,
)
from eyecare_edge.perf.token_report import token_rows, token_summary

SCHEMA = "eyecare-edge-perf/1"

EXTRAPOLATION = (
    "Depth is cut at full width; each cost is t_full = t_measured * W(full) / W(measured) with "
    "W = fixed + layers * per_layer work: FLOPs for vision per tile (patch embedding and projector "
    "fixed; SigLIP blocks with their attention per layer) and for prefill (decoder layers with causal "
    "attention per layer; one LM-head row fixed), weight bytes read per token for decode (per layer: "
    "the layer's bytes from the GGUF tensor table or params x dtype size, plus its KV cache at the "
    "prompt length; fixed: LM head, final norm, one embedding row). Image decoding, preprocessing and "
    "sampling do not depend on depth. Peak RSS adds, per missing layer, its weight bytes and its KV "
    "cache (n_ctx positions for llama.cpp, the prompt for transformers); ONNX Runtime holds 1.03x a "
    "vision layer's file bytes once the buffers it parsed the file into are released (measured "
    "between 2 and 6 layers, eyecare_edge.heap). A figure's fraction of its bound is unchanged by "
    "the extrapolation."
)


def _as_default(e2e: list[E2ERow]) -> list[E2ERow]:
    """The end-to-end rows with "eyecare-edge proposed" standing in for the default (ratios of the
    proposed settings)."""
    rows = [r for r in e2e if r.system != DEFAULT]
    out: list[E2ERow] = []
    for r in rows:
        if r.system == "eyecare-edge proposed":
            r = type(r)(**{**vars(r), "system": DEFAULT})
        out.append(r)
    return out


def _backends(p: dict, best_cpu: str | None) -> dict:
    """Where the runtime's default pipeline ran each half (GPU n / CPU; llama.cpp's offload), why
    faster vision backends were skipped, and its llama.cpp settings."""
    ran = ok(p)
    return {
        "vision_default": f"{p.get('vision_backend')} {p.get('vision_precision')}" if ran else None,
        "llm_default": p.get("llm_precision") if ran else None,
        "vision_device": p.get("vision_device") if ran else None,
        "vision_skipped": p.get("vision_skipped") if ran else None,
        "llm_device": p.get("llm_device") if ran else None,
        "llm_settings": {k: (p.get("options") or {}).get(k) for k in LLAMA_SETTINGS} if ran else None,
        "n_ctx": p.get("n_ctx"),
        "vision_best_cpu": best_cpu,
    }


def build_report(raw: dict) -> dict:
    """The full report: raw results kept under `raw`, figures, ratios and targets on top."""
    model = Model(raw)
    vision = vision_rows(raw, model)
    llm = llm_rows(raw, model)
    e2e = e2e_rows(raw, model, llm)
    budgets = budget_rows(raw, model)
    memory = memory_section(raw, model)
    gpu_tile = raw.get("gpu_one_tile") or {}
    ratios = compute_ratios(vision, llm, e2e, budgets, memory.default, full=True)
    ratios_measured = compute_ratios(vision, llm, e2e, budgets, memory.default, full=False)
    tokens = token_rows(raw, model)
    tokens_summary, token_ratios = token_summary(tokens)
    if token_ratios.get("peak_rss_over_bundle") is not None:  # at the default budget from now on
        ratios["peak_rss_over_bundle_full_tokens"] = ratios.get("peak_rss_over_bundle")
    ratios.update({k: v for k, v in token_ratios.items() if v is not None or k not in ratios})
    if ok(gpu_tile):
        ratios["gpu_ttft_one_tile_ms"] = gpu_tile["timings"].get("first_token_ms")
    gpu_present = bool(raw.get("gpu", {}).get("present"))
    config = dict(raw.get("config", {}))
    config["backends"] = _backends(raw.get("pipeline", {}), ratios.get("vision_best_cpu_backend"))
    proposed_ran = any(r.system == "eyecare-edge proposed" and isinstance(r, EndToEnd) for r in e2e)
    return {
        "schema": SCHEMA,
        "config": config,
        "machine": raw.get("machine", {}),
        "gpu": raw.get("gpu", {}),
        "build": raw.get("build", {}),
        "bounds": {
            "bandwidth_gb_s": model.bandwidth,
            "peak_matmul_gflops": model.peak_gflops,
            "matmul_gflops": (raw.get("machine") or {}).get("matmul_gflops"),
        },
        "vision": [r.to_json() for r in vision],
        "llm": [r.to_json() for r in llm],
        "end_to_end": [r.to_json() for r in e2e],
        "budgets": [r.to_json() for r in budgets],
        "token_budgets": [r.to_json() for r in tokens],
        "token_budget_summary": {
            **tokens_summary,
            "accuracy": {k: v for k, v in (raw.get("token_accuracy") or {}).items() if k != "rows"},
        },
        "accuracy": {k: v for k, v in (raw.get("accuracy") or {}).items() if k != "rows"},
        "memory": memory.to_json(),
        "sweep": [r.to_json() for r in sweep_rows(raw)],
        "ratios": ratios,
        "ratios_measured_depth": ratios_measured,
        "ratios_proposed": compute_ratios(vision, llm, _as_default(e2e), budgets, memory.proposed, full=True)
        if proposed_ran
        else None,
        "targets": [t.to_json() for t in evaluate_targets(ratios, gpu_present)],
        "extrapolation": EXTRAPOLATION,
        "stages_s": raw.get("stages", {}),
        "raw": raw,
    }
