"""What a screen run asks: the tasks, one `Question`, questions files (JSON, JSONL, text) and
the default question of a task."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eyecare_edge.prompts import OPEN_QA_DEFAULT_PROMPT, REPORT_PROMPT, format_closed_question
from eyecare_edge.screening.errors import ScreenError

TASKS = ("report", "closed", "open", "protocol")


@dataclass(frozen=True)
class Question:
    """One question of a run. `prompt` is what the model is asked (options formatted in for
    closed questions); `question`/`options`/`qid` are what the questions file said."""

    prompt: str
    question: str
    options: Mapping[str, str] | None = None
    qid: str | None = None


def _question_from(obj: Any, where: str, task: str) -> Question:
    if isinstance(obj, str):
        obj = {"question": obj}
    if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or not obj["question"].strip():
        raise ScreenError(f"{where}: expected a question string or an object with a 'question' string")
    text = obj["question"].strip()
    options = obj.get("options")
    valid_options = isinstance(options, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in options.items()
    )
    if options is not None and not (valid_options and options):
        raise ScreenError(f"{where}: 'options' must be an object of letter -> option text")
    if task == "closed" and not options:
        raise ScreenError(f"{where}: a closed question needs 'options' (letter -> text)")
    prompt = format_closed_question(text, options) if task == "closed" else text
    qid = obj.get("id")
    return Question(prompt, text, dict(options) if options else None, None if qid is None else str(qid))


def load_questions(path: str | os.PathLike[str], task: str) -> list[Question]:
    """Questions from JSON (a list, or {"questions": [...]}), JSONL (one per line) or text (one
    question per line, `#` comments). An entry is a string or {"question", "options"?, "id"?};
    closed questions need options."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ScreenError(f"{p}: cannot read the questions file ({e})") from e
    entries: list[tuple[str, Any]] = []
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ScreenError(f"{p}: invalid JSON ({e})") from e
        if isinstance(data, dict) and "questions" in data:
            data = data["questions"]
        if not isinstance(data, list):
            raise ScreenError(f"{p}: expected a list of questions")
        entries = [(f"{p}[{i}]", obj) for i, obj in enumerate(data)]
    elif p.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append((f"{p}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ScreenError(f"{p}:{n}: invalid JSON ({e})") from e
    else:
        entries = [
            (f"{p}:{n}", line.strip())
            for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    questions = [_question_from(obj, where, task) for where, obj in entries]
    if not questions:
        raise ScreenError(f"{p}: no questions")
    return questions


def default_questions(task: str, report_prompt: str | None = None) -> list[Question]:
    """The question of a task when no questions file is given (closed QA has none)."""
    if task == "report":
        prompt = report_prompt or REPORT_PROMPT
        return [Question(prompt, prompt)]
    if task == "open":
        return [Question(OPEN_QA_DEFAULT_PROMPT, OPEN_QA_DEFAULT_PROMPT)]
    raise ScreenError("--task closed needs --questions FILE (questions with options)")
