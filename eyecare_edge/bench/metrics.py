"""Eyecare-Bench scores: closed-QA accuracy with a bootstrap interval, text overlap for open QA and
reports, per-section report scores, and agreement between two systems' greedy outputs.

Conventions (all scores are fractions in [0, 1], BLEU included, so one table has one scale):
- ROUGE-L: the F-measure of `rouge-score` with its Porter stemmer ("cats" = "cat"), as the
  ROUGE-1.5.5 `-m` option does; its tokenizer keeps only a-z and 0-9, so non-English text scores 0.
- BLEU-1 / BLEU-4: `sacrebleu` corpus BLEU (13a tokenizer, case-sensitive, exponential smoothing)
  over the items of a table cell, divided by 100; BLEU-1 is `max_ngram_order=1` (unigram precision
  times the brevity penalty). Corpus BLEU pools n-gram counts over the cell, so short answers
  still count; a cell whose texts are all shorter than 4 tokens has BLEU-4 = 0 by definition.
- token F1: SQuAD's: lower case, punctuation and the articles a/an/the removed, whitespace tokens,
  F1 of the bag-of-tokens overlap; when either side is empty it is 1.0 if both are, else 0.0.
- Items whose run failed (`error` set) stay in `n`: a closed one counts as wrong, an open/report
  one is scored as the empty string; they are also counted in the `n_errors` row. An answer the
  parser cannot read counts as wrong and is counted in `unparseable` (errors are not).
- Closed questions without options (LLaVA data that names the task but lists no lettered options):
  a yes/no reference is matched by the first standalone yes/no of the answer (none: unparseable),
  any other reference by token-normalised equality.
- Agreement: closed, both systems commit to the same letter (or, neither parsing, produce the same
  text); open/report, the outputs are equal after collapsing whitespace. An item where either
  system failed never agrees.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import string
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from eyecare_edge.errors import EyecareError
from eyecare_edge.qa.answers import parse_choice, parse_yes_no
from eyecare_edge.qa.records import (
    MODALITIES,
    REPORT_SECTIONS,
    TASKS,
    BenchResult,
    split_report_sections,
)

__all__ = [
    "CLOSED_METRICS",
    "TEXT_METRICS",
    "accuracy_with_ci",
    "agreement",
    "agreement_rows",
    "bleu",
    "modality_order",
    "rouge_l",
    "score_results",
    "section_rouge_l",
    "split_report_sections",
    "task_order",
    "token_f1",
]

CLOSED_METRICS = ("accuracy", "ci_low", "ci_high", "unparseable", "n_errors")
TEXT_METRICS = ("rouge_l", "bleu1", "bleu4", "token_f1")


# --- closed QA -----------------------------------------------------------------------------------


def accuracy_with_ci(
    correct: Sequence[bool], *, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Accuracy and its 95% percentile-bootstrap interval `(acc, lo, hi)`.

    Resampling n 0/1 outcomes with replacement and taking the mean is exactly a Binomial(n, acc)/n
    draw, so the bootstrap samples are drawn that way: the same distribution as index resampling,
    in O(n_boot) memory even for 15k items. Deterministic for a given seed; NaNs for no items.
    """
    n = len(correct)
    if n == 0:
        return math.nan, math.nan, math.nan
    acc = float(np.mean(np.asarray(correct, dtype=bool)))
    rng = np.random.default_rng(seed)
    means = rng.binomial(n, acc, size=n_boot) / n
    lo, hi = np.percentile(means, [2.5, 97.5])
    return acc, float(lo), float(hi)


# --- text overlap --------------------------------------------------------------------------------


class BenchExtraMissing(EyecareError, ImportError):
    """The bench needs a package of the `bench` extra, which the runtime install leaves out."""

    def __init__(self, package: str) -> None:
        super().__init__(
            f"the bench needs {package}, which the runtime install leaves out: "
            "pip install 'eyecare-edge[bench]'"
        )


def _import_bench(module: str, package: str) -> Any:
    """Import `module` of the `bench` extra; a clear `BenchExtraMissing` instead of an ImportError."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BenchExtraMissing(package) from e


# module -> the package of the `bench` extra that provides it (rich: the bench's progress bars)
BENCH_EXTRA = {"rouge_score": "rouge-score", "sacrebleu": "sacrebleu", "rich": "rich"}


def require_bench_extra() -> None:
    """Fail before any work when the `bench` extra is missing (the runtime install leaves it out)."""
    for module, package in BENCH_EXTRA.items():
        if importlib.util.find_spec(module) is None:
            raise BenchExtraMissing(package)


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    # Imported here: rouge-score pulls in nltk (~0.6 s), which `eyecare-edge ask` never needs.
    rouge_scorer = _import_bench("rouge_score.rouge_scorer", "rouge-score")
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure of `pred` against `ref` (stemmed; see the module docstring)."""
    return float(_rouge_scorer().score(ref or "", pred or "")["rougeL"].fmeasure)


def bleu(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-1 and BLEU-4 of `preds` against one reference each, as fractions in [0, 1]."""
    BLEU = _import_bench("sacrebleu.metrics", "sacrebleu").BLEU
    if len(preds) != len(refs):
        raise ValueError(f"bleu: {len(preds)} predictions but {len(refs)} references")
    if not preds:
        return {"bleu1": math.nan, "bleu4": math.nan}
    hyps = [p or "" for p in preds]
    refs_ = [[r or "" for r in refs]]
    return {
        "bleu1": BLEU(max_ngram_order=1).corpus_score(hyps, refs_).score / 100.0,
        "bleu4": BLEU(max_ngram_order=4).corpus_score(hyps, refs_).score / 100.0,
    }


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def _squad_tokens(text: str) -> list[str]:
    text = "".join(ch for ch in (text or "").lower() if ch not in _PUNCT)
    return _ARTICLES.sub(" ", text).split()


def token_f1(pred: str, ref: str) -> float:
    """SQuAD token F1 (see the module docstring)."""
    p, r = _squad_tokens(pred), _squad_tokens(ref)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def section_rouge_l(pred: str, ref: str) -> dict[str, float]:
    """ROUGE-L per report section present in `ref`; a section the prediction lacks scores 0."""
    p, r = split_report_sections(pred or ""), split_report_sections(ref or "")
    return {key: rouge_l(p.get(key, ""), r[key]) for key in REPORT_SECTIONS if key in r}


# --- agreement -----------------------------------------------------------------------------------


def _ws(text: str | None) -> str:
    return " ".join((text or "").split())


def _closed_choice(text: str, options: Mapping[str, str] | None) -> str | None:
    """The committed answer of a closed question: an option letter, or yes/no without options."""
    return parse_choice(text, options) if options else parse_yes_no(text)


def _agree(a: str | None, b: str | None, task: str, options: Mapping[str, str] | None) -> bool:
    if a is None or b is None:
        return False
    if task == "closed":
        la, lb = _closed_choice(a, options), _closed_choice(b, options)
        if la is not None or lb is not None:
            return la == lb
    return _ws(a) == _ws(b)


def agreement(
    preds_a: Sequence[str | None],
    preds_b: Sequence[str | None],
    *,
    task: str,
    options: Mapping[str, str] | Sequence[Mapping[str, str] | None] | None = None,
) -> float:
    """Fraction of items on which two systems' outputs agree (rule in the module docstring).

    `options` is one mapping for all items or one per item (closed QA); None entries mean "no
    options". NaN for no items.
    """
    if len(preds_a) != len(preds_b):
        raise ValueError(f"agreement: {len(preds_a)} vs {len(preds_b)} predictions")
    if not preds_a:
        return math.nan
    per_item = [options] * len(preds_a) if options is None or isinstance(options, Mapping) else list(options)
    if len(per_item) != len(preds_a):
        raise ValueError(f"agreement: {len(per_item)} option sets for {len(preds_a)} items")
    hits = sum(_agree(a, b, task, o) for a, b, o in zip(preds_a, preds_b, per_item, strict=True))
    return hits / len(preds_a)


# --- tidy tables ---------------------------------------------------------------------------------


def modality_order(modalities: Iterable[str]) -> list[str]:
    """ "all" first, then our modalities in their usual order, then any others alphabetically."""
    mods = set(modalities)
    known = [m for m in ("all", *MODALITIES) if m in mods]
    return known + sorted(mods - set(known))


def task_order(tasks: Iterable[str]) -> list[str]:
    ts = set(tasks)
    return [t for t in TASKS if t in ts] + sorted(ts - set(TASKS))


def _row(system: str, task: str, modality: str, metric: str, value: float | int, n: int) -> dict[str, Any]:
    return {"system": system, "task": task, "modality": modality, "metric": metric, "value": value, "n": n}


def _closed_rows(system: str, task: str, modality: str, cell: list[BenchResult]) -> list[dict[str, Any]]:
    correct, unparseable = [], 0
    for r in cell:
        if r.error is not None or r.prediction is None:
            correct.append(False)
            continue
        ref = r.reference.strip()
        if r.options:
            choice, wanted = parse_choice(r.prediction, r.options), ref.upper()
        elif _squad_tokens(ref) in (["yes"], ["no"]):
            choice, wanted = parse_yes_no(r.prediction), _squad_tokens(ref)[0]
        else:  # free-text closed answer: nothing to parse, compare normalised tokens
            correct.append(_squad_tokens(r.prediction) == _squad_tokens(ref))
            continue
        unparseable += choice is None
        correct.append(choice is not None and choice == wanted)
    acc, lo, hi = accuracy_with_ci(correct)
    n = len(cell)
    n_errors = sum(r.error is not None for r in cell)
    values = {"accuracy": acc, "ci_low": lo, "ci_high": hi, "unparseable": unparseable, "n_errors": n_errors}
    return [_row(system, task, modality, m, values[m], n) for m in CLOSED_METRICS]


def _text_rows(system: str, task: str, modality: str, cell: list[BenchResult]) -> list[dict[str, Any]]:
    preds = ["" if r.error is not None or r.prediction is None else r.prediction for r in cell]
    refs = [r.reference for r in cell]
    n = len(cell)
    b = bleu(preds, refs)
    values = {
        "rouge_l": float(np.mean([rouge_l(p, r) for p, r in zip(preds, refs, strict=True)])),
        "bleu1": b["bleu1"],
        "bleu4": b["bleu4"],
        "token_f1": float(np.mean([token_f1(p, r) for p, r in zip(preds, refs, strict=True)])),
    }
    rows = [_row(system, task, modality, m, values[m], n) for m in TEXT_METRICS]
    if task == "report":
        per_section: dict[str, list[float]] = defaultdict(list)
        for p, r in zip(preds, refs, strict=True):
            for key, score in section_rouge_l(p, r).items():
                per_section[key].append(score)
        for key in REPORT_SECTIONS:
            if per_section[key]:
                rows.append(
                    _row(
                        system,
                        task,
                        modality,
                        f"rouge_l.{key}",
                        float(np.mean(per_section[key])),
                        len(per_section[key]),
                    )
                )
    rows.append(_row(system, task, modality, "n_errors", sum(r.error is not None for r in cell), n))
    return rows


def _check_unique(results: Sequence[BenchResult]) -> None:
    seen: set[tuple[str, str]] = set()
    for r in results:
        key = (r.system, r.record_id)
        if key in seen:
            raise ValueError(f"system {r.system!r} has two results for record {r.record_id!r}")
        seen.add(key)


def _systems(results: Sequence[BenchResult]) -> list[str]:
    return list(dict.fromkeys(r.system for r in results))


def score_results(results: Sequence[BenchResult]) -> list[dict[str, Any]]:
    """Tidy score rows `{"system", "task", "modality", "metric", "value", "n"}` for every
    system x task x modality, plus `modality: "all"` totals per system x task.

    Closed QA: accuracy, ci_low, ci_high, unparseable, n_errors. Open QA and other tasks:
    rouge_l, bleu1, bleu4, token_f1, n_errors; reports also rouge_l.<section> (its `n` counts the
    references that have that section). `n` is the number of items in the cell.
    """
    _check_unique(results)
    cells: dict[tuple[str, str, str], list[BenchResult]] = defaultdict(list)
    for r in results:
        cells[(r.system, r.task, r.modality)].append(r)
        cells[(r.system, r.task, "all")].append(r)
    rows: list[dict[str, Any]] = []
    for system in _systems(results):
        for task in task_order(t for s, t, _ in cells if s == system):
            for modality in modality_order(m for s, t, m in cells if s == system and t == task):
                cell = cells[(system, task, modality)]
                scorer = _closed_rows if task == "closed" else _text_rows
                rows.extend(scorer(system, task, modality, cell))
    return rows


def agreement_rows(results: Sequence[BenchResult], *, reference: str) -> list[dict[str, Any]]:
    """Rows `{"system": variant, "task", "modality", "metric": "agreement", "value", "n"}`: each
    other system's greedy-output agreement with `reference`, on the records both answered
    (matched by record id; task and modality taken from the reference's result)."""
    _check_unique(results)
    by_system: dict[str, dict[str, BenchResult]] = defaultdict(dict)
    for r in results:
        by_system[r.system][r.record_id] = r
    if reference not in by_system:
        raise ValueError(f"reference system {reference!r} has no results (systems: {', '.join(by_system)})")
    ref = by_system[reference]
    rows: list[dict[str, Any]] = []
    for system in _systems(results):
        if system == reference:
            continue
        cells: dict[tuple[str, str], list[tuple[BenchResult, BenchResult]]] = defaultdict(list)
        for rid, other in by_system[system].items():
            if rid in ref:
                r = ref[rid]
                cells[(r.task, r.modality)].append((r, other))
                cells[(r.task, "all")].append((r, other))
        for task in task_order(t for t, _ in cells):
            for modality in modality_order(m for t, m in cells if t == task):
                pairs = cells[(task, modality)]
                a = [None if r.error is not None else r.prediction for r, _ in pairs]
                b = [None if o.error is not None else o.prediction for _, o in pairs]
                value = agreement(a, b, task=task, options=[r.options for r, _ in pairs])
                rows.append(_row(system, task, modality, "agreement", value, len(pairs)))
    return rows
