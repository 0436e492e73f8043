"""The screening protocol: a fixed list of questions, each closed question's options with the
code every option maps to, so a clinic's records get codes, not free text to re-read.

A protocol is a YAML file (see `default_protocol.yaml` beside this module, used when none is
given):

    id: dr-screening            # names the protocol in the SR and the FHIR report
    name: Diabetic retinopathy screening
    min_option_probability: 0.5 # below this, a closed answer is "no valid answer"
    systems: {99EYECARE: "urn:eyecare-edge:codes"}  # FHIR system of any non-standard scheme
    questions:
      - id: dr_grade
        kind: closed            # closed: options with codes; text: a free-text answer
        question: What is the diabetic retinopathy severity?
        concept: {scheme: 99EYECARE, value: dr-grade, meaning: Diabetic retinopathy severity}
        options:
          A: {text: No apparent retinopathy, code: {scheme: LN, value: LA18643-9, meaning: No apparent retinopathy}}

Every closed option must carry a code: the constrained answer can then only ever be one of
these codes or "no valid answer", never a code the model made up. Option keys are single
capital letters because the constraint scores the letter tokens (`constrained.py`).
"""

from __future__ import annotations

import os
import string
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from eyecare_edge.errors import EyecareError
from eyecare_edge.prompts import format_closed_question

# FHIR `system` URIs of the coding schemes DICOM names by designator (PS3.16 Section 8).
STANDARD_SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "LN": "http://loinc.org",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
}
KINDS = ("closed", "text")
DEFAULT_PROTOCOL = "default_protocol.yaml"


class ProtocolError(EyecareError, ValueError):
    """A protocol file that cannot be used (the message names the file and the entry)."""


@dataclass(frozen=True)
class Code:
    """A coded concept: DICOM's (scheme designator, code value, code meaning) triple."""

    scheme: str
    value: str
    meaning: str


@dataclass(frozen=True)
class Option:
    letter: str
    text: str
    code: Code


@dataclass(frozen=True)
class ProtocolQuestion:
    qid: str
    kind: str
    question: str
    concept: Code
    options: tuple[Option, ...] = ()

    @property
    def prompt(self) -> str:
        """What the model is asked: closed questions list their options (the training format)."""
        if self.kind == "closed":
            return format_closed_question(self.question, {o.letter: o.text for o in self.options})
        return self.question

    def option(self, letter: str) -> Option:
        for o in self.options:
            if o.letter == letter:
                return o
        raise KeyError(letter)


@dataclass(frozen=True)
class Protocol:
    pid: str
    name: str
    questions: tuple[ProtocolQuestion, ...]
    min_option_probability: float = 0.5
    systems: Mapping[str, str] = field(default_factory=dict)
    source: str = ""

    def question(self, qid: str) -> ProtocolQuestion:
        for q in self.questions:
            if q.qid == qid:
                return q
        raise KeyError(qid)

    def system(self, scheme: str) -> str:
        """The FHIR system URI of a coding scheme designator."""
        return {**STANDARD_SYSTEMS, **self.systems}[scheme]


_TOP_KEYS = ("id", "name", "min_option_probability", "systems", "questions")
_QUESTION_KEYS = ("id", "kind", "question", "concept", "options")
_OPTION_KEYS = ("text", "code")
_CODE_KEYS = ("scheme", "value", "meaning")


class _Map(dict):
    """A YAML mapping that remembers the line it starts on, for error messages."""

    line: int | None = None
    key_lines: dict[Any, int] | None = None


@dataclass(frozen=True)
class _Where:
    """Where in the protocol an entry is: the file, the entry's path, the mapping's line."""

    source: str
    path: str = ""
    line: int | None = None

    def at(self, path: str, obj: Any = None) -> _Where:
        line = getattr(obj, "line", None) or self.line
        return _Where(self.source, f"{self.path}{path}", line)

    def error(self, message: str) -> ProtocolError:
        place = self.source if self.line is None else f"{self.source}:{self.line}"
        return ProtocolError(f"{place}: {self.path + ': ' if self.path else ''}{message}")


def _check_keys(obj: dict, allowed: tuple[str, ...], where: _Where) -> None:
    """Refuse keys the protocol does not know: a misspelt `min_option_probabilty` would otherwise
    be ignored and the default threshold used without a word."""
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        line = (getattr(obj, "key_lines", None) or {}).get(unknown[0], where.line)
        raise replace(where, line=line).error(
            f"unknown key(s) {', '.join(repr(str(k)) for k in unknown)} (expected: {', '.join(allowed)})"
        )


def _string(obj: dict, key: str, where: _Where, *, required: bool = True) -> str | None:
    """obj[key] as a non-empty string; YAML reads unquoted Yes/No/On/Off as booleans and digit
    codes as numbers, so those get a hint to quote the value."""
    value = obj.get(key)
    if value is None and not required:
        return None
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, (bool, int, float)):
        kind = "boolean" if isinstance(value, bool) else "number"
        raise where.error(
            f"'{key}' must be a string, got {value!r}: YAML reads it unquoted as a {kind}; quote it"
        )
    raise where.error(f"'{key}' must be a non-empty string")


def _code(obj: Any, where: _Where, systems: Mapping[str, str]) -> Code:
    where = where.at("", obj)
    if not isinstance(obj, dict):
        raise where.error("expected a code {scheme, value, meaning}")
    _check_keys(obj, _CODE_KEYS, where)
    code = Code(*(str(_string(obj, k, where)) for k in _CODE_KEYS))
    # DICOM limits: Code Value is SH (16 chars; longer needs Long Code Value), Code Meaning LO (64).
    if len(code.value) > 16:
        raise where.error(f"code value {code.value!r} is longer than DICOM's 16 characters")
    if len(code.meaning) > 64:
        raise where.error("code meaning is longer than DICOM's 64 characters")
    if code.scheme not in STANDARD_SYSTEMS and code.scheme not in systems:
        raise where.error(
            f"coding scheme {code.scheme!r} has no FHIR system; add it under 'systems' "
            f"(known: {', '.join(sorted(STANDARD_SYSTEMS))})"
        )
    return code


def _question(obj: Any, where: _Where, systems: Mapping[str, str]) -> ProtocolQuestion:
    where = where.at("", obj)
    if not isinstance(obj, dict):
        raise where.error("expected a mapping with id, kind, question, concept")
    qid = _string(obj, "id", where)
    where = where.at(f" ({qid})")
    _check_keys(obj, _QUESTION_KEYS, where)
    kind = obj.get("kind", "closed")
    if kind not in KINDS:
        raise where.error(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    text = str(_string(obj, "question", where))
    concept = _code(obj.get("concept"), where.at(".concept"), systems)
    options: list[Option] = []
    raw = obj.get("options")
    if kind == "closed":
        if not isinstance(raw, dict) or len(raw) < 2:
            raise where.error("a closed question needs at least two options (letter -> text, code)")
        for letter, opt in raw.items():
            at = where.at(f".{letter}", opt)
            if not (isinstance(letter, str) and len(letter) == 1 and letter in string.ascii_uppercase):
                raise at.error(f"option key {letter!r} must be one capital letter A-Z")
            if not isinstance(opt, dict):
                raise at.error("expected {text, code}")
            _check_keys(opt, _OPTION_KEYS, at)
            option_text = str(_string(opt, "text", at))
            if "code" not in opt:
                raise at.error("every option needs a code (an answer without one could not be filed)")
            options.append(Option(letter, option_text.strip(), _code(opt["code"], at.at(".code"), systems)))
        options.sort(key=lambda o: o.letter)
    elif raw is not None:
        raise where.error("a text question has no options")
    return ProtocolQuestion(str(qid), kind, text.strip(), concept, tuple(options))


def parse_protocol(data: Any, source: str) -> Protocol:
    """A Protocol from the parsed YAML/JSON object; `source` names the file in errors (with the
    line of the entry when `data` came from `load_protocol`)."""
    where = _Where(source).at("", data)
    if not isinstance(data, dict):
        raise where.error("expected a mapping with id, name, questions")
    _check_keys(data, _TOP_KEYS, where)
    pid = str(_string(data, "id", where))
    name = _string(data, "name", where, required=False) or pid
    systems = data.get("systems") or {}
    if not isinstance(systems, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in systems.items()
    ):
        raise where.error("'systems' must map scheme designators to URIs")
    p_min = data.get("min_option_probability", 0.5)
    if isinstance(p_min, bool) or not isinstance(p_min, (int, float)) or not 0.0 <= float(p_min) < 1.0:
        raise where.error("min_option_probability must be a number in [0, 1)")
    raw = data.get("questions")
    if not isinstance(raw, list) or not raw:
        raise where.error("'questions' must be a non-empty list")
    questions = [_question(q, where.at(f"questions[{i}]"), systems) for i, q in enumerate(raw)]
    ids = [q.qid for q in questions]
    for i, qid in enumerate(ids):
        if qid in ids[:i]:
            raise where.at(f"questions[{i}]", raw[i]).error(f"question id {qid!r} repeats")
    return Protocol(pid, name, tuple(questions), float(p_min), dict(systems), source)


def _yaml():
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - the clinical extra installs it
        raise ProtocolError("reading a protocol needs PyYAML: pip install 'eyecare-edge[clinical]'") from e
    return yaml


def _load_yaml(text: str, source: str) -> Any:
    """YAML with each mapping's line kept (`_Map.line`) and repeated keys refused (PyYAML keeps
    the last of two `A:` options without a word)."""
    yaml = _yaml()

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: Any, node: Any) -> _Map:
        loader.flatten_mapping(node)
        out = _Map()
        out.line = node.start_mark.line + 1
        out.key_lines = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in out:
                raise ProtocolError(f"{source}:{key_node.start_mark.line + 1}: key {key!r} repeats")
            out[key] = loader.construct_object(value_node, deep=True)
            out.key_lines[key] = key_node.start_mark.line + 1
        return out

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(text, Loader=Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ProtocolError(f"{source}{line}: invalid YAML ({e.problem or e})") from e
    except yaml.YAMLError as e:
        raise ProtocolError(f"{source}: invalid YAML ({e})") from e


def load_protocol(path: str | os.PathLike[str] | None = None) -> Protocol:
    """A protocol file (YAML; JSON is YAML too), or the packaged default when `path` is None."""
    if path is None:
        text = resources.files("eyecare_edge.clinical").joinpath(DEFAULT_PROTOCOL).read_text("utf-8")
        source = f"<eyecare_edge.clinical/{DEFAULT_PROTOCOL}>"
    else:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ProtocolError(f"{p}: cannot read the protocol ({e})") from e
    return parse_protocol(_load_yaml(text, source), source)
