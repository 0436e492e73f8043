"""The plain-text table `eyecare-edge perf` prints, drawn from the report (perf.json).

The rows are read back into the dataclasses of `rows` and `token_report` (the report may come
from disk), so each section reads named fields.
"""

from __future__ import annotations

from eyecare_edge.perf.ratios import check
from eyecare_edge.perf.rows import (
    BackendVision,
    BudgetRow,
    EndToEndFailed,
    Failed,
    LLMRun,
    Memory,
    SweepRow,
    TargetRow,
    parse_e2e,
    parse_llm,
    parse_vision,
)
from eyecare_edge.perf.token_report import TokenRow

MB = 1e6


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


def _first_line(error: object) -> str:
    return (str(error or "").splitlines() or [""])[0]


def _header(report: dict) -> list[str]:
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
    return lines


def _vision(report: dict) -> list[str]:
    rows = []
    for r in map(parse_vision, report["vision"]):
        if not isinstance(r, Failed) and r.ms_per_tile:
            rss = r.peak_rss_bytes if isinstance(r, BackendVision) else None
            fig = r.figures
            rows.append(
                [
                    r.system,
                    _f(r.ms_per_tile, "{:.0f}"),
                    _f(fig.ms_per_tile_full if fig else None, "{:.0f}"),
                    _f(fig.gflops if fig else None),
                    _f(rss and rss / MB, "{:.0f}"),
                    "",
                ]
            )
        else:
            skipped, error = getattr(r, "skipped", None), getattr(r, "error", None)
            rows.append([r.system, "-", "-", "-", "-", (skipped or "failed: " + _first_line(error))[:100]])
    return _table(["system", "ms/tile", "ms/tile full", "GFLOP/s", "peak RSS MB", "note"], rows)


def _llm(report: dict) -> list[str]:
    rows = []
    for r in map(parse_llm, report["llm"]):
        if not isinstance(r, LLMRun):
            rows.append([r.system, *["-"] * 8, (r.skipped or "failed")[:60]])
            continue
        cut = ""
        if r.prefill_tokens_measured and r.n_prompt and r.prefill_tokens_measured < r.n_prompt:
            cut = f"prefill measured on {r.prefill_tokens_measured} of {r.n_prompt}"
        pre, dec = r.figures.prefill, r.figures.decode
        bounds = dec.bounds if dec else None
        rows.append(
            [
                r.system,
                _f(pre.prefill_tok_s if pre else None),
                _f(pre.prefill_tok_s_full if pre else None),
                _f(pre.prefill_fraction_of_bound if pre else None, "{:.0%}"),
                _f(dec.decode_tok_s if dec else None),
                _f(bounds.decode_tok_s_full if bounds else None, "{:.2f}"),
                _f(bounds.decode_fraction_of_bound if bounds else None, "{:.0%}"),
                _f(r.weight_bytes_full and r.weight_bytes_full / MB, "{:.0f}"),
                _f(r.peak_rss_bytes and r.peak_rss_bytes / MB, "{:.0f}"),
                cut,
            ]
        )
    header = ["system", "prefill t/s", "full", "of bound", "decode t/s", "full", "of bound"]
    return _table([*header, "weights MB full", "peak RSS MB", "note"], rows)


def _end_to_end(report: dict) -> list[str]:
    rows = []
    for r in map(parse_e2e, report["end_to_end"]):
        if isinstance(r, EndToEndFailed):
            rows.append([r.system, *["-"] * 9])
            continue
        rows.append(
            [
                r.system,
                str(r.n_tiles),
                str(r.n_prompt),
                _f(r.parts.decode_preprocess_ms, "{:.0f}"),
                _f(r.parts.vision_ms, "{:.0f}"),
                _f(r.parts.prefill_ms, "{:.0f}"),
                _f(r.ttft_ms, "{:.0f}"),
                _f(r.total_ms, "{:.0f}"),
                _f(r.ttft_ms_full and r.ttft_ms_full / 1000, "{:.1f} s"),
                _f(r.total_ms_full and r.total_ms_full / 1000, "{:.1f} s"),
            ]
        )
    header = ["system", "tiles", "prompt", "decode+pre", "vision", "prefill", "TTFT", "total"]
    return _table([*header, "TTFT full", "total full"], rows)


def _budgets(report: dict) -> list[str]:
    rows = []
    for r in map(BudgetRow.from_json, report["budgets"]):
        if r.speed is None:
            rows.append([r.name, *["-"] * 6, (r.skipped or "failed")[:60]])
            continue
        a = r.accuracy
        acc = _f(a.accuracy if a else None, "{:.1%}")
        if a and a.accuracy_ci:
            acc += f" [{a.accuracy_ci[0]:.0%}, {a.accuracy_ci[1]:.0%}] n={a.accuracy_n}"
        s = r.speed
        rows.append(
            [
                r.name,
                _f(r.max_tiles, "{}"),
                _f(r.anyres_max, "{}", "bundle"),
                str(s.n_tiles),
                str(s.n_image_tokens),
                _f(s.ttft_ms, "{:.0f}"),
                _f(s.ttft_ms_full and s.ttft_ms_full / 1000, "{:.1f} s"),
                acc,
            ]
        )
    header = ["budget", "max tiles", "anyres_max", "tiles", "image tokens", "TTFT ms", "TTFT full"]
    return _table([*header, "accuracy [95% CI]"], rows)


def _memory(report: dict) -> list[str]:
    lines = []
    acc = report.get("accuracy") or {}
    if acc.get("skipped") or acc.get("error"):
        lines.append(f"accuracy: {acc.get('skipped') or 'failed: ' + _first_line(acc.get('error'))}")
    mem = Memory.from_json(report.get("memory") or {})
    if mem.default is not None:
        d = mem.default
        lines += [
            "",
            f"Memory: eyecare-edge default peak RSS {_f(d.peak_rss_bytes / MB, '{:.0f}')} MB for "
            f"{_f(d.loaded_bytes / MB, '{:.0f}')} MB of bundle files loaded "
            f"(x{_f(d.peak_rss_over_bundle, '{:.2f}')}); full depth "
            f"{_f(d.peak_rss_bytes_full / MB, '{:.0f}')} MB for {_f(d.loaded_bytes_full / MB, '{:.0f}')} MB "
            f"(x{_f(d.peak_rss_over_bundle_full, '{:.2f}')})",
        ]
    if mem.proposed is not None:
        mp = mem.proposed
        lines.append(
            f"Memory: eyecare-edge proposed peak RSS {_f(mp.peak_rss_bytes / MB, '{:.0f}')} MB "
            f"(x{_f(mp.peak_rss_over_bundle, '{:.2f}')}); full depth x{_f(mp.peak_rss_over_bundle_full, '{:.2f}')}"
        )
    return lines


def _sweep(report: dict) -> list[str]:
    if not report.get("sweep"):
        return []
    rows = [
        [
            r.setting or "-",
            _f(r.prefill_tok_s),
            _f(r.decode_tok_s),
            _f(r.peak_rss_bytes and r.peak_rss_bytes / MB, "{:.0f}"),
        ]
        for r in map(SweepRow.from_json, report["sweep"])
    ]
    header = ["setting", "prefill t/s", "decode t/s", "peak RSS MB"]
    return ["", "llama.cpp settings (default weight type)", *_table(header, rows)]


def _targets(report: dict) -> list[str]:
    prop = report.get("ratios_proposed") or {}
    rows = []
    for t in map(TargetRow.from_json, report["targets"]):
        met = "skipped" if t.skipped else {True: "met", False: "MISSED", None: "n/a"}[t.met]
        pv = prop.get(t.key)
        pmet = {True: "met", False: "MISSED", None: "-"}[check(pv, t.op, t.threshold)] if prop else "-"
        rows.append([t.target, _f(t.value, "{:.3g}"), f"{t.op} {t.threshold:g}", met, _f(pv, "{:.3g}"), pmet])
    lines = ["", "Targets (full-depth figures; 'proposed' = the settings of `--proposed`)"]
    return lines + _table(["target", "default", "needs", "status", "proposed", "status"], rows)


def _accuracy_cell(r: TokenRow) -> str:
    if r.error is not None:
        return "failed: " + _first_line(r.error)[:50]
    a = r.accuracy
    if a is None or a.accuracy is None:
        return "-"
    lo, hi = a.accuracy_ci
    cell = f"{a.accuracy:.1%} [{lo:.0%}, {hi:.0%}] n={a.accuracy_n}"
    return cell if a.accuracy_tiles_as_budgeted else cell + " (tiles not cut)"


def render_token_table(token_rows: list[dict], summary: dict) -> list[str]:
    """Plain-text lines of the budget x method table."""
    rows = [TokenRow.from_json(d) for d in token_rows]
    out = [
        "",
        "Visual-token budgets x reduction method (full depth; accuracy on the --accuracy-bundle bench)",
    ]
    header = [
        "budget",
        "tiles",
        "tokens",
        "vision s",
        "prefill s",
        "TTFT s",
        "decode tok/s",
        "of bound",
        "peak RSS",
        "accuracy [95% CI]",
    ]
    table = []
    for r in rows:
        s = r.speed
        rss_full = s.peak_rss_bytes_full if s else None
        table.append(
            [
                r.name + (f" ({r.kv})" if r.kv else ""),
                _f(s.n_tiles if s else None, "{}"),
                _f(s.n_image_tokens if s else None, "{}"),
                _f(s and s.vision_ms_full and s.vision_ms_full / 1000, "{:.1f}"),
                _f(s and s.prefill_ms_full and s.prefill_ms_full / 1000, "{:.1f}"),
                _f(s and s.ttft_ms_full and s.ttft_ms_full / 1000, "{:.1f}"),
                _f(s and s.decode_tok_s_full, "{:.1f}"),
                _f(s and s.decode_fraction_of_bound, "{:.0%}"),
                _f(rss_full and rss_full / 1e9, "{:.2f} GB"),
                _accuracy_cell(r),
            ]
        )
    out += _table(header, table)
    per_type = [(r.name, r.accuracy.accuracy_per_type) for r in rows if r.accuracy and r.accuracy.accuracy_per_type]
    if per_type:
        out += ["", "Closed-QA accuracy per question type"]
        names = sorted({t for _, per in per_type for t in per})
        for name, per in per_type:
            cells = [f"{t} {per[t]['accuracy']:.0%} (n={per[t]['n']})" for t in names if t in per]
            out.append(f"  {name}: " + "; ".join(cells))
    out.append(f"default budget: {summary.get('default')} ({summary.get('rule')})")
    return out


def render_table(report: dict) -> str:
    """A readable plain-text version of the report (what the command prints)."""
    c = report["config"]
    lines = _header(report)
    lines += _vision(report)
    lines += ["", "LLM on the image prompt (prefill) and greedy decode", *_llm(report)]
    lines += ["", f"End to end: one image, a {c.get('n_decode')}-token answer (ms)", *_end_to_end(report)]
    lines += ["", "Token budgets (eyecare-edge default settings)", *_budgets(report)]
    lines += _memory(report)
    if report.get("token_budgets"):
        lines += render_token_table(report["token_budgets"], report.get("token_budget_summary") or {})
    lines += _sweep(report)
    lines += _targets(report)
    return "\n".join(lines)
