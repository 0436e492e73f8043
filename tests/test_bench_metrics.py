"""Bench metrics against values computed by hand."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from eyecare_edge.bench.metrics import (
    accuracy_with_ci,
    agreement,
    agreement_rows,
    bleu,
    rouge_l,
    score_results,
    section_rouge_l,
    split_report_sections,
    token_f1,
)
from eyecare_edge.qa.records import BenchResult

# --- closed QA accuracy --------------------------------------------------------------------------


def test_accuracy_all_correct_and_all_wrong() -> None:
    assert accuracy_with_ci([True] * 10) == (1.0, 1.0, 1.0)
    assert accuracy_with_ci([False] * 7) == (0.0, 0.0, 0.0)


def test_accuracy_interval_is_deterministic_and_contains_estimate() -> None:
    correct = [True] * 13 + [False] * 7
    acc, lo, hi = accuracy_with_ci(correct, seed=3)
    assert acc == pytest.approx(0.65)
    assert lo < acc < hi
    assert accuracy_with_ci(correct, seed=3) == (acc, lo, hi)
    assert all(math.isnan(v) for v in accuracy_with_ci([]))


def test_bootstrap_matches_index_resampling() -> None:
    """The binomial shortcut gives the interval ordinary index resampling gives."""
    rng = np.random.default_rng(1)
    correct = rng.random(200) < 0.7
    _, lo, hi = accuracy_with_ci(list(correct), n_boot=20000, seed=0)
    idx = rng.integers(0, len(correct), size=(20000, len(correct)))
    ref_lo, ref_hi = np.percentile(correct[idx].mean(axis=1), [2.5, 97.5])
    assert lo == pytest.approx(ref_lo, abs=0.011)
    assert hi == pytest.approx(ref_hi, abs=0.011)


# --- text overlap --------------------------------------------------------------------------------


def test_rouge_l_by_hand() -> None:
    # LCS("the cat sat on the mat", "the cat lay on the mat") = "the cat on the mat" = 5 tokens; P = R = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # LCS = 2, P = 2/4, R = 2/2, F = 2PR/(P+R) = 2/3.
    assert rouge_l("a b c d", "a c") == pytest.approx(2 / 3)
    # Stemming: cats -> cat, running/runs -> run.
    assert rouge_l("Cats running", "cat runs") == pytest.approx(1.0)
    assert rouge_l("", "anything") == 0.0


def test_token_f1_by_hand() -> None:
    # pred tokens [optic, disc, is, swollen] ("the" dropped), ref [optic, disc, swelling]:
    # overlap 2, P = 2/4, R = 2/3, F1 = 4/7.
    assert token_f1("The optic disc is swollen.", "optic disc swelling") == pytest.approx(4 / 7)
    # Multiset overlap: x:min(2,1) + y:min(1,2) = 2; P = R = 2/3.
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0
    assert token_f1("the", "") == 1.0  # both empty after normalisation
    assert token_f1("", "fluid") == 0.0
    assert token_f1("drusen", "fluid") == 0.0


def test_bleu_by_hand() -> None:
    # BLEU-1 = clipped unigram precision x brevity penalty. "the" 2, cat, on, mat match: 5/6; BP = 1.
    b = bleu(["the cat sat on the mat"], ["the cat is on the mat"])
    assert b["bleu1"] == pytest.approx(5 / 6)
    # Corpus level: pooled matches 5 + 2 of 6 + 2 hypothesis tokens, hyp length 8 < ref length 12:
    # BP = exp(1 - 12/8).
    b = bleu(["the cat sat on the mat", "the cat"], ["the cat is on the mat", "the cat is on the mat"])
    assert b["bleu1"] == pytest.approx(7 / 8 * math.exp(1 - 12 / 8))
    # BLEU-4: n-gram precisions 4/5, 3/4, 2/3, 1/2, BP = 1: geometric mean = (1/5) ** (1/4).
    assert bleu(["a b c d e"], ["a b c d f"])["bleu4"] == pytest.approx(0.2**0.25)
    same = "leakage at the optic disc"
    assert bleu([same], [same]) == {"bleu1": pytest.approx(1.0), "bleu4": pytest.approx(1.0)}
    # A corpus with no 4-grams has BLEU-4 = 0 even when identical (corpus BLEU, no effective order).
    assert bleu(["disc oedema"], ["disc oedema"]) == {"bleu1": pytest.approx(1.0), "bleu4": 0.0}
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        bleu(["a", "b"], ["a"])


# --- report sections -----------------------------------------------------------------------------

PLAIN = "Examination Type: FFA\nImage Description: leakage at the disc\nDiagnostic Recommendation: refer"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            PLAIN,
            {
                "examination_type": "FFA",
                "image_description": "leakage at the disc",
                "diagnostic_recommendation": "refer",
            },
        ),
        (
            "**Examination Type:** Fundus photography\n\n**Image Description:**\nDrusen.\nNo haemorrhage.\n\n"
            "**Diagnostic Recommendation:** Follow up in 6 months.",
            {
                "examination_type": "Fundus photography",
                "image_description": "Drusen.\nNo haemorrhage.",
                "diagnostic_recommendation": "Follow up in 6 months.",
            },
        ),
        (
            "## EXAMINATION TYPE\nOCT\n## image description\nSubretinal fluid\n## Diagnostic recommendations\nAnti-VEGF",
            {
                "examination_type": "OCT",
                "image_description": "Subretinal fluid",
                "diagnostic_recommendation": "Anti-VEGF",
            },
        ),
        (
            "1. Exam type: UBM\n2. Image description: narrow angle",
            {"examination_type": "UBM", "image_description": "narrow angle"},
        ),
        (
            "examination type: icga. image description: hot spot. diagnostic recommendation: PDT.",
            {
                "examination_type": "icga.",
                "image_description": "hot spot.",
                "diagnostic_recommendation": "PDT.",
            },
        ),
        ("The fundus looks normal.", {}),
        ("", {}),
    ],
)
def test_split_report_sections(text: str, expected: dict[str, str]) -> None:
    assert split_report_sections(text) == expected


def test_section_rouge_l() -> None:
    pred = "Examination Type: FFA\nImage Description: leakage at the disc"
    scores = section_rouge_l(pred, PLAIN)
    assert scores == {"examination_type": 1.0, "image_description": 1.0, "diagnostic_recommendation": 0.0}
    # Only sections the reference has are scored.
    assert section_rouge_l(PLAIN, "Image Description: leakage") == {"image_description": pytest.approx(2 / 5)}


# --- agreement -----------------------------------------------------------------------------------

EYE = {"A": "Right eye", "B": "Left eye"}


def test_agreement_closed() -> None:
    a = ["B", "A", "garbage", "garbage", None, "Left eye"]
    b = ["Answer: B", "B", "garbage", "other garbage", "A", "B. Left eye"]
    # agree: 1 (same letter), 3 (same unparseable text), 6 (text vs letter, same option)
    assert agreement(a, b, task="closed", options=EYE) == pytest.approx(3 / 6)
    per_item = [EYE, {"A": "Yes", "B": "No"}]
    assert agreement(["A", "yes"], ["Right eye", "A"], task="closed", options=per_item) == 1.0


def test_agreement_closed_yes_no_without_options() -> None:
    a = ["Yes.", "No, none.", "Maybe"]
    b = ["yes, drusen are present", "There is no leakage", "Perhaps"]
    assert agreement(a, b, task="closed") == pytest.approx(2 / 3)


def test_agreement_text() -> None:
    a = ["Leakage at  the disc.\n", "fluid", None]
    b = ["Leakage at the disc.", "Fluid", None]
    assert agreement(a, b, task="open") == pytest.approx(1 / 3)  # case matters; failures never agree
    assert math.isnan(agreement([], [], task="report"))
    with pytest.raises(ValueError):
        agreement(["a"], [], task="open")


# --- tidy rows -----------------------------------------------------------------------------------


def _res(system: str, rid: str, task: str, modality: str, pred: str | None, ref: str, **kw) -> BenchResult:
    return BenchResult(system, rid, task, modality, pred, ref, kw.get("options"), kw.get("error"))


def _known_run() -> list[BenchResult]:
    return [
        _res("ref", "c1", "closed", "fundus", "B", "B", options=EYE),
        _res("ref", "c2", "closed", "oct", "Right eye", "A", options=EYE),
        _res("ref", "c3", "closed", "oct", "not sure", "A", options=EYE),
        _res("ref", "c4", "closed", "oct", None, "B", options=EYE, error="timeout"),
        _res("ref", "o1", "open", "fundus", "optic disc", "optic disc swelling"),
        _res("ref", "o2", "open", "fundus", None, "drusen", error="crash"),
        _res("ref", "r1", "report", "ffa", "Examination Type: FFA\nImage Description: leakage", PLAIN),
        _res("q4", "c1", "closed", "fundus", "A", "B", options=EYE),
        _res("q4", "c2", "closed", "oct", "A", "A", options=EYE),
    ]


def _value(rows: list[dict], system: str, task: str, modality: str, metric: str) -> tuple[float, int]:
    (row,) = [
        r
        for r in rows
        if (r["system"], r["task"], r["modality"], r["metric"]) == (system, task, modality, metric)
    ]
    return row["value"], row["n"]


def test_score_results_known_run() -> None:
    rows = score_results(_known_run())
    assert all(set(r) == {"system", "task", "modality", "metric", "value", "n"} for r in rows)
    v = lambda *k: _value(rows, *k)  # noqa: E731
    # closed: c1 right, c2 right (option text), c3 unparseable, c4 failed -> 2/4.
    assert v("ref", "closed", "all", "accuracy") == (0.5, 4)
    assert v("ref", "closed", "all", "unparseable") == (1, 4)
    assert v("ref", "closed", "all", "n_errors") == (1, 4)
    assert v("ref", "closed", "fundus", "accuracy") == (1.0, 1)
    assert v("ref", "closed", "oct", "accuracy") == (pytest.approx(1 / 3), 3)
    assert v("ref", "closed", "fundus", "ci_low") == (1.0, 1)
    # open: o1 ROUGE-L P = 1, R = 2/3 -> 0.8; o2 failed -> scored as "" -> 0; mean 0.4.
    assert v("ref", "open", "all", "rouge_l") == (pytest.approx(0.4), 2)
    assert v("ref", "open", "fundus", "token_f1") == (pytest.approx(0.4), 2)
    assert v("ref", "open", "all", "n_errors") == (1, 2)
    # BLEU-1 over the cell: 2 matches of 2 hypothesis tokens, BP = exp(1 - 4/2).
    assert v("ref", "open", "all", "bleu1") == (pytest.approx(math.exp(-1)), 2)
    # report: per-section ROUGE-L; the missing recommendation scores 0.
    assert v("ref", "report", "ffa", "rouge_l.examination_type") == (1.0, 1)
    assert v("ref", "report", "ffa", "rouge_l.diagnostic_recommendation") == (0.0, 1)
    # q4 has closed rows only; no "all" duplication beyond what it answered.
    assert v("q4", "closed", "all", "accuracy") == (0.5, 2)
    assert {r["task"] for r in rows if r["system"] == "q4"} == {"closed"}
    # Order: systems as first seen, "all" before the modalities.
    firsts = [(r["system"], r["task"], r["modality"]) for r in rows if r["metric"] in {"accuracy", "rouge_l"}]
    assert firsts[:3] == [("ref", "closed", "all"), ("ref", "closed", "fundus"), ("ref", "closed", "oct")]


def test_closed_without_options() -> None:
    run = [
        _res("s", "y1", "closed", "fundus", "Yes, there is leakage.", "Yes"),
        _res("s", "y2", "closed", "fundus", "No.", "yes"),
        _res("s", "y3", "closed", "fundus", "I cannot tell.", "no"),
        _res("s", "t1", "closed", "fundus", "the Left eye", "left eye"),
    ]
    rows = score_results(run)
    # y1 right, y2 wrong, y3 unparseable, t1 right (token-normalised equality)
    assert _value(rows, "s", "closed", "all", "accuracy") == (0.5, 4)
    assert _value(rows, "s", "closed", "all", "unparseable") == (1, 4)


def test_agreement_rows() -> None:
    rows = agreement_rows(_known_run(), reference="ref")
    # q4 shares c1 (B vs A: disagree) and c2 (Right eye vs A: same letter) with ref.
    assert rows == [
        {"system": "q4", "task": "closed", "modality": "all", "metric": "agreement", "value": 0.5, "n": 2},
        {"system": "q4", "task": "closed", "modality": "fundus", "metric": "agreement", "value": 0.0, "n": 1},
        {"system": "q4", "task": "closed", "modality": "oct", "metric": "agreement", "value": 1.0, "n": 1},
    ]
    with pytest.raises(ValueError, match="reference system 'torch' has no results"):
        agreement_rows(_known_run(), reference="torch")


def test_duplicate_results_rejected() -> None:
    run = _known_run()
    with pytest.raises(ValueError, match="system 'ref' has two results for record 'c1'"):
        score_results([*run, run[0]])


def test_missing_bench_extra_names_the_install(monkeypatch):
    # The runtime install leaves rouge-score and sacrebleu out: the metric says how to get them.
    from eyecare_edge.bench import metrics
    from eyecare_edge.errors import EyecareError

    metrics._rouge_scorer.cache_clear()
    metrics.require_bench_extra()  # installed here (dev includes the bench extra)
    monkeypatch.setitem(sys.modules, "rouge_score.rouge_scorer", None)
    monkeypatch.setitem(sys.modules, "sacrebleu.metrics", None)
    with pytest.raises(EyecareError, match=r"rouge-score.*pip install 'eyecare-edge\[bench\]'"):
        metrics.rouge_l("a cat", "the cat")
    with pytest.raises(metrics.BenchExtraMissing, match=r"sacrebleu.*eyecare-edge\[bench\]"):
        metrics.bleu(["a cat"], ["the cat"])
    metrics._rouge_scorer.cache_clear()


def test_bench_command_without_the_extra_says_how_to_install(monkeypatch, tmp_path):
    import importlib.util

    from click.testing import CliRunner

    from eyecare_edge.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rich" else real(name, *a))
    data = tmp_path / "bench.jsonl"
    data.write_text("")
    r = CliRunner().invoke(main, ["bench", str(tmp_path), str(data), "-o", str(tmp_path / "report")])
    assert r.exit_code == 1 and "rich" in r.stderr and "pip install 'eyecare-edge[bench]'" in r.stderr
