"""Write a bench run's scores as report.json (tidy rows), report.md (side-by-side tables) and PNG
charts.

The JSON is for machines: a list of `{"system", "task", "modality", "metric", "value", "n"}` rows
(score rows from `score_results` and, with a reference, `agreement` rows whose `system` is the
variant compared with the reference); `pandas.DataFrame(json.load(f))` reads it as it is.

The Markdown is for people and must stand on its own: a header paragraph says what was compared
on what data (and that phantom data is synthetic), then per task one table with rows = metric x
modality and columns = reference, each variant and each variant's delta against the reference,
then greedy-output agreement, failures and timings. Charts need matplotlib (the `plots` extra),
imported only here and only when charts are drawn; without it the report says how to get them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eyecare_edge.bench.metrics import (
    agreement_rows,
    modality_order,
    score_results,
    task_order,
)
from eyecare_edge.qa.records import REPORT_SECTIONS, BenchResult

TASK_TITLES = {"closed": "Closed QA", "open": "Open QA", "report": "Report generation"}
METRIC_NAMES = {
    "accuracy": "accuracy",
    "unparseable": "unparseable answers",
    "n_errors": "failed runs",
    "rouge_l": "ROUGE-L",
    "bleu1": "BLEU-1",
    "bleu4": "BLEU-4",
    "token_f1": "token F1",
    **{f"rouge_l.{k}": f"ROUGE-L {title}" for k, title in REPORT_SECTIONS.items()},
}
TASK_NOUNS = {"closed": "closed-QA", "open": "open-QA", "report": "report-generation"}
COUNT_METRICS = ("unparseable", "n_errors")
CHART_METRICS = ("rouge_l", "bleu1", "bleu4", "token_f1")
PLOTS_HINT = "pip install eyecare-edge[plots]"


@dataclass(frozen=True)
class ReportPaths:
    """Where `write_report` put its files (`charts` is empty when matplotlib is missing)."""

    json: Path
    markdown: Path
    charts: tuple[Path, ...]


# --- formatting ----------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "–" if v is None or math.isnan(v) else f"{100 * v:.1f}"


def _delta_pct(v: float | None, ref: float | None) -> str:
    if v is None or ref is None or math.isnan(v) or math.isnan(ref):
        return "–"
    d = round(100 * v, 1) - round(100 * ref, 1)
    d = round(d, 1)
    return "0.0" if d == 0 else f"{d:+.1f}"


def _delta_count(v: float | None, ref: float | None) -> str:
    if v is None or ref is None:
        return "–"
    d = int(v) - int(ref)
    return "0" if d == 0 else f"{d:+d}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 2) -> list[str]:
    """A GitHub Markdown table; the first `left` columns left-aligned, the rest right-aligned."""
    align = [":---" if i < left else "---:" for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "| " + " | ".join(align) + " |", *(line(r) for r in rows)]


def _and_join(words: Sequence[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _code(name: str) -> str:
    return f"`{name}`"


# --- the Markdown --------------------------------------------------------------------------------

_Key = tuple[str, str, str, str]  # system, task, modality, metric


def _index(rows: Sequence[dict[str, Any]]) -> dict[_Key, dict[str, Any]]:
    return {(r["system"], r["task"], r["modality"], r["metric"]): r for r in rows}


def _header(results: Sequence[BenchResult], systems: list[str], reference: str | None) -> str:
    items: dict[str, BenchResult] = {}
    for r in results:
        items.setdefault(r.record_id, r)
    per_task: dict[str, int] = {}
    for r in items.values():
        per_task[r.task] = per_task.get(r.task, 0) + 1
    task_text = _and_join([f"{per_task[t]} {TASK_NOUNS.get(t, _code(t))}" for t in task_order(per_task)])
    modalities = [m for m in modality_order(r.modality for r in items.values()) if m != "all"]
    parts = [
        f"This report compares {len(systems)} system{'s' if len(systems) != 1 else ''} on {len(items)} "
        f"Eyecare-Bench item{'s' if len(items) != 1 else ''} ({task_text}) over the "
        f"modalit{'ies' if len(modalities) != 1 else 'y'} {_and_join(modalities)}."
    ]
    if reference is not None:
        variants = [s for s in systems if s != reference]
        parts.append(
            f"The reference is {_code(reference)}"
            + (
                f"; the variant{'s are' if len(variants) > 1 else ' is'} {_and_join([_code(v) for v in variants])}."
                if variants
                else "; there are no variants."
            )
        )
        parts.append(
            "Deltas are variant minus reference in percentage points (counts for the count rows); "
            "agreement is the share of items where a variant's greedy output matches the reference's "
            "(the same parsed option letter for closed QA, the same text up to whitespace otherwise)."
        )
    else:
        parts.append(
            f"The systems are {_and_join([_code(s) for s in systems])}; no reference was named, so there are "
            "no deltas and no agreement table."
        )
    parts.append(
        "Scores are percentages: closed-QA accuracy with its 95% bootstrap interval in brackets (an answer "
        "that names no option counts as wrong); open QA and reports are scored by ROUGE-L (F-measure, "
        "stemmed), corpus BLEU-1/BLEU-4 (sacrebleu) and SQuAD token F1; reports also per section. "
        "Failed runs count as wrong or empty. `n` is the number of items in a row. report.json holds "
        "the same scores as fractions in [0, 1]."
    )
    n_synth = sum(bool(r.meta.get("synthetic")) for r in items.values())
    if n_synth == len(items) and items:
        parts.append(
            "**All items are synthetic phantom data** (`synthetic: true`): these numbers check that the "
            "pipeline runs and that variants match the reference, not clinical accuracy."
        )
    elif n_synth:
        parts.append(
            f"**{n_synth} of {len(items)} items are synthetic phantom data** (`synthetic: true`); their "
            "scores say nothing about clinical accuracy."
        )
    return " ".join(parts)


def _task_table(
    task: str,
    index: dict[_Key, dict[str, Any]],
    systems: list[str],
    reference: str | None,
    modalities: list[str],
) -> list[str]:
    base = reference if reference is not None else systems[0]
    variants = [s for s in systems if s != reference] if reference is not None else []
    header = ["metric", "modality", "n"]
    header += [f"{s} (reference)" if s == reference else s for s in systems]
    header += [f"Δ {v}" for v in variants]
    if task == "closed":
        metrics = ["accuracy", *COUNT_METRICS]
    else:
        metrics = [*CHART_METRICS]
        if task == "report":
            metrics += [f"rouge_l.{k}" for k in REPORT_SECTIONS]
        metrics.append("n_errors")
    lines: list[list[str]] = []
    for metric in metrics:
        for modality in modalities:
            cells = {s: index.get((s, task, modality, metric)) for s in systems}
            if all(c is None for c in cells.values()):
                continue
            count = metric in COUNT_METRICS
            # Count rows that are zero for everyone say nothing; keep only the total (first) row.
            if (
                count
                and modality != modalities[0]
                and all(c is None or c["value"] == 0 for c in cells.values())
            ):
                continue
            anchor = cells.get(base) or next(c for c in cells.values() if c is not None)
            n = anchor["n"]
            row = [METRIC_NAMES.get(metric, metric), modality, str(n)]
            for s in systems:
                c = cells[s]
                if c is None:
                    row.append("–")
                    continue
                if count:
                    text = str(int(c["value"]))
                elif metric == "accuracy":
                    lo = index[(s, task, modality, "ci_low")]["value"]
                    hi = index[(s, task, modality, "ci_high")]["value"]
                    text = f"{_pct(c['value'])} [{_pct(lo)}, {_pct(hi)}]"
                else:
                    text = _pct(c["value"])
                if c["n"] != n:
                    text += f" (n={c['n']})"
                row.append(text)
            ref_cell = cells.get(base)
            for v in variants:
                c = cells[v]
                rv = None if ref_cell is None else ref_cell["value"]
                cv = None if c is None else c["value"]
                row.append(_delta_count(cv, rv) if count else _delta_pct(cv, rv))
            lines.append(row)
    return _table(header, lines, left=2)


def _agreement_table(
    agreement: Sequence[dict[str, Any]],
    variants: list[str],
    tasks: list[str],
    modalities: dict[str, list[str]],
) -> list[str]:
    index = {(r["system"], r["task"], r["modality"]): r for r in agreement}
    header = ["task", "modality", "n", *variants]
    rows = []
    for task in tasks:
        for modality in modalities[task]:
            cells = {v: index.get((v, task, modality)) for v in variants}
            present = [c for c in cells.values() if c is not None]
            if not present:
                continue
            n = present[0]["n"]
            row = [TASK_TITLES.get(task, task), modality, str(n)]
            for v in variants:
                c = cells[v]
                if c is None:
                    row.append("–")
                else:
                    row.append(_pct(c["value"]) + (f" (n={c['n']})" if c["n"] != n else ""))
            rows.append(row)
    return _table(header, rows, left=2)


def _timings_table(results: Sequence[BenchResult], systems: list[str]) -> list[str]:
    keys: list[str] = []
    for r in results:
        for k, v in r.timings.items():
            if isinstance(v, int | float) and k not in keys:
                keys.append(k)
    if not keys:
        return []
    rows = []
    for s in systems:
        row = [_code(s)]
        for k in keys:
            vals = [
                float(r.timings[k])
                for r in results
                if r.system == s and isinstance(r.timings.get(k), int | float)
            ]
            row.append(f"{sum(vals) / len(vals):.3f}" if vals else "–")
        rows.append(row)
    return _table(["system", *keys], rows, left=1)


def _table_modalities(modalities: Iterable[str]) -> list[str]:
    """Modalities a task's table lists: "all" then each one, or only the one when there is one
    (its rows would repeat the "all" rows)."""
    order = modality_order(modalities)
    return [m for m in order if m != "all"] if len(order) == 2 else order


def render_markdown(
    results: Sequence[BenchResult],
    rows: Sequence[dict[str, Any]],
    agreement: Sequence[dict[str, Any]],
    *,
    reference: str | None,
    title: str,
    charts: Sequence[Path],
    charts_note: str | None,
) -> str:
    """The report.md text (exposed for tests and for callers that print it)."""
    systems = list(dict.fromkeys(r.system for r in results))
    index = _index(rows)
    tasks = task_order(r["task"] for r in rows)
    mods = {t: _table_modalities(r["modality"] for r in rows if r["task"] == t) for t in tasks}
    out = [f"# {title}", "", _header(results, systems, reference), ""]
    for task in tasks:
        out += [f"## {TASK_TITLES.get(task, f'Task {_code(task)}')}", ""]
        out += _task_table(task, index, systems, reference, mods[task])
        if task == "closed":
            out += [
                "",
                "_Unparseable answers_ name no option the parser can read (they count as wrong); "
                "_failed runs_ raised an error. Count rows that are zero for every system are shown for the "
                "total only.",
            ]
        out.append("")
    if reference is not None:
        variants = [s for s in systems if s != reference]
        if variants:
            out += [f"## Agreement with {_code(reference)}", ""]
            out += [
                "Share of items (%) where the variant's greedy output matches the reference's.",
                "",
            ]
            out += _agreement_table(agreement, variants, tasks, mods)
            out.append("")
    timing = _timings_table(results, systems)
    if timing:
        out += ["## Timings", "", "Mean seconds per item and stage, as the runner measured them.", ""]
        out += [*timing, ""]
    out += ["## Charts", ""]
    if charts:
        out += [f"![{p.stem.replace('_', ' ')}]({p.name})" for p in charts]
    if charts_note:
        out.append(charts_note)
    out.append("")
    return "\n".join(out)


# --- charts --------------------------------------------------------------------------------------


def _bar_groups(
    ax: Any,
    groups: list[str],
    systems: list[str],
    values: dict[str, list[float]],
    intervals: dict[str, list[tuple[float, float]]] | None = None,
) -> None:
    """Grouped bars in percent: one group per x label, one bar per system (NaN drawn as 0)."""
    width = 0.8 / max(len(systems), 1)
    for i, s in enumerate(systems):
        xs = [g + (i - (len(systems) - 1) / 2) * width for g in range(len(groups))]
        heights = [0.0 if math.isnan(v) else 100 * v for v in values[s]]
        yerr = None
        if intervals is not None:
            below = [
                0.0 if math.isnan(lo) else max(0.0, h - 100 * lo)
                for h, (lo, _) in zip(heights, intervals[s], strict=True)
            ]
            above = [
                0.0 if math.isnan(hi) else max(0.0, 100 * hi - h)
                for h, (_, hi) in zip(heights, intervals[s], strict=True)
            ]
            yerr = [below, above]
        ax.bar(xs, heights, width, label=s, yerr=yerr, capsize=3 if yerr else 0)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)


def _draw_charts(out_dir: Path, rows: Sequence[dict[str, Any]], systems: list[str]) -> list[Path]:
    """Draw the PNGs with matplotlib's Agg canvas (no pyplot, no display, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    index = _index(rows)
    paths: list[Path] = []
    closed_mods = modality_order(r["modality"] for r in rows if r["task"] == "closed")
    if closed_mods:
        fig = Figure(figsize=(max(6.0, 1.0 + 0.9 * len(closed_mods)), 4.0), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()

        def get(s: str, m: str, metric: str) -> float:
            row = index.get((s, "closed", m, metric))
            return math.nan if row is None or row["value"] is None else float(row["value"])

        values = {s: [get(s, m, "accuracy") for m in closed_mods] for s in systems}
        cis = {s: [(get(s, m, "ci_low"), get(s, m, "ci_high")) for m in closed_mods] for s in systems}
        _bar_groups(ax, closed_mods, systems, values, cis)
        ax.set_ylabel("accuracy (%)")
        ax.set_title("Closed QA accuracy per modality (95% bootstrap interval)")
        fig.legend(loc="outside lower center", ncol=min(len(systems), 4), fontsize="small")
        path = out_dir / "accuracy_by_modality.png"
        fig.savefig(path, dpi=120)
        paths.append(path)
    text_tasks = [t for t in task_order(r["task"] for r in rows) if t != "closed"]
    if text_tasks:
        fig = Figure(figsize=(5.0 * len(text_tasks), 4.0), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(text_tasks), squeeze=False)[0]
        names = [METRIC_NAMES[m] for m in CHART_METRICS]
        for ax, task in zip(axes, text_tasks, strict=True):
            values = {
                s: [
                    index[(s, task, "all", m)]["value"] if (s, task, "all", m) in index else math.nan
                    for m in CHART_METRICS
                ]
                for s in systems
            }
            _bar_groups(ax, names, systems, values)
            ax.set_title(f"{TASK_TITLES.get(task, task)} (all modalities)")
            ax.set_ylabel("score (%)")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(systems), 4), fontsize="small")
        path = out_dir / "text_scores.png"
        fig.savefig(path, dpi=120)
        paths.append(path)
    return paths


# --- entry point ---------------------------------------------------------------------------------


def _json_safe(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """NaN is not JSON: write null (a dataframe reads it back as NaN)."""
    return [
        {**r, "value": None if isinstance(r["value"], float) and math.isnan(r["value"]) else r["value"]}
        for r in rows
    ]


def write_report(
    out_dir: str | Path,
    results: Sequence[BenchResult],
    *,
    reference: str | None,
    title: str = "Eyecare-Bench report",
) -> ReportPaths:
    """Score `results` and write report.json, report.md and the charts into `out_dir`.

    `reference` names the system the others are compared with (deltas, agreement); None writes the
    systems side by side without either. Raises ValueError for no results, an unknown reference
    or a system with two results for one record.
    """
    if not results:
        raise ValueError("write_report: no results to report")
    systems = list(dict.fromkeys(r.system for r in results))
    if reference is not None and reference not in systems:
        raise ValueError(f"reference system {reference!r} is not among the results ({', '.join(systems)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = score_results(results)
    agreement = agreement_rows(results, reference=reference) if reference is not None else []

    charts: list[Path] = []
    note = None
    try:
        charts = _draw_charts(out, rows, systems)
    except ImportError:
        note = f"Charts were not drawn: they need matplotlib (`{PLOTS_HINT}`)."

    json_path = out / "report.json"
    json_path.write_text(json.dumps(_json_safe([*rows, *agreement]), indent=1) + "\n", encoding="utf-8")
    md_path = out / "report.md"
    md_path.write_text(
        render_markdown(
            results, rows, agreement, reference=reference, title=title, charts=charts, charts_note=note
        ),
        encoding="utf-8",
    )
    return ReportPaths(json=json_path, markdown=md_path, charts=tuple(charts))
