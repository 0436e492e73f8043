"""The report's ratios (our default against the references and the machine's bounds) and the
targets they are checked against.

Ratios and targets use the full-depth figures (what a user of the real model sees); the
measured-depth ratios are perf.json's `ratios_measured_depth`.
"""

from __future__ import annotations

from eyecare_edge.perf.rows import (
    BackendVision,
    BudgetRow,
    E2ERow,
    EndToEnd,
    LLMRow,
    LLMRun,
    RssFigures,
    TargetRow,
    TorchVision,
    VisionRow,
)

DEFAULT, FP32, BF16 = "eyecare-edge default", "transformers FP32", "transformers BF16"
# name -> (ratio key, comparison, threshold)
TARGETS: list[tuple[str, str, str, float]] = [
    ("decode Q4_K_M >= 5x transformers FP32", "decode_speedup_vs_fp32", ">=", 5.0),
    ("decode Q4_K_M >= 2x transformers BF16", "decode_speedup_vs_bf16", ">=", 2.0),
    ("decode >= 60% of the bandwidth bound", "decode_fraction_of_bound", ">=", 0.6),
    ("prefill of the image tokens >= transformers BF16", "prefill_speedup_vs_bf16", ">=", 1.0),
    ("vision per tile, best CPU backend >= 1.5x torch FP32", "vision_speedup_vs_fp32", ">=", 1.5),
    ("vision per tile, best CPU backend >= 1.0x torch BF16", "vision_speedup_vs_bf16", ">=", 1.0),
    ("TTFT >= 2.5x transformers FP32", "ttft_speedup_vs_fp32", ">=", 2.5),
    ("TTFT >= 1.2x transformers BF16", "ttft_speedup_vs_bf16", ">=", 1.2),
    ("fast budget TTFT <= 20 s at full depth", "fast_budget_ttft_s_full", "<=", 20.0),
    ("runtime peak RSS <= 1.3x the bundle files it loaded", "peak_rss_over_bundle", "<=", 1.3),
    ("default token budget TTFT <= 0.3x full-token TTFT", "ttft_default_over_full", "<=", 0.3),
    ("fast token budget TTFT <= 0.12x full-token TTFT", "ttft_fast_over_full", "<=", 0.12),
    ("default budget within 1 point of full-token accuracy", "accuracy_delta_default_points", ">=", -1.0),
    ("default-budget decode >= 60% of the bandwidth bound", "decode_fraction_of_bound_default", ">=", 0.6),
]
GPU_TARGETS: list[tuple[str, str, str, float]] = [
    ("GPU vision >= 3x torch eager FP16 per tile", "gpu_vision_speedup_vs_fp16", ">=", 3.0),
    ("TTFT for one 384^2 tile < 150 ms (GPU)", "gpu_ttft_one_tile_ms", "<", 150.0),
]


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def check(value: float | None, op: str, threshold: float) -> bool | None:
    if value is None:
        return None
    return {
        ">=": value >= threshold,
        "<=": value <= threshold,
        "<": value < threshold,
        ">": value > threshold,
    }[op]


def _speeds(row: LLMRun | EndToEnd | None, full: bool) -> tuple[float | None, float | None]:
    """(prefill tok/s, decode tok/s) of a row, at full or measured depth."""
    figures = getattr(row, "figures", None)
    if figures is None:
        return None, None
    pre, dec = figures.prefill, figures.decode
    prefill = (pre.prefill_tok_s_full if full else pre.prefill_tok_s) if pre else None
    if dec is None:
        return prefill, None
    if not full:
        return prefill, dec.decode_tok_s
    return prefill, dec.bounds.decode_tok_s_full if dec.bounds else None


def compute_ratios(
    vision: list[VisionRow],
    llm: list[LLMRow],
    e2e: list[E2ERow],
    budgets: list[BudgetRow],
    memory: RssFigures | None,
    full: bool = True,
) -> dict:
    """The `ratios` object: our default vs the references, at full depth (or measured: full=False)."""
    sfx = "_full" if full else ""
    llm_by = {r.system: r for r in llm if isinstance(r, LLMRun)}
    e2e_by = {r.system: r for r in e2e if isinstance(r, EndToEnd)}
    ours = e2e_by.get(DEFAULT)

    def ttft(system: str) -> float | None:
        row = e2e_by.get(system)
        return None if row is None else (row.ttft_ms_full if full else row.ttft_ms)

    def total(system: str) -> float | None:
        row = e2e_by.get(system)
        return None if row is None else (row.total_ms_full if full else row.total_ms)

    our_prefill, our_decode = _speeds(ours, full)
    fp32_prefill, fp32_decode = _speeds(llm_by.get(FP32), full)
    bf16_prefill, bf16_decode = _speeds(llm_by.get(BF16), full)
    our_figures = getattr(ours, "figures", None)
    decode_bounds = our_figures.decode.bounds if our_figures and our_figures.decode else None
    cpu = [r for r in vision if isinstance(r, BackendVision) and r.kind == "cpu" and r.ms_per_tile]
    best = min(cpu, key=lambda r: r.ms_per_tile) if cpu else None
    vis_ref = {r.dtype: r.ms_per_tile for r in vision if isinstance(r, TorchVision)}
    fast = next((b for b in budgets if b.name == "fast"), None)
    fast_ttft = None
    if fast is not None and fast.speed is not None:
        fast_ttft = fast.speed.ttft_ms_full if full else fast.speed.ttft_ms
    out = {
        "decode_speedup_vs_fp32": ratio(our_decode, fp32_decode),
        "decode_speedup_vs_bf16": ratio(our_decode, bf16_decode),
        "decode_fraction_of_bound": decode_bounds.decode_fraction_of_bound if decode_bounds else None,
        "prefill_speedup_vs_fp32": ratio(our_prefill, fp32_prefill),
        "prefill_speedup_vs_bf16": ratio(our_prefill, bf16_prefill),
        "prefill_fraction_of_bound": our_figures.prefill.prefill_fraction_of_bound
        if our_figures and our_figures.prefill
        else None,
        "vision_speedup_vs_fp32": ratio(vis_ref.get("fp32"), best.ms_per_tile) if best else None,
        "vision_speedup_vs_bf16": ratio(vis_ref.get("bf16"), best.ms_per_tile) if best else None,
        "vision_best_cpu_backend": best.system if best else None,
        "ttft_speedup_vs_fp32": ratio(ttft(FP32), ttft(DEFAULT)),
        "ttft_speedup_vs_bf16": ratio(ttft(BF16), ttft(DEFAULT)),
        "total_speedup_vs_fp32": ratio(total(FP32), total(DEFAULT)),
        "total_speedup_vs_bf16": ratio(total(BF16), total(DEFAULT)),
        "peak_rss_over_bundle": (memory.peak_rss_over_bundle_full if full else memory.peak_rss_over_bundle)
        if memory
        else None,
        "fast_budget_ttft_s" + sfx: ratio(fast_ttft, 1000.0) if fast else None,
    }
    gpu = [r for r in vision if isinstance(r, BackendVision) and r.kind == "gpu" and r.ms_per_tile]
    if gpu:
        out["gpu_vision_speedup_vs_fp16"] = ratio(vis_ref.get("fp16"), min(r.ms_per_tile for r in gpu))
    return out


def evaluate_targets(ratios: dict, gpu_present: bool) -> list[TargetRow]:
    rows = [TargetRow(name, key, ratios.get(key), op, t, check(ratios.get(key), op, t)) for name, key, op, t in TARGETS]
    for name, key, op, t in GPU_TARGETS:
        value = ratios.get(key)
        skipped = None if gpu_present else "no GPU on this machine"
        rows.append(TargetRow(name, key, value, op, t, check(value, op, t), skipped))
    return rows
