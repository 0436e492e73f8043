"""Closed-QA accuracy per question type, and fidelity of each system to a reference.

The phantom generator knows each item's question type (`truth.jsonl` lists it per record id), so a
demo report can say which *kinds* of question a model reads from the image and which it guesses,
beside the chance level of each kind (1 / number of options). Fidelity is counted per item: a
system agrees with the reference when both answers parse to the same option letter; an answer
that parses to no letter never agrees (two unparseable answers are not "the same answer").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from eyecare_edge.qa.answers import parse_choice
from eyecare_edge.qa.records import BenchResult


def kinds_from_truth(truth_jsonl: Path) -> dict[str, str]:
    """record id -> question kind, from a phantom set's truth.jsonl."""
    out: dict[str, str] = {}
    for line in truth_jsonl.read_text(encoding="utf-8").splitlines():
        if line.strip():
            for q in json.loads(line).get("questions", ()):
                out[q["id"]] = q["kind"]
    return out


def chosen_letter(r: BenchResult) -> str | None:
    """The option a closed answer commits to; None for an error or an unparseable answer."""
    if r.error is not None or r.prediction is None:
        return None
    return parse_choice(r.prediction, r.options)


def agreement(a: Sequence[BenchResult], b: Sequence[BenchResult]) -> tuple[int, int]:
    """(items where both chose the same parsed letter, items compared), matched by record id."""
    by_id = {r.record_id: r for r in b}
    same = n = 0
    for r in a:
        other = by_id.get(r.record_id)
        if other is None:
            continue
        n += 1
        x, y = chosen_letter(r), chosen_letter(other)
        same += int(x is not None and x == y)
    return same, n


@dataclass
class KindRow:
    kind: str
    n: int
    chance: float
    accuracy: dict[str, float] = field(default_factory=dict)  # system -> accuracy
    agreement: dict[str, float] = field(default_factory=dict)  # system -> share agreeing with reference


def by_kind(
    results: Sequence[BenchResult], kinds: dict[str, str], *, reference: str
) -> tuple[list[KindRow], dict[str, dict[str, float]]]:
    """Rows per question kind (+ an "all" row) and per-system totals
    {system: {accuracy, agreement, n_errors, unparseable}}, closed items only."""
    closed = [r for r in results if r.task == "closed"]
    systems = list(dict.fromkeys(r.system for r in closed))
    ref = {r.record_id: r for r in closed if r.system == reference}
    groups: dict[str, list[BenchResult]] = {}
    for r in closed:
        groups.setdefault(kinds.get(r.record_id, "unknown"), []).append(r)
    groups["all"] = closed

    rows = []
    for kind in [*sorted(k for k in groups if k != "all"), "all"]:
        cell = groups[kind]
        ids = {r.record_id for r in cell}
        refs = [ref[i] for i in ids if i in ref]
        chance = sum(1.0 / len(r.options or {"A": 0, "B": 0}) for r in refs) / max(len(refs), 1)
        row = KindRow(kind, len(ids), round(chance, 4))
        for s in systems:
            mine = [r for r in cell if r.system == s]
            ok = sum(chosen_letter(r) == r.reference.strip().upper() for r in mine)
            row.accuracy[s] = ok / max(len(mine), 1)
            if s != reference:
                same, n = agreement(mine, refs)
                row.agreement[s] = same / max(n, 1)
        rows.append(row)
    totals = {}
    for s in systems:
        mine = [r for r in closed if r.system == s]
        totals[s] = {
            "accuracy": rows[-1].accuracy[s],
            "agreement": rows[-1].agreement.get(s, 1.0),
            "n": len(mine),
            "n_errors": sum(r.error is not None for r in mine),
            "unparseable": sum(r.error is None and chosen_letter(r) is None for r in mine),
        }
    return rows, totals


def kind_table(rows: Sequence[KindRow], reference: str) -> str:
    """Markdown: accuracy per kind for every system, chance, and agreement with the reference."""
    others = [s for s in rows[-1].accuracy if s != reference]
    systems = [reference, *others] if reference in rows[-1].accuracy else others
    head = ["question type", "n", "chance", *systems, *(f"same option: {s}" for s in others)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.kind, str(r.n), f"{100 * r.chance:.0f}%"]
        cells += [f"{100 * r.accuracy[s]:.1f}%" for s in systems]
        cells += [f"{100 * r.agreement[s]:.1f}%" for s in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
