"""Raw perf results -> figures at the measured and at full depth, bounds, ratios, targets, table.

Pure functions of the dict `run.RunState.to_dict()` builds, so the arithmetic is tested without
running a model. Conventions:

- "measured" figures are at the depth the run used (`config.llm_layers`, `config.vision_layers`);
  "full" figures are extrapolated to the preset's depth with the work model of `costs`.
- Ratios and targets use the full-depth figures (what a user of the real model sees); the
  measured-depth ratios are in `ratios_measured_depth`.
- A time box (see `reference`) is visible in the rows: `prefill_tokens_measured` < `n_prompt`,
  `vision_composed`, `decode_tokens_measured` < n_decode - 1.
"""

from __future__ import annotations

from eyecare_edge import costs

SCHEMA = "eyecare-edge-perf/1"
MB = 1e6
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}
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
]
GPU_TARGETS: list[tuple[str, str, str, float]] = [
    ("GPU vision >= 3x torch eager FP16 per tile", "gpu_vision_speedup_vs_fp16", ">=", 3.0),
    ("TTFT for one 384^2 tile < 150 ms (GPU)", "gpu_ttft_one_tile_ms", "<", 150.0),
]

EXTRAPOLATION = (
    "Depth is cut at full width; each cost is t_full = t_measured * W(full) / W(measured) with "
    "W = fixed + layers * per_layer work: FLOPs for vision per tile (patch embedding and projector "
    "fixed; SigLIP blocks with their attention per layer) and for prefill (decoder layers with causal "
    "attention per layer; one LM-head row fixed), weight bytes read per token for decode (per layer: "
    "the layer's bytes from the GGUF tensor table or params x dtype size, plus its KV cache at the "
    "prompt length; fixed: LM head, final norm, one embedding row). Image decoding, preprocessing and "
    "sampling do not depend on depth. Peak RSS adds, per missing layer, its weight bytes and its KV "
    "cache (n_ctx positions for llama.cpp, the prompt for transformers). A figure's fraction of its "
    "bound is unchanged by the extrapolation."
)


# ------------------------------------------------------------------------- small helpers


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


def _ok(row: dict) -> bool:
    return bool(row) and "error" not in row and "skipped" not in row


def _wb_from(d: dict) -> costs.WeightBytes:
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

    def weight_bytes(self, system: str) -> costs.WeightBytes | None:
        """WeightBytes of `fp32`/`bf16` (transformers) or a GGUF type."""
        if system in ("fp32", "bf16", "fp16"):
            return costs.torch_weight_bytes(self.llm, system)
        return self.gguf.get(system)


# ------------------------------------------------------------------------- sections


def vision_rows(raw: dict, model: Model) -> list[dict]:
    rows = []
    for ref in raw.get("references", []):
        if _ok(ref) and ref.get("vision_ms_per_tile"):
            rows.append(
                {
                    "system": f"torch eager {ref['dtype'].upper()}",
                    "kind": "reference",
                    "dtype": ref["dtype"],
                    "ms_per_tile": ref["vision_ms_per_tile"],
                }
            )
        elif "error" in ref:
            rows.append(
                {"system": f"torch eager ({ref.get('system')})", "kind": "reference", "error": ref["error"]}
            )
    for v in raw.get("vision", []):
        if _ok(v):
            rows.append(
                {
                    "system": v["system"],
                    "kind": v.get("kind", "cpu"),
                    "backend": v["backend"],
                    "precision": v["precision"],
                    "ms_per_tile": v["ms_per_tile"],
                    "load_s": v.get("load_s"),
                    "peak_rss_bytes": v.get("peak_rss_bytes"),
                }
            )
        else:
            rows.append(
                {k: v[k] for k in ("system", "skipped", "error") if k in v} | {"kind": v.get("kind", "cpu")}
            )
    flops = model.vision.flops_per_tile()
    for r in rows:
        if r.get("ms_per_tile"):
            r["ms_per_tile_full"] = r["ms_per_tile"] * model.vision_scale
            r["gflops"] = flops / (r["ms_per_tile"] / 1000.0) / 1e9
            r["fraction_of_peak"] = costs.fraction(r["gflops"], model.peak_gflops)
    return rows


def _llm_figures(model: Model, row: dict, wb: costs.WeightBytes | None, kv: float, context: int) -> dict:
    n = row["n_prompt"]
    out: dict = {}
    if row.get("prefill_tok_s"):
        r = row["prefill_tok_s"]
        out["prefill_tok_s"] = r
        out["prefill_tok_s_full"] = r / model.prefill_scale(n)
        bound = costs.prefill_bound_tok_s(model.peak_gflops, model.llm.prefill_flops(n), n)
        out["prefill_bound_tok_s"] = bound
        out["prefill_fraction_of_bound"] = costs.fraction(r, bound)
    if row.get("decode_tok_s") and wb is not None:
        r = row["decode_tok_s"]
        b_meas = model.decode_bytes(wb, context, kv, full=False)
        b_full = model.decode_bytes(wb, context, kv, full=True)
        out["decode_tok_s"] = r
        out["decode_tok_s_full"] = r * b_meas / b_full
        out["decode_bytes_per_token"] = b_meas
        out["decode_bytes_per_token_full"] = b_full
        out["decode_bound_tok_s"] = costs.decode_bound_tok_s(model.bandwidth, b_meas)
        out["decode_bound_tok_s_full"] = costs.decode_bound_tok_s(model.bandwidth, b_full)
        out["decode_fraction_of_bound"] = costs.fraction(r, out["decode_bound_tok_s"])
    elif row.get("decode_tok_s"):
        out["decode_tok_s"] = row["decode_tok_s"]
    return out


def llm_rows(raw: dict, model: Model) -> list[dict]:
    rows = []
    for ref in raw.get("references", []):
        name = ref.get("system", "transformers")
        if not _ok(ref):
            rows.append(
                {"system": name, "kind": "reference", **{k: ref[k] for k in ("error", "skipped") if k in ref}}
            )
            continue
        dtype = ref["dtype"]
        wb = model.weight_bytes(dtype)
        row = {
            "system": name,
            "kind": "reference",
            "weights": dtype,
            "n_prompt": ref["n_prompt"],
            "prefill_tokens_measured": ref.get("prefill_tokens_measured"),
            "decode_tokens_measured": ref.get("decode_tokens_measured"),
            "weight_bytes": wb.total(model.llm.layers) if wb else None,
            "weight_bytes_full": wb.total(model.llm_full.layers) if wb else None,
            "peak_rss_bytes": ref.get("peak_rss_bytes"),
        }
        row.update(
            _llm_figures(
                model,
                ref,
                wb,
                costs.BYTES_PER_PARAM[dtype],
                ref.get("decode_context") or ref["n_prompt"],
            )
        )
        rows.append(row)
    for v in raw.get("llm", []):
        name = v.get("system", "llama.cpp")
        if not _ok(v):
            rows.append(
                {"system": name, "kind": "llama.cpp", **{k: v[k] for k in ("error", "skipped") if k in v}}
            )
            continue
        q = v["precision"]
        wb = model.weight_bytes(q)
        kv = KV_BYTES.get((v.get("options") or {}).get("kv_type") or "f16", 2.0)
        row = {
            "system": name,
            "kind": "llama.cpp",
            "weights": q,
            "n_prompt": v["n_prompt"],
            "prefill_tokens_measured": v.get("prefill_tokens_measured"),
            "decode_tokens_measured": v.get("decode_tokens_measured"),
            "weight_bytes": v.get("file_bytes"),
            "weight_bytes_full": (v["file_bytes"] + model.d_llm * wb.per_layer)
            if wb and v.get("file_bytes")
            else None,
            "peak_rss_bytes": v.get("peak_rss_bytes"),
            "from": v.get("from"),
        }
        row.update(_llm_figures(model, v, wb, kv, v["n_prompt"]))
        rows.append(row)
    return rows


def _split_ttft(t: dict) -> dict:
    """Pipeline timings -> depth-independent part, vision, prefill (ms)."""
    fixed = t.get("decode_ms", 0.0) + t.get("preprocess_ms", 0.0)
    vision = t.get("vision_ms", 0.0)
    prefill = t.get("prefill_ms", 0.0)
    other = max(t.get("first_token_ms", 0.0) - fixed - vision - prefill, 0.0)
    return {"decode_preprocess_ms": fixed, "vision_ms": vision, "prefill_ms": prefill, "other_ms": other}


def _ttft_full(model: Model, parts: dict, n_prompt: int) -> float:
    return (
        parts["decode_preprocess_ms"]
        + parts.get("other_ms", 0.0)
        + parts["vision_ms"] * model.vision_scale
        + parts["prefill_ms"] * model.prefill_scale(n_prompt)
    )


def e2e_rows(raw: dict, model: Model, llm: list[dict]) -> list[dict]:
    n_dec = raw.get("config", {}).get("n_decode", 64)
    by_system = {r["system"]: r for r in llm}
    rows = []
    for ref in raw.get("references", []):
        if not _ok(ref):
            continue
        parts = {k: ref[k] for k in ("decode_preprocess_ms", "vision_ms", "prefill_ms")}
        figs = by_system.get(ref["system"], {})
        rows.append(_e2e(model, ref["system"], parts, ref["n_prompt"], ref.get("n_tiles"), figs, n_dec, ref))
    for key, name in (("pipeline", "eyecare-edge default"), ("proposed", "eyecare-edge proposed")):
        p = raw.get(key, {})
        if _ok(p):
            rows.append(_pipeline_row(model, name, p, n_dec))
        elif p:
            rows.append({"system": name, "error": p.get("error")})
    return rows


def _pipeline_row(model: Model, name: str, p: dict, n_dec: int) -> dict:
    """An end-to-end row of our Pipeline, with its own prefill/decode figures and bounds."""
    wb = model.gguf.get(p.get("llm_precision"))
    kv = KV_BYTES.get((p.get("options") or {}).get("kv_type") or "f16", 2.0)
    n = p["n_prompt"]
    src = {
        "n_prompt": n,
        "prefill_tok_s": n / (p["timings"]["prefill_ms"] / 1000.0),
        "decode_tok_s": p.get("decode_tok_s"),
    }
    figs = _llm_figures(model, src, wb, kv, n)
    row = _e2e(model, name, _split_ttft(p["timings"]), n, p.get("n_tiles"), figs, n_dec, p)
    row.update(figs)
    row["describe"] = p.get("describe")
    row["settings"] = p.get("proposed") or {
        k: (p.get("options") or {}).get(k)
        for k in ("n_batch", "repack", "flash_attn", "kv_type", "n_threads")
    }
    if p.get("n_generated", 0) >= n_dec:
        row["total_ms_answer"] = p["timings"].get("total_ms")
    return row


def _e2e(model, name, parts, n_prompt, n_tiles, figs, n_dec, src) -> dict:
    ttft = sum(parts.values())
    ttft_full = _ttft_full(model, parts, n_prompt)
    dec, dec_full = figs.get("decode_tok_s"), figs.get("decode_tok_s_full")
    return {
        "system": name,
        "n_prompt": n_prompt,
        "n_tiles": n_tiles,
        **parts,
        "ttft_ms": ttft,
        "ttft_ms_full": ttft_full,
        "total_ms": ttft + (n_dec - 1) * 1000.0 / dec if dec else None,
        "total_ms_full": ttft_full + (n_dec - 1) * 1000.0 / dec_full if dec_full else None,
        "vision_composed": src.get("vision_composed", False),
        "peak_rss_bytes": src.get("peak_rss_bytes"),
    }


def budget_rows(raw: dict, model: Model) -> list[dict]:
    acc = {r["name"]: r for r in (raw.get("accuracy") or {}).get("rows", []) if isinstance(r, dict)}
    rows = []
    for b in raw.get("budgets", []):
        row = {k: b.get(k) for k in ("name", "max_tiles", "anyres_max", "from")}
        if "timings" in b:
            parts = _split_ttft(b["timings"])
            row.update(
                n_tiles=b["n_tiles"],
                n_image_tokens=b["n_image_tokens"],
                n_prompt=b["n_prompt"],
                ttft_ms=b["timings"].get("first_token_ms"),
                ttft_ms_full=_ttft_full(model, parts, b["n_prompt"]),
                **parts,
            )
        for k in ("error", "skipped"):
            if k in b:
                row[k] = b[k]
        a = acc.get(b.get("name"))
        if a is not None:
            row["accuracy"] = a.get("accuracy")
            row["accuracy_n"] = a.get("n")
            row["accuracy_ci"] = [a.get("ci_low"), a.get("ci_high")] if a.get("ci_low") is not None else None
            if "skipped" in a:
                row["accuracy_skipped"] = a["skipped"]
        rows.append(row)
    return rows


def memory_summary(raw: dict, model: Model, key: str = "pipeline") -> dict:
    """Runtime peak RSS against the bundle files it loaded, measured and at full depth."""
    p = raw.get(key, {})
    out: dict = {}
    if not _ok(p):
        return out
    files = p.get("loaded_files", {})
    loaded = float(sum(files.values()))
    rss = float(p["peak_rss_bytes"])
    q = p.get("llm_precision")
    wb = model.gguf.get(q)
    vision_p = p.get("vision_precision", "fp32")
    v_layer = (
        costs.vision_weight_bytes(model.vision, vision_p)[0] if vision_p in costs.BYTES_PER_PARAM else 0.0
    )
    llm_layer = wb.per_layer if wb else 0.0
    kv_layer = model.llm.with_layers(1).kv_bytes(
        p.get("n_ctx") or 4096, KV_BYTES.get(p.get("options", {}).get("kv_type", "f16"), 2.0)
    )
    loaded_full = loaded + model.d_llm * llm_layer + model.d_vision * v_layer
    rss_full = rss + model.d_llm * (llm_layer + kv_layer) + model.d_vision * v_layer
    out.update(
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
    refs = {}
    for ref in raw.get("references", []):
        if _ok(ref) and ref.get("peak_rss_bytes"):
            s = costs.BYTES_PER_PARAM[ref["dtype"]]
            per_layer = model.llm.layer_params * s + model.llm.with_layers(1).kv_bytes(ref["n_prompt"], s)
            refs[ref["system"]] = {
                "peak_rss_bytes": ref["peak_rss_bytes"],
                "peak_rss_bytes_full": ref["peak_rss_bytes"]
                + model.d_llm * per_layer
                + model.d_vision * model.vision.layer_params * s,
            }
    out["references"] = refs
    return out


def compute_ratios(
    vision: list[dict], llm: list[dict], e2e: list[dict], budgets: list[dict], memory: dict, full: bool = True
) -> dict:
    """The `ratios` object: our default vs the references, at full depth (or measured: full=False)."""
    sfx = "_full" if full else ""

    def get(rows, system, key):
        row = next((r for r in rows if r.get("system") == system), None)
        return None if row is None else row.get(key + sfx)

    ours = next((r for r in e2e if r.get("system") == "eyecare-edge default" and "ttft_ms" in r), {})
    fp32, bf16 = "transformers FP32", "transformers BF16"
    cpu = [r for r in vision if r.get("kind") == "cpu" and r.get("ms_per_tile")]
    best = min(cpu, key=lambda r: r["ms_per_tile"]) if cpu else None
    vis_ref = {r.get("dtype"): r.get("ms_per_tile") for r in vision if r.get("kind") == "reference"}
    fast = next((b for b in budgets if b.get("name") == "fast"), None)
    out = {
        "decode_speedup_vs_fp32": ratio(ours.get("decode_tok_s" + sfx), get(llm, fp32, "decode_tok_s")),
        "decode_speedup_vs_bf16": ratio(ours.get("decode_tok_s" + sfx), get(llm, bf16, "decode_tok_s")),
        "decode_fraction_of_bound": ours.get("decode_fraction_of_bound"),
        "prefill_speedup_vs_fp32": ratio(ours.get("prefill_tok_s" + sfx), get(llm, fp32, "prefill_tok_s")),
        "prefill_speedup_vs_bf16": ratio(ours.get("prefill_tok_s" + sfx), get(llm, bf16, "prefill_tok_s")),
        "prefill_fraction_of_bound": ours.get("prefill_fraction_of_bound"),
        "vision_speedup_vs_fp32": ratio(vis_ref.get("fp32"), best["ms_per_tile"]) if best else None,
        "vision_speedup_vs_bf16": ratio(vis_ref.get("bf16"), best["ms_per_tile"]) if best else None,
        "vision_best_cpu_backend": best["system"] if best else None,
        "ttft_speedup_vs_fp32": ratio(get(e2e, fp32, "ttft_ms"), get(e2e, "eyecare-edge default", "ttft_ms")),
        "ttft_speedup_vs_bf16": ratio(get(e2e, bf16, "ttft_ms"), get(e2e, "eyecare-edge default", "ttft_ms")),
        "total_speedup_vs_fp32": ratio(
            get(e2e, fp32, "total_ms"), get(e2e, "eyecare-edge default", "total_ms")
        ),
        "total_speedup_vs_bf16": ratio(
            get(e2e, bf16, "total_ms"), get(e2e, "eyecare-edge default", "total_ms")
        ),
        "peak_rss_over_bundle": memory.get("peak_rss_over_bundle" + sfx),
        "fast_budget_ttft_s" + sfx: ratio(fast.get("ttft_ms" + sfx), 1000.0) if fast else None,
    }
    gpu = [r for r in vision if r.get("kind") == "gpu" and r.get("ms_per_tile")]
    if gpu:
        out["gpu_vision_speedup_vs_fp16"] = ratio(vis_ref.get("fp16"), min(r["ms_per_tile"] for r in gpu))
    return out


def evaluate_targets(ratios: dict, gpu_present: bool) -> list[dict]:
    rows = []
    for name, key, op, threshold in TARGETS:
        value = ratios.get(key)
        rows.append(
            {
                "target": name,
                "key": key,
                "value": value,
                "op": op,
                "threshold": threshold,
                "met": check(value, op, threshold),
            }
        )
    for name, key, op, threshold in GPU_TARGETS:
        value = ratios.get(key)
        row = {
            "target": name,
            "key": key,
            "value": value,
            "op": op,
            "threshold": threshold,
            "met": check(value, op, threshold),
        }
        if not gpu_present:
            row["skipped"] = "no GPU on this machine"
        rows.append(row)
    return rows


def build_report(raw: dict) -> dict:
    """The full report: raw results kept under `raw`, figures, ratios and targets on top."""
    model = Model(raw)
    vision = vision_rows(raw, model)
    llm = llm_rows(raw, model)
    e2e = e2e_rows(raw, model, llm)
    budgets = budget_rows(raw, model)
    memory = memory_summary(raw, model)
    gpu_tile = raw.get("gpu_one_tile") or {}
    if raw.get("proposed"):
        memory["proposed"] = {
            k: v for k, v in memory_summary(raw, model, "proposed").items() if k != "references"
        }
    ratios = compute_ratios(vision, llm, e2e, budgets, memory, full=True)
    ratios_measured = compute_ratios(vision, llm, e2e, budgets, memory, full=False)
    from eyecare_edge.perf import tokens as token_table

    token_rows = token_table.token_rows(raw, model, _split_ttft, _ttft_full, memory_summary)
    token_summary, token_ratios = token_table.token_summary(token_rows)
    if token_ratios.get("peak_rss_over_bundle") is not None:  # at the default budget from now on
        ratios["peak_rss_over_bundle_full_tokens"] = ratios.get("peak_rss_over_bundle")
    ratios.update({k: v for k, v in token_ratios.items() if v is not None or k not in ratios})
    if _ok(gpu_tile):
        ratios["gpu_ttft_one_tile_ms"] = gpu_tile["timings"].get("first_token_ms")
    gpu_present = bool(raw.get("gpu", {}).get("present"))
    config = dict(raw.get("config", {}))
    p = raw.get("pipeline", {})
    config["backends"] = {
        "vision_default": f"{p.get('vision_backend')} {p.get('vision_precision')}" if _ok(p) else None,
        "llm_default": p.get("llm_precision") if _ok(p) else None,
        # where each half ran (GPU n / CPU; llama.cpp's offload), and why faster vision backends were skipped
        "vision_device": p.get("vision_device") if _ok(p) else None,
        "vision_skipped": p.get("vision_skipped") if _ok(p) else None,
        "llm_device": p.get("llm_device") if _ok(p) else None,
        "llm_settings": {
            k: (p.get("options") or {}).get(k)
            for k in ("n_batch", "repack", "flash_attn", "kv_type", "n_threads")
        }
        if _ok(p)
        else None,
        "n_ctx": p.get("n_ctx"),
        "vision_best_cpu": ratios.get("vision_best_cpu_backend"),
    }
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
        "vision": vision,
        "llm": llm,
        "end_to_end": e2e,
        "budgets": budgets,
        "token_budgets": token_rows,
        "token_budget_summary": {
            **token_summary,
            "accuracy": {k: v for k, v in (raw.get("token_accuracy") or {}).items() if k != "rows"},
        },
        "accuracy": {k: v for k, v in (raw.get("accuracy") or {}).items() if k != "rows"},
        "memory": memory,
        "sweep": sweep_rows(raw),
        "ratios": ratios,
        "ratios_measured_depth": ratios_measured,
        "ratios_proposed": compute_ratios(
            vision, llm, _as_default(e2e), budgets, memory.get("proposed") or {}, full=True
        )
        if any(r.get("system") == "eyecare-edge proposed" and "ttft_ms" in r for r in e2e)
        else None,
        "targets": evaluate_targets(ratios, gpu_present),
        "extrapolation": EXTRAPOLATION,
        "stages_s": raw.get("stages", {}),
        "raw": raw,
    }


def _as_default(e2e: list[dict]) -> list[dict]:
    """The end-to-end rows with "eyecare-edge proposed" standing in for the default (ratios of the
    proposed settings)."""
    rows = [r for r in e2e if r.get("system") != "eyecare-edge default"]
    return [
        {**r, "system": "eyecare-edge default"} if r.get("system") == "eyecare-edge proposed" else r
        for r in rows
    ]


def sweep_rows(raw: dict) -> list[dict]:
    rows = []
    for r in raw.get("sweep", []):
        row = {
            "setting": r.get("setting"),
            **{k: r.get(k) for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_bytes")},
        }
        for k in ("error", "skipped"):
            if k in r:
                row[k] = r[k]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------- table


def _f(v, fmt: str = "{:.1f}", none: str = "-") -> str:
    if v is None:
        return none
    try:
        return fmt.format(v)
    except (TypeError, ValueError):
        return str(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def render_table(report: dict) -> str:
    """A readable plain-text version of the report (what the command prints)."""
    c, m, b = report["config"], report["machine"], report["bounds"]
    img = c.get("image", {})
    lines = [
        f"eyecare-edge perf: {c.get('preset')} at LLM {c.get('llm_layers')}/{c.get('full_llm_layers')} and "
        f"vision {c.get('vision_layers')}/{c.get('full_vision_layers')} layers (full width; 'full' columns "
        "extrapolated to full depth)",
        f"image {img.get('width')}x{img.get('height')} ({img.get('source')}: {img.get('path')}); "
        f"{c.get('threads')} threads; load average {m.get('load_average_start')} -> {m.get('load_average_end')}",
        f"machine: {m.get('cpu')}; {m.get('physical_cores')} cores; flags {','.join(m.get('flags', []))}; "
        f"native BF16: {'yes' if m.get('native_bf16') else 'no'}",
        f"limits: memory bandwidth {_f(b.get('bandwidth_gb_s'))} GB/s; matmul GFLOP/s "
        + ", ".join(f"{k} {_f(v)}" for k, v in (b.get("matmul_gflops") or {}).items()),
        "",
        f"Vision encode, one {c.get('tile_size', 384)}^2 tile",
    ]
    bk = c.get("backends") or {}
    if bk.get("vision_default"):  # where the runtime's default pipeline ran each half
        where = f"runtime default: vision {bk['vision_default']} on {bk.get('vision_device') or '?'}; "
        lines.insert(4, where + f"llm {bk.get('llm_default')} on {bk.get('llm_device') or '?'}")
    rows = []
    for r in report["vision"]:
        if r.get("ms_per_tile"):
            rows.append(
                [
                    r["system"],
                    _f(r["ms_per_tile"], "{:.0f}"),
                    _f(r.get("ms_per_tile_full"), "{:.0f}"),
                    _f(r.get("gflops")),
                    _f(r.get("peak_rss_bytes") and r["peak_rss_bytes"] / MB, "{:.0f}"),
                    "",
                ]
            )
        else:
            note = r.get("skipped") or "failed: " + str(r.get("error", "")).splitlines()[0]
            rows.append([r["system"], "-", "-", "-", "-", note[:100]])
    lines += _table(["system", "ms/tile", "ms/tile full", "GFLOP/s", "peak RSS MB", "note"], rows)
    lines += ["", "LLM on the image prompt (prefill) and greedy decode"]
    rows = []
    for r in report["llm"]:
        if "error" in r or "skipped" in r:
            rows.append([r["system"], *["-"] * 8, (r.get("skipped") or "failed")[:60]])
            continue
        cut = ""
        if (
            r.get("prefill_tokens_measured")
            and r.get("n_prompt")
            and r["prefill_tokens_measured"] < r["n_prompt"]
        ):
            cut = f"prefill measured on {r['prefill_tokens_measured']} of {r['n_prompt']}"
        rows.append(
            [
                r["system"],
                _f(r.get("prefill_tok_s")),
                _f(r.get("prefill_tok_s_full")),
                _f(r.get("prefill_fraction_of_bound"), "{:.0%}"),
                _f(r.get("decode_tok_s")),
                _f(r.get("decode_tok_s_full"), "{:.2f}"),
                _f(r.get("decode_fraction_of_bound"), "{:.0%}"),
                _f(r.get("weight_bytes_full") and r["weight_bytes_full"] / MB, "{:.0f}"),
                _f(r.get("peak_rss_bytes") and r["peak_rss_bytes"] / MB, "{:.0f}"),
                cut,
            ]
        )
    lines += _table(
        [
            "system",
            "prefill t/s",
            "full",
            "of bound",
            "decode t/s",
            "full",
            "of bound",
            "weights MB full",
            "peak RSS MB",
            "note",
        ],
        rows,
    )
    lines += ["", f"End to end: one image, a {c.get('n_decode')}-token answer (ms)"]
    rows = []
    for r in report["end_to_end"]:
        if "error" in r:
            rows.append([r["system"], *["-"] * 8])
            continue
        rows.append(
            [
                r["system"],
                str(r.get("n_tiles")),
                str(r.get("n_prompt")),
                _f(r.get("decode_preprocess_ms"), "{:.0f}"),
                _f(r.get("vision_ms"), "{:.0f}"),
                _f(r.get("prefill_ms"), "{:.0f}"),
                _f(r.get("ttft_ms"), "{:.0f}"),
                _f(r.get("total_ms"), "{:.0f}"),
                _f(r.get("ttft_ms_full") and r["ttft_ms_full"] / 1000, "{:.1f} s"),
                _f(r.get("total_ms_full") and r["total_ms_full"] / 1000, "{:.1f} s"),
            ]
        )
    lines += _table(
        [
            "system",
            "tiles",
            "prompt",
            "decode+pre",
            "vision",
            "prefill",
            "TTFT",
            "total",
            "TTFT full",
            "total full",
        ],
        rows,
    )
    lines += ["", "Token budgets (eyecare-edge default settings)"]
    rows = []
    for r in report["budgets"]:
        if "ttft_ms" in r:
            rows.append(
                [
                    r["name"],
                    _f(r.get("max_tiles"), "{}"),
                    _f(r.get("anyres_max"), "{}", "bundle"),
                    str(r.get("n_tiles")),
                    str(r.get("n_image_tokens")),
                    _f(r.get("ttft_ms"), "{:.0f}"),
                    _f(r.get("ttft_ms_full") and r["ttft_ms_full"] / 1000, "{:.1f} s"),
                    _f(r.get("accuracy"), "{:.1%}")
                    + (
                        f" [{r['accuracy_ci'][0]:.0%}, {r['accuracy_ci'][1]:.0%}] n={r.get('accuracy_n')}"
                        if r.get("accuracy_ci")
                        else ""
                    ),
                ]
            )
        else:
            rows.append([r["name"], *["-"] * 6, (r.get("skipped") or "failed")[:60]])
    lines += _table(
        [
            "budget",
            "max tiles",
            "anyres_max",
            "tiles",
            "image tokens",
            "TTFT ms",
            "TTFT full",
            "accuracy [95% CI]",
        ],
        rows,
    )
    acc = report.get("accuracy") or {}
    if acc.get("skipped") or acc.get("error"):
        lines.append(f"accuracy: {acc.get('skipped') or 'failed: ' + str(acc.get('error')).splitlines()[0]}")
    mem = report.get("memory") or {}
    if mem:
        lines += [
            "",
            f"Memory: eyecare-edge default peak RSS {_f(mem['peak_rss_bytes'] / MB, '{:.0f}')} MB for "
            f"{_f(mem['loaded_bytes'] / MB, '{:.0f}')} MB of bundle files loaded "
            f"(x{_f(mem.get('peak_rss_over_bundle'), '{:.2f}')}); full depth "
            f"{_f(mem['peak_rss_bytes_full'] / MB, '{:.0f}')} MB for {_f(mem['loaded_bytes_full'] / MB, '{:.0f}')} MB "
            f"(x{_f(mem.get('peak_rss_over_bundle_full'), '{:.2f}')})",
        ]
    if mem.get("proposed"):
        mp = mem["proposed"]
        lines.append(
            f"Memory: eyecare-edge proposed peak RSS {_f(mp['peak_rss_bytes'] / MB, '{:.0f}')} MB "
            f"(x{_f(mp.get('peak_rss_over_bundle'), '{:.2f}')}); full depth x{_f(mp.get('peak_rss_over_bundle_full'), '{:.2f}')}"
        )
    if report.get("token_budgets"):
        from eyecare_edge.perf.tokens import render_token_table

        lines += render_token_table(report["token_budgets"], report.get("token_budget_summary") or {}, _f)
    if report.get("sweep"):
        lines += ["", "llama.cpp settings (default weight type)"]
        lines += _table(
            ["setting", "prefill t/s", "decode t/s", "peak RSS MB"],
            [
                [
                    r.get("setting") or "-",
                    _f(r.get("prefill_tok_s")),
                    _f(r.get("decode_tok_s")),
                    _f(r.get("peak_rss_bytes") and r["peak_rss_bytes"] / MB, "{:.0f}"),
                ]
                for r in report["sweep"]
            ],
        )
    prop = report.get("ratios_proposed") or {}
    lines += ["", "Targets (full-depth figures; 'proposed' = the settings of `--proposed`)"]
    rows = []
    for t in report["targets"]:
        met = "skipped" if t.get("skipped") else {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        pv = prop.get(t["key"])
        pmet = {True: "met", False: "MISSED", None: "-"}[check(pv, t["op"], t["threshold"])] if prop else "-"
        rows.append(
            [
                t["target"],
                _f(t["value"], "{:.3g}"),
                f"{t['op']} {t['threshold']:g}",
                met,
                _f(pv, "{:.3g}"),
                pmet,
            ]
        )
    lines += _table(["target", "default", "needs", "status", "proposed", "status"], rows)
    return "\n".join(lines)
