"""The two formats the bench passes around: a question (`BenchRecord`) and one system's answer to it
(`BenchResult`, one line of a results JSONL).

Both are plain dataclasses so the loader, the runner (which asks a model), the scorer and the report
writer can be tested apart. The report-section names live here too: they are part of what a record
*is* (the loader uses them to recognise a report), not of how it is scored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eyecare_edge.prompts import IMAGE_PLACEHOLDER, REPORT_PROMPT, format_closed_question

TASKS = ("closed", "open", "report")

# The modalities of Eyecare-100K / Eyecare-Bench, in the order tables list them. Other values are
# kept as they come (normalised to snake_case) and listed after these.
MODALITIES = ("fundus", "oct", "ffa", "icga", "ubm", "ct", "slit_lamp", "fluorescein_staining")

# Section key -> title, in report order (EyecareGPT's report format).
REPORT_SECTIONS: dict[str, str] = {
    "examination_type": "Examination Type",
    "image_description": "Image Description",
    "diagnostic_recommendation": "Diagnostic Recommendation",
}

# Heading spellings seen in model output and in hand-written references; each maps to a section key.
_SECTION_PATTERNS = {
    "examination_type": r"exam(?:ination)?[ \t]*type",
    "image_description": r"image[ \t]*(?:description|findings)",
    "diagnostic_recommendation": (
        r"diagnostic[ \t]*(?:recommendations?|suggestions?)|diagnosis[ \t]*(?:and|&)[ \t]*recommendations?"
    ),
}


def _heading(prefix: str) -> str:
    return "|".join(f"(?P<{prefix}{key}>{pat})" for key, pat in _SECTION_PATTERNS.items())


# A heading is either "Name:" anywhere (inline reports: "Examination Type: FFA. Image Description: ..."),
# or "Name" alone on its line (markdown headings: "## Image Description"). Markdown emphasis, list
# bullets and numbering around the name are tolerated.
_INLINE_HEADING = re.compile(
    rf"(?:^|(?<=[\s*_#>.(]))[*_]{{0,3}}(?:{_heading('i_')})[*_]{{0,3}}[ \t]*[:：][*_]{{0,3}}",
    re.IGNORECASE | re.MULTILINE,
)
_LINE_HEADING = re.compile(
    rf"^[ \t#>\-•]*(?:\d+[.)][ \t]*)?[*_]{{0,3}}(?:{_heading('l_')})[*_]{{0,3}}[ \t]*[:：]?[*_]{{0,3}}[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
# Decoration left at the end of a body by the next heading's line ("\n2. **", "\n- ", "\n## ").
_TRAILING_DECORATION = re.compile(r"(?:^|\n)[ \t#>*_\-•]*(?:\d+[.)])?[ \t#>*_\-•]*$")


def _headings(text: str) -> list[tuple[int, int, str]]:
    """(start, end, section key) of every heading, in order, overlaps resolved by first start."""
    found = []
    for rx, prefix in ((_INLINE_HEADING, "i_"), (_LINE_HEADING, "l_")):
        for m in rx.finditer(text):
            key = next(k for k in _SECTION_PATTERNS if m.group(prefix + k) is not None)
            found.append((m.start(), m.end(), key))
    found.sort(key=lambda t: (t[0], -t[1]))
    out: list[tuple[int, int, str]] = []
    for start, end, key in found:
        if out and start < out[-1][1]:
            continue
        out.append((start, end, key))
    return out


def split_report_sections(text: str) -> dict[str, str]:
    """Split a report into its sections: `{"examination_type": ..., "image_description": ...,
    "diagnostic_recommendation": ...}`.

    Only sections that are present get a key (a model that skips a section should score zero on
    it, not be mistaken for an empty reference). Headings are matched case-insensitively, with or
    without markdown bold/heading marks, as "Name: body" anywhere or "Name" alone on a line; the
    body is the text up to the next heading, stripped of surrounding whitespace and emphasis
    marks. Text before the first heading is ignored. A section that appears twice has its bodies
    joined with a newline.
    """
    if not text:
        return {}
    heads = _headings(text)
    out: dict[str, str] = {}
    for i, (_, end, key) in enumerate(heads):
        stop = heads[i + 1][0] if i + 1 < len(heads) else len(text)
        body = _TRAILING_DECORATION.sub("", text[end:stop].rstrip()).strip(" \t\r\n*_")
        out[key] = f"{out[key]}\n{body}" if key in out else body
    return out


def has_all_report_sections(text: str) -> bool:
    """True when `text` carries every report section (how the loader recognises a report)."""
    return set(split_report_sections(text)) == set(REPORT_SECTIONS)


def strip_image_placeholders(text: str) -> str:
    """The question without `<image>` markers: the runtime inserts images itself. Lines that held
    only placeholders go; other lines (blank ones included) stay."""
    if IMAGE_PLACEHOLDER not in text:
        return text.strip()
    lines = []
    for line in text.split("\n"):
        stripped = line.replace(IMAGE_PLACEHOLDER, "").strip()
        if stripped or IMAGE_PLACEHOLDER not in line:
            lines.append(stripped)
    return "\n".join(lines).strip()


@dataclass
class BenchRecord:
    """One benchmark question.

    `images` are absolute paths (the loader resolves them); `options` maps letter -> option text
    for closed questions; `answer` is the letter (closed), the reference text (open) or the full
    report (report). `meta` keeps every extra key of the source record (e.g. `"synthetic": true`).
    """

    id: str
    images: list[str]
    modality: str
    task: str
    question: str
    options: dict[str, str] | None
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)

    def prompt_text(self) -> str:
        """What the model is asked, without image placeholders (the runtime places images)."""
        question = strip_image_placeholders(self.question)
        if self.task == "closed" and self.options:
            return format_closed_question(question, self.options)
        if self.task == "report":
            return question or REPORT_PROMPT
        return question

    @property
    def synthetic(self) -> bool:
        return bool(self.meta.get("synthetic", False))


_RESULT_REQUIRED = ("system", "record_id", "task", "modality", "reference")


@dataclass
class BenchResult:
    """One system's answer to one record: a line of a results JSONL.

    `prediction` is the raw generated text (None when the run failed, then `error` says why);
    `reference` and `options` are copied from the record so a results file can be scored without
    the benchmark data. `meta` carries the record's meta (the report says when data is synthetic).
    `timings` holds seconds per stage as the runner measured them (e.g. `{"total_s": 1.2}`).
    """

    system: str
    record_id: str
    task: str
    modality: str
    prediction: str | None
    reference: str
    options: dict[str, str] | None = None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_record(
        cls,
        system: str,
        record: BenchRecord,
        prediction: str | None,
        *,
        error: str | None = None,
        timings: Mapping[str, float] | None = None,
    ) -> BenchResult:
        """The result of asking `system` about `record` (copies id, task, modality, answer, meta)."""
        return cls(
            system=system,
            record_id=record.id,
            task=record.task,
            modality=record.modality,
            prediction=prediction,
            reference=record.answer,
            options=dict(record.options) if record.options else None,
            error=error,
            timings=dict(timings or {}),
            meta=dict(record.meta),
        )

    def to_json(self) -> str:
        """One JSONL line (no trailing newline)."""
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, data: str | Mapping[str, Any]) -> BenchResult:
        """Parse a line written by `to_json` (or the dict it encodes)."""
        obj = json.loads(data) if isinstance(data, str) else dict(data)
        if not isinstance(obj, dict):
            raise ValueError(f"a bench result must be a JSON object, got {type(obj).__name__}")
        missing = [k for k in _RESULT_REQUIRED if k not in obj]
        if missing:
            raise ValueError(f"bench result lacks {', '.join(missing)}")
        if "prediction" not in obj:
            raise ValueError("bench result lacks prediction (null is allowed, a missing key is not)")
        known = {f for f in cls.__dataclass_fields__}
        extra = {k: v for k, v in obj.items() if k not in known}
        kwargs = {k: v for k, v in obj.items() if k in known}
        kwargs["record_id"] = str(kwargs["record_id"])
        kwargs["options"] = dict(kwargs["options"]) if kwargs.get("options") else None
        kwargs["timings"] = dict(kwargs.get("timings") or {})
        kwargs["meta"] = {**dict(kwargs.get("meta") or {}), **extra}
        return cls(**kwargs)


def write_results(path: str | Path, results: Iterable[BenchResult]) -> Path:
    """Write results as JSONL (one `to_json()` line each)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in results:
            f.write(r.to_json() + "\n")
    return path


def read_results(path: str | Path) -> list[BenchResult]:
    """Read a results JSONL; a bad line raises ValueError naming the file and line number."""
    path = Path(path)
    out: list[BenchResult] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(BenchResult.from_json(line))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
    return out
