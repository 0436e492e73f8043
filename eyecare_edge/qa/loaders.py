"""Read benchmark questions from the three record shapes we meet into `BenchRecord`s.

Eyecare-Bench itself is not public, so the loader reads the shapes it is documented in and the
ones we write ourselves:

- `jsonl`: the project's format, one record per question (`id`, `images`, `modality`, `task`,
  `question`, `options`, `answer`; other keys go to `meta`);
- `llava`: Eyecare-100K / LLaVA conversations (`id`, `image`, `conversations`), one bench record
  per human/gpt pair; the task is taken from a `task` key or inferred (lettered options in the
  question -> closed, a three-section answer -> report, else open);
- `omnimedvqa`: OmniMedVQA QA records (`question`, `option_A`.., `gt_answer` as option text,
  `image_path`, `modality_type`).

Each file may be a JSON list or JSONL; its shape is detected from its first record unless `fmt`
says. Image paths are resolved against `images_root` or else the folder of the file naming them.
Unknown modality and task values are kept (normalised to snake_case), never dropped: a table
row for a modality we did not expect is more useful than a silently smaller benchmark.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from eyecare_edge.errors import EyecareError
from eyecare_edge.prompts import CLOSED_QA_INSTRUCTION
from eyecare_edge.qa.answers import parse_choice
from eyecare_edge.qa.records import (
    MODALITIES,
    BenchRecord,
    has_all_report_sections,
    strip_image_placeholders,
)

FORMATS = ("auto", "jsonl", "llava", "omnimedvqa")


class BenchFormatError(EyecareError, ValueError):
    """A benchmark file that cannot be read; the message names the file and line (or item)."""


# --- value normalisation -------------------------------------------------------------------------

_MODALITY_ALIASES: dict[str, str] = {
    **{m: m for m in MODALITIES},
    "fundus_photography": "fundus",
    "fundus_photograph": "fundus",
    "fundus_image": "fundus",
    "color_fundus": "fundus",
    "colour_fundus": "fundus",
    "color_fundus_photography": "fundus",
    "colour_fundus_photography": "fundus",
    "cfp": "fundus",
    "retinal_photography": "fundus",
    "optical_coherence_tomography": "oct",
    "fa": "ffa",
    "fluorescein_angiography": "ffa",
    "fundus_fluorescein_angiography": "ffa",
    "icg": "icga",
    "icga_angiography": "icga",
    "indocyanine_green_angiography": "icga",
    "ultrasound_biomicroscopy": "ubm",
    "ultrasonic_biomicroscopy": "ubm",
    "computed_tomography": "ct",
    "slitlamp": "slit_lamp",
    "slit_lamp_photography": "slit_lamp",
    "slit_lamp_image": "slit_lamp",
    "slit_lamp_microscopy": "slit_lamp",
    "corneal_fluorescein_staining": "fluorescein_staining",
    "fluorescein_stain": "fluorescein_staining",
    "fluorescein_staining_image": "fluorescein_staining",
}

_TASK_ALIASES: dict[str, str] = {
    "closed": "closed",
    "closed_qa": "closed",
    "closedqa": "closed",
    "close": "closed",
    "mcq": "closed",
    "multiple_choice": "closed",
    "open": "open",
    "open_qa": "open",
    "openqa": "open",
    "report": "report",
    "reports": "report",
    "report_generation": "report",
    "report_gen": "report",
}


def _snake(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", text.strip().lower()).strip("_")


def normalize_modality(name: Any) -> str:
    """Map a modality name to our vocabulary ("Fundus Photography" -> "fundus",
    "Optical Coherence Tomography (OCT)" -> "oct", "CT(Computed Tomography)" -> "ct"); unknown
    names come back as snake_case ("X-Ray" -> "x_ray"), empty ones as "unknown"."""
    if name is None or not str(name).strip():
        return "unknown"
    text = str(name)
    full = _snake(text)
    # Try the whole name, the name without its parenthesis, then the parenthesised part.
    outside = _snake(re.sub(r"\(.*?\)", " ", text))
    inside = [_snake(p) for p in re.findall(r"\((.*?)\)", text)]
    for candidate in (full, outside, *inside):
        if candidate in _MODALITY_ALIASES:
            return _MODALITY_ALIASES[candidate]
    return full or "unknown"


def normalize_task(name: Any) -> str:
    """Map a task name to closed | open | report; unknown names come back as snake_case."""
    full = _snake(str(name or ""))
    return _TASK_ALIASES.get(full, full or "unknown")


def _modality_from_paths(paths: list[str]) -> str:
    """Guess the modality from folder / file-name words of the image paths (Eyecare-100K keeps
    images in per-modality folders); "unknown" if none names one."""
    for p in paths:
        for part in [*re.split(r"[\\/]", p)[:-1], Path(p).stem]:
            # The whole folder name first ("fundus_fluorescein_angiography" is FFA, not fundus).
            for word in [_snake(part), *_snake(part).split("_")]:
                if word in _MODALITY_ALIASES and word != "fa":
                    return _MODALITY_ALIASES[word]
    return "unknown"


# --- reading files -------------------------------------------------------------------------------

# A located record: ("file:line N" or "file: item N", the dict).
_Item = tuple[str, dict[str, Any]]


def read_json_records(path: Path) -> list[tuple[str, Any]]:
    """(location, value) of each record of a JSON-list or JSONL file; a pretty-printed single
    object is a one-record file. Locations ("file:line N", "file: item N") go into error messages.
    An unreadable file raises `BenchFormatError` naming it; the values are not checked here
    (the training reader keeps a malformed record to skip and count it)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BenchFormatError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise BenchFormatError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise BenchFormatError(f"{path}: cannot read the file ({e})") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchFormatError(f"{path}:{e.lineno}: bad JSON: {e.msg}") from None
        return [(f"{path}: item {i}", obj) for i, obj in enumerate(data)]
    items: list[tuple[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            # A pretty-printed single object is a one-record file, not a broken JSONL.
            if not items:
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict):
                    return [(f"{path}:1", obj)]
            raise BenchFormatError(f"{path}:{lineno}: bad JSON line: {e.msg}") from None
    return items


def _read_items(path: Path) -> list[_Item]:
    """The records of a bench file, each a JSON object with its location."""
    items = read_json_records(path)
    for loc, obj in items:
        if not isinstance(obj, dict):
            raise BenchFormatError(f"{loc}: a record must be a JSON object, got {type(obj).__name__}")
    return items


def _detect(path: Path, items: list[_Item]) -> str:
    keys = set(items[0][1])
    if "conversations" in keys:
        return "llava"
    if "gt_answer" in keys or "modality_type" in keys or any(k.startswith("option_") for k in keys):
        return "omnimedvqa"
    if {"question", "answer"} <= keys or "task" in keys:
        return "jsonl"
    raise BenchFormatError(
        f"{items[0][0]}: cannot tell the record shape from keys {sorted(keys)}; "
        f"pass fmt= one of {', '.join(FORMATS[1:])}"
    )


def _require(loc: str, obj: Mapping[str, Any], *keys: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise BenchFormatError(f"{loc}: missing required field {', '.join(repr(k) for k in missing)}")


def _as_paths(loc: str, value: Any, base: Path) -> list[str]:
    """Image path(s) as absolute, normalised strings (existence is checked when images are read)."""
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise BenchFormatError(f"{loc}: image paths must be a string or a list of strings, got {value!r}")
    out = []
    for v in values:
        p = Path(v).expanduser()
        out.append(os.path.normpath(p if p.is_absolute() else (base / p).absolute()))
    return out


def _norm_text(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _letter_for(answer: str, options: Mapping[str, str]) -> str | None:
    """The option letter that `answer` names exactly: a letter key or an option's full text."""
    a = answer.strip().rstrip(".").strip()
    if a.upper() in options:
        return a.upper()
    wanted = _norm_text(answer)
    matches = [k for k, v in options.items() if _norm_text(v) == wanted]
    return matches[0] if len(matches) == 1 else None


def _options(loc: str, value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if isinstance(value, list):
        value = {chr(ord("A") + i): v for i, v in enumerate(value)}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise BenchFormatError(f"{loc}: options must map letters to texts, got {value!r}")
    opts = {str(k).strip().upper(): v for k, v in value.items()}
    bad = [k for k in opts if not re.fullmatch(r"[A-Z]", k)]
    if bad:
        raise BenchFormatError(f"{loc}: option keys must be single letters, got {bad}")
    return opts or None


# --- the three shapes ----------------------------------------------------------------------------

_JSONL_KEYS = {"id", "images", "image", "modality", "task", "question", "options", "answer", "meta"}


def _from_jsonl(loc: str, obj: dict[str, Any], base: Path) -> Iterator[BenchRecord]:
    _require(loc, obj, "id", "modality", "task", "question", "answer")
    if "images" not in obj and "image" not in obj:
        raise BenchFormatError(f"{loc}: missing required field 'images'")
    task = normalize_task(obj["task"])
    options = _options(loc, obj.get("options"))
    answer = obj["answer"]
    if not isinstance(answer, str):
        raise BenchFormatError(f"{loc}: answer must be a string, got {answer!r}")
    if task == "closed":
        if not options:
            raise BenchFormatError(f"{loc}: a closed question needs options (letter -> text)")
        letter = _letter_for(answer, options)
        if letter is None:
            raise BenchFormatError(
                f"{loc}: answer {answer!r} is neither an option letter nor an option text ({sorted(options)})"
            )
        answer = letter
    meta = dict(obj.get("meta") or {})
    meta.update({k: v for k, v in obj.items() if k not in _JSONL_KEYS})
    yield BenchRecord(
        id=str(obj["id"]),
        images=_as_paths(loc, obj.get("images", obj.get("image")), base),
        modality=normalize_modality(obj["modality"]),
        task=task,
        question=str(obj["question"] or ""),
        options=options,
        answer=answer,
        meta=meta,
    )


_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.):]\s*(.+?)\s*$")


def split_closed_question(text: str) -> tuple[str, dict[str, str], str] | None:
    """Undo `format_closed_question`: (question, options, trailing instruction), or None when the
    text has no block of at least two lettered option lines starting at "A"."""
    lines = strip_image_placeholders(text).split("\n")
    for start, line in enumerate(lines):
        m = _OPTION_LINE.match(line)
        if not m or m.group(1) != "A":
            continue
        options: dict[str, str] = {}
        end = start
        while end < len(lines):
            m = _OPTION_LINE.match(lines[end])
            if not m or m.group(1) != chr(ord("A") + len(options)):
                break
            options[m.group(1)] = m.group(2)
            end += 1
        if len(options) >= 2:
            head = [ln for ln in lines[:start] if ln.strip()]
            if head and re.fullmatch(r"\s*(?:options|choices)\s*:?\s*", head[-1], re.IGNORECASE):
                head = head[:-1]
            return "\n".join(head).strip(), options, "\n".join(lines[end:]).strip()
    return None


_LLAVA_KEYS = {"id", "image", "images", "conversations", "modality", "task"}
_HUMAN = {"human", "user"}
_GPT = {"gpt", "assistant", "model"}


def _turn_pairs(loc: str, conversations: Any) -> list[tuple[str, str]]:
    if not isinstance(conversations, list):
        raise BenchFormatError(f"{loc}: conversations must be a list of turns")
    pairs, pending = [], None
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BenchFormatError(f"{loc}: conversation turn {i} needs 'from' and 'value'")
        role = str(turn["from"]).lower()
        if role in _HUMAN:
            if pending is not None:
                raise BenchFormatError(f"{loc}: conversation turn {i}: two human turns in a row")
            pending = str(turn["value"])
        elif role in _GPT:
            if pending is None:
                raise BenchFormatError(f"{loc}: conversation turn {i}: a gpt turn without a question")
            pairs.append((pending, str(turn["value"])))
            pending = None
        elif role != "system":
            raise BenchFormatError(f"{loc}: conversation turn {i}: unknown role {turn['from']!r}")
    if pending is not None:
        raise BenchFormatError(f"{loc}: the last human turn has no gpt answer")
    if not pairs:
        raise BenchFormatError(f"{loc}: conversations hold no human/gpt pair")
    return pairs


def _from_llava(loc: str, obj: dict[str, Any], base: Path) -> Iterator[BenchRecord]:
    _require(loc, obj, "id", "conversations")
    images = _as_paths(loc, obj.get("image", obj.get("images")), base)
    raw_paths = obj.get("image", obj.get("images")) or []
    raw_paths = [raw_paths] if isinstance(raw_paths, str) else list(raw_paths)
    modality = normalize_modality(obj["modality"]) if obj.get("modality") else _modality_from_paths(raw_paths)
    given_task = normalize_task(obj["task"]) if obj.get("task") else None
    extra = {k: v for k, v in obj.items() if k not in _LLAVA_KEYS}
    for k, (human, gpt) in enumerate(_turn_pairs(loc, obj["conversations"])):
        meta = {**extra, "turn": k}
        closed = split_closed_question(human)
        task = given_task or ("closed" if closed else "report" if has_all_report_sections(gpt) else "open")
        options, question, answer = None, strip_image_placeholders(human), gpt.strip()
        if task == "closed" and closed:
            question, options, instruction = closed
            if instruction and instruction != CLOSED_QA_INSTRUCTION:
                meta["instruction"] = instruction
            letter = parse_choice(answer, options)
            if letter is None:
                meta["answer_unmapped"] = True
            elif letter != answer:
                meta["answer_text"] = answer  # the reference as written, e.g. "B. Left eye"
                answer = letter
        yield BenchRecord(
            id=f"{obj['id']}_{k}",
            images=images,
            modality=modality,
            task=task,
            question=question,
            options=options,
            answer=answer,
            meta=meta,
        )


_OMNI_OPTION = re.compile(r"option_([A-Za-z])$")


def _fallback_id(loc: str) -> str:
    """ "<file stem>-<line or item number>" for records that carry no id of their own."""
    where, number = loc.rsplit(":", 1)[0], re.findall(r"\d+", loc)[-1]
    return f"{Path(where).stem}-{number}"


def _from_omnimedvqa(loc: str, obj: dict[str, Any], base: Path) -> Iterator[BenchRecord]:
    _require(loc, obj, "question", "gt_answer", "image_path")
    options = {
        m.group(1).upper(): str(v).strip()
        for k, v in obj.items()
        if (m := _OMNI_OPTION.match(k)) and v is not None and str(v).strip()
    }
    options = dict(sorted(options.items()))
    if len(options) < 2:
        raise BenchFormatError(f"{loc}: an OmniMedVQA record needs at least two of option_A..option_D")
    gt = str(obj["gt_answer"])
    meta = {
        k: v
        for k, v in obj.items()
        if not _OMNI_OPTION.match(k) and k not in {"question", "gt_answer", "image_path", "modality_type"}
    }
    letter = _letter_for(gt, options)
    if letter is None:
        meta["gt_unmatched"] = True  # kept: scored as wrong for everyone, visible in meta
    qid = obj.get("question_id")
    yield BenchRecord(
        id=str(qid) if qid is not None else _fallback_id(loc),
        images=_as_paths(loc, obj["image_path"], base),
        modality=normalize_modality(obj.get("modality_type")),
        task="closed",
        question=str(obj["question"]),
        options=options,
        answer=letter if letter is not None else gt,
        meta=meta,
    )


_PARSERS: dict[str, Callable[[str, dict[str, Any], Path], Iterator[BenchRecord]]] = {
    "jsonl": _from_jsonl,
    "llava": _from_llava,
    "omnimedvqa": _from_omnimedvqa,
}


def _load_file(path: Path, fmt: str, images_root: Path | None) -> list[tuple[str, BenchRecord]]:
    items = _read_items(path)
    if not items:
        return []
    kind = _detect(path, items) if fmt == "auto" else fmt
    base = images_root if images_root is not None else path.parent.absolute()
    out = []
    for loc, obj in items:
        out.extend((loc, rec) for rec in _PARSERS[kind](loc, obj, base))
    return out


def load_bench(
    path: str | os.PathLike[str],
    *,
    fmt: str = "auto",
    images_root: str | os.PathLike[str] | None = None,
) -> list[BenchRecord]:
    """Load benchmark records from a file (JSON list or JSONL) or a folder of such files.

    `fmt` is "auto" (detect per file from its first record), "jsonl", "llava" or "omnimedvqa".
    Image paths are resolved against `images_root` when given, else against the folder of the
    file that names them. Raises `BenchFormatError` (a ValueError) naming file and line (or
    item) for bad JSON, missing required fields and duplicate ids.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown bench format {fmt!r}; expected one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    files = (
        sorted(p for p in path.iterdir() if p.suffix in {".json", ".jsonl"} and p.is_file())
        if path.is_dir()
        else [path]
    )
    root = Path(images_root).expanduser().absolute() if images_root is not None else None
    records: list[BenchRecord] = []
    seen: dict[str, str] = {}
    for f in files:
        for loc, rec in _load_file(f, fmt, root):
            if rec.id in seen:
                raise BenchFormatError(f"{loc}: duplicate id {rec.id!r} (first at {seen[rec.id]})")
            seen[rec.id] = loc
            records.append(rec)
    return records
