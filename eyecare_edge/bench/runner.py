"""Run systems (bundle variants, the PyTorch reference) over Eyecare-Bench records, resumably.

A system is any `Answerer` callable: `bundle_answerer` here, the PyTorch reference's from
`eyecare_edge.training.reference.reference_answerer` (the bench never imports torch rooms).

Each system writes its own JSONL under `REPORT_DIR/results/` through the screening module's
durable `ResultsFile` (one fsynced line per answer, torn last line dropped on resume), so a bench
killed at any point continues where it stopped with `--resume` semantics always on: an answer is
never computed twice nor lost. Records are run grouped by image, so a bundle answers several
questions about one image from one image prefill.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from eyecare_edge.images import ImageError, load_image
from eyecare_edge.qa.records import BenchRecord, BenchResult
from eyecare_edge.screening import ResultsFile

# Answer lengths per task: a letter, a sentence or two, a three-section report.
MAX_TOKENS = {"closed": 16, "open": 96, "report": 200}
REFERENCE_NAME = "pytorch"

Answerer = Callable[[list[np.ndarray], str, int], tuple[str, dict[str, float]]]


@dataclass(frozen=True)
class Variant:
    """One way to run a bundle: vision precision and LLM (GGUF) type."""

    vision: str = "auto"
    llm: str = "auto"

    @property
    def name(self) -> str:
        return f"bundle vision={self.vision} llm={self.llm}"

    @property
    def slug(self) -> str:
        return f"bundle_vision-{self.vision}_llm-{self.llm}"


def parse_variant(text: str) -> Variant:
    """`vision=int8_u8s8,llm=q4_k_m` -> Variant (missing keys stay `auto`)."""
    fields: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in ("vision", "llm") or not value:
            raise ValueError(f"bad variant {text!r}: expected e.g. 'vision=int8,llm=q4_k_m'")
        fields[key] = value.strip().lower()
    return Variant(**fields)


def select_records(
    records: Sequence[BenchRecord], *, limit: int | None, tasks: Sequence[str] | None
) -> list[BenchRecord]:
    """At most `limit` records per task (file order), of the given tasks."""
    taken: dict[str, int] = {}
    out = []
    for r in records:
        if tasks and r.task not in tasks:
            continue
        if limit is not None and taken.get(r.task, 0) >= limit:
            continue
        taken[r.task] = taken.get(r.task, 0) + 1
        out.append(r)
    return out


def _run_order(records: Sequence[BenchRecord]) -> list[BenchRecord]:
    """Group questions about the same images together (stable within a group)."""
    first: dict[tuple[str, ...], int] = {}
    for i, r in enumerate(records):
        first.setdefault(tuple(r.images), i)
    return sorted(records, key=lambda r: first[tuple(r.images)])


def run_system(
    system: str,
    answer: Answerer,
    records: Sequence[BenchRecord],
    results_path: Path,
    *,
    digest: str,
    on_item: Callable[[BenchResult], None] = lambda r: None,
) -> list[BenchResult]:
    """Answer every record not yet in `results_path`; return the results of all `records`."""
    with ResultsFile(results_path, digest=digest, resume=True) as log:
        cache: tuple[tuple[str, ...], list[np.ndarray] | ImageError] | None = None
        for rec in _run_order(records):
            if rec.id in log.done:
                continue
            key = tuple(rec.images)
            if cache is None or cache[0] != key:
                try:
                    cache = (key, [load_image(p).rgb for p in rec.images])
                except ImageError as e:
                    cache = (key, e)
            t0 = time.perf_counter()
            if isinstance(cache[1], ImageError):
                result = BenchResult.for_record(system, rec, None, error=str(cache[1]))
            else:
                try:
                    text, timings = answer(cache[1], rec.prompt_text(), MAX_TOKENS.get(rec.task, 128))
                    timings = {**timings, "total_s": time.perf_counter() - t0}
                    result = BenchResult.for_record(system, rec, text, timings=timings)
                except Exception as e:  # one failing item must not end the bench
                    result = BenchResult.for_record(system, rec, None, error=f"{type(e).__name__}: {e}")
            log.append({"id": rec.id, "bundle_digest": digest, **asdict(result)})
            on_item(result)
    return read_system_results(results_path, {r.id for r in records})


def read_system_results(path: Path, ids: set[str]) -> list[BenchResult]:
    import json

    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                obj = json.loads(line)
                if obj["record_id"] in ids:
                    obj.pop("id", None)
                    obj.pop("bundle_digest", None)
                    out.append(BenchResult.from_json(obj))
    return out


def _seconds_key(key: str) -> str:
    return key[: -len("_ms")] + "_s" if key.endswith("_ms") else key


def bundle_answerer(pipeline) -> Answerer:
    """Ask a loaded `eyecare_edge.pipeline.Pipeline` (greedy). Its millisecond timings become
    seconds under `_s` names, the unit `BenchResult.timings` holds."""

    def answer(images: list[np.ndarray], question: str, max_tokens: int) -> tuple[str, dict[str, float]]:
        a = pipeline.ask(images, question, max_tokens=max_tokens, temperature=0.0)
        return a.text, {_seconds_key(k): v / 1000.0 if k.endswith("_ms") else v for k, v in a.timings.items()}

    return answer
