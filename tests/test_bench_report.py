"""report.json / report.md / charts for a small run whose numbers are known by hand."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from eyecare_edge.bench.metrics import bleu
from eyecare_edge.bench.report import PLOTS_HINT, write_report
from eyecare_edge.qa.records import BenchResult

EYE = {"A": "Right eye", "B": "Left eye"}
REF_TEXT = "swelling of the optic disc"


def _run(synthetic: bool = True) -> list[BenchResult]:
    meta = {"synthetic": True} if synthetic else {}
    closed = [("c1", "fundus", "B"), ("c2", "fundus", "A"), ("c3", "oct", "A"), ("c4", "oct", "B")]
    torch_preds = {"c1": "B", "c2": "A", "c3": "Answer: A", "c4": "B"}
    q4_preds = {"c1": "B", "c2": "B", "c3": "no idea", "c4": None}
    out = []
    for system, preds, open_pred in (
        ("torch", torch_preds, REF_TEXT),
        ("q4", q4_preds, "swelling of the disc"),
    ):
        for rid, modality, answer in closed:
            error = "timeout" if preds[rid] is None else None
            out.append(
                BenchResult(
                    system, rid, "closed", modality, preds[rid], answer, EYE, error, {"total_s": 2.0}, meta
                )
            )
        out.append(
            BenchResult(
                system, "o1", "open", "fundus", open_pred, REF_TEXT, None, None, {"total_s": 4.0}, meta
            )
        )
    return out


def _table(md: str, heading: str) -> list[str]:
    """The table lines under `## heading`."""
    lines = md.split("\n")
    start = lines.index(f"## {heading}")
    table = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return table


def test_report_on_known_run(tmp_path: Path) -> None:
    paths = write_report(tmp_path / "rep", _run(), reference="torch", title="Phantom bench")
    md = paths.markdown.read_text()

    assert md.startswith("# Phantom bench\n\nThis report compares 2 systems on 5 Eyecare-Bench items ")
    assert "(4 closed-QA and 1 open-QA) over the modalities fundus and oct." in md
    assert "The reference is `torch`; the variant is `q4`." in md
    assert "**All items are synthetic phantom data**" in md

    # Closed QA: torch 4/4. q4: c1 right, c2 wrong, c3 unparseable, c4 failed -> 1/4.
    # Bootstrap intervals: n=2, p=1/2 -> [0, 100]; n=4, p=1/4 -> [0, 75] (Binomial(4, 1/4) quantiles).
    assert _table(md, "Closed QA") == [
        "| metric | modality | n | torch (reference) | q4 | Δ q4 |",
        "| :--- | :--- | ---: | ---: | ---: | ---: |",
        "| accuracy | all | 4 | 100.0 [100.0, 100.0] | 25.0 [0.0, 75.0] | -75.0 |",
        "| accuracy | fundus | 2 | 100.0 [100.0, 100.0] | 50.0 [0.0, 100.0] | -50.0 |",
        "| accuracy | oct | 2 | 100.0 [100.0, 100.0] | 0.0 [0.0, 0.0] | -100.0 |",
        "| unparseable answers | all | 4 | 0 | 1 | +1 |",
        "| unparseable answers | oct | 2 | 0 | 1 | +1 |",
        "| failed runs | all | 4 | 0 | 1 | +1 |",
        "| failed runs | oct | 2 | 0 | 1 | +1 |",
    ]
    # Open QA, one modality (so no separate "all" rows). q4 vs "swelling of the optic disc":
    # ROUGE-L LCS 4, P = 1, R = 4/5 -> 88.9; BLEU-1 = 1 x exp(1 - 5/4) = 77.9;
    # token F1 ("the" dropped): P = 1, R = 3/4 -> 85.7.
    bleu4 = bleu(["swelling of the disc"], [REF_TEXT])["bleu4"]
    assert _table(md, "Open QA") == [
        "| metric | modality | n | torch (reference) | q4 | Δ q4 |",
        "| :--- | :--- | ---: | ---: | ---: | ---: |",
        "| ROUGE-L | fundus | 1 | 100.0 | 88.9 | -11.1 |",
        "| BLEU-1 | fundus | 1 | 100.0 | 77.9 | -22.1 |",
        f"| BLEU-4 | fundus | 1 | 100.0 | {100 * bleu4:.1f} | {round(100 * bleu4, 1) - 100:.1f} |",
        "| token F1 | fundus | 1 | 100.0 | 85.7 | -14.3 |",
        "| failed runs | fundus | 1 | 0 | 0 | 0 |",
    ]
    assert _table(md, "Agreement with `torch`") == [
        "| task | modality | n | q4 |",
        "| :--- | :--- | ---: | ---: |",
        "| Closed QA | all | 4 | 25.0 |",
        "| Closed QA | fundus | 2 | 50.0 |",
        "| Closed QA | oct | 2 | 0.0 |",
        "| Open QA | fundus | 1 | 0.0 |",
    ]
    assert _table(md, "Timings") == [
        "| system | total_s |",
        "| :--- | ---: |",
        "| `torch` | 2.400 |",
        "| `q4` | 2.400 |",
    ]

    rows = json.loads(paths.json.read_text())
    assert all(set(r) == {"system", "task", "modality", "metric", "value", "n"} for r in rows)
    index = {(r["system"], r["task"], r["modality"], r["metric"]): (r["value"], r["n"]) for r in rows}
    assert index[("q4", "closed", "all", "accuracy")] == (0.25, 4)
    assert index[("torch", "closed", "all", "accuracy")] == (1.0, 4)
    assert index[("q4", "closed", "oct", "unparseable")] == (1, 2)
    assert index[("q4", "closed", "all", "n_errors")] == (1, 4)
    assert index[("q4", "open", "all", "rouge_l")][0] == pytest.approx(8 / 9)
    assert index[("q4", "open", "fundus", "bleu1")][0] == pytest.approx(math.exp(-0.25))
    assert index[("q4", "closed", "all", "agreement")] == (0.25, 4)
    assert ("torch", "closed", "all", "agreement") not in index

    assert [p.name for p in paths.charts] == ["accuracy_by_modality.png", "text_scores.png"]
    for p in paths.charts:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
        assert f"]({p.name})" in md


def test_report_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    paths = write_report(tmp_path, _run(), reference="torch")
    assert paths.charts == ()
    assert not list(tmp_path.glob("*.png"))
    md = paths.markdown.read_text()
    assert f"`{PLOTS_HINT}`" in md
    assert paths.json.exists()


def test_report_without_reference(tmp_path: Path) -> None:
    paths = write_report(tmp_path, _run(synthetic=False), reference=None)
    md = paths.markdown.read_text()
    assert "no reference was named" in md
    assert "synthetic" not in md
    assert "## Agreement" not in md
    assert _table(md, "Closed QA")[:3] == [
        "| metric | modality | n | torch | q4 |",
        "| :--- | :--- | ---: | ---: | ---: |",
        "| accuracy | all | 4 | 100.0 [100.0, 100.0] | 25.0 [0.0, 75.0] |",
    ]
    assert not any(r["metric"] == "agreement" for r in json.loads(paths.json.read_text()))


def test_report_partial_synthetic_and_missing_cells(tmp_path: Path) -> None:
    run = _run()
    for r in run:
        if r.record_id == "o1":
            r.meta = {}
    # A third system that answered only c1: its other cells are "–", its n is shown where it differs.
    run.append(BenchResult("q8", "c1", "closed", "fundus", "B", "B", EYE))
    md = write_report(tmp_path, run, reference="torch").markdown.read_text()
    assert "**4 of 5 items are synthetic phantom data**" in md
    closed = _table(md, "Closed QA")
    assert closed[0] == "| metric | modality | n | torch (reference) | q4 | q8 | Δ q4 | Δ q8 |"
    assert (
        closed[2]
        == "| accuracy | all | 4 | 100.0 [100.0, 100.0] | 25.0 [0.0, 75.0] | 100.0 [100.0, 100.0] (n=1) | -75.0 | 0.0 |"
    )
    assert closed[4] == "| accuracy | oct | 2 | 100.0 [100.0, 100.0] | 0.0 [0.0, 0.0] | – | -100.0 | – |"
    assert "| Open QA | fundus | 1 | 0.0 | – |" in md


def test_report_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reference system 'gpu' is not among the results"):
        write_report(tmp_path, _run(), reference="gpu")
    with pytest.raises(ValueError, match="no results"):
        write_report(tmp_path, [], reference=None)
