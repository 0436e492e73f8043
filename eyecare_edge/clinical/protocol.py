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
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

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


class ProtocolError(ValueError):
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


def _code(obj: Any, where: str, systems: Mapping[str, str]) -> Code:
    if not isinstance(obj, dict) or not all(
        isinstance(obj.get(k), str) and obj[k] for k in ("scheme", "value", "meaning")
    ):
        raise ProtocolError(f"{where}: expected a code {{scheme, value, meaning}} of non-empty strings")
    code = Code(obj["scheme"], obj["value"], obj["meaning"])
    # DICOM limits: Code Value is SH (16 chars; longer needs Long Code Value), Code Meaning LO (64).
    if len(code.value) > 16:
        raise ProtocolError(f"{where}: code value {code.value!r} is longer than DICOM's 16 characters")
    if len(code.meaning) > 64:
        raise ProtocolError(f"{where}: code meaning is longer than DICOM's 64 characters")
    if code.scheme not in STANDARD_SYSTEMS and code.scheme not in systems:
        raise ProtocolError(
            f"{where}: coding scheme {code.scheme!r} has no FHIR system; add it under 'systems' "
            f"(known: {', '.join(sorted(STANDARD_SYSTEMS))})"
        )
    return code


def _question(obj: Any, where: str, systems: Mapping[str, str]) -> ProtocolQuestion:
    if not isinstance(obj, dict):
        raise ProtocolError(f"{where}: expected a mapping with id, kind, question, concept")
    qid, kind, text = obj.get("id"), obj.get("kind", "closed"), obj.get("question")
    if not isinstance(qid, str) or not qid:
        raise ProtocolError(f"{where}: 'id' must be a non-empty string")
    where = f"{where} ({qid})"
    if kind not in KINDS:
        raise ProtocolError(f"{where}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not isinstance(text, str) or not text.strip():
        raise ProtocolError(f"{where}: 'question' must be a non-empty string")
    concept = _code(obj.get("concept"), f"{where}.concept", systems)
    options: list[Option] = []
    raw = obj.get("options")
    if kind == "closed":
        if not isinstance(raw, dict) or len(raw) < 2:
            raise ProtocolError(
                f"{where}: a closed question needs at least two options (letter -> text, code)"
            )
        for letter, opt in raw.items():
            if not (isinstance(letter, str) and len(letter) == 1 and letter in string.ascii_uppercase):
                raise ProtocolError(f"{where}: option key {letter!r} must be one capital letter A-Z")
            if not isinstance(opt, dict) or not isinstance(opt.get("text"), str) or not opt["text"].strip():
                raise ProtocolError(f"{where}.{letter}: expected {{text, code}}")
            if "code" not in opt:
                raise ProtocolError(
                    f"{where}.{letter}: every option needs a code (an answer without one could not be filed)"
                )
            options.append(
                Option(letter, opt["text"].strip(), _code(opt["code"], f"{where}.{letter}.code", systems))
            )
        options.sort(key=lambda o: o.letter)
    elif raw is not None:
        raise ProtocolError(f"{where}: a text question has no options")
    return ProtocolQuestion(qid, kind, text.strip(), concept, tuple(options))


def parse_protocol(data: Any, source: str) -> Protocol:
    """A Protocol from the parsed YAML/JSON object; `source` names the file in errors."""
    if not isinstance(data, dict):
        raise ProtocolError(f"{source}: expected a mapping with id, name, questions")
    pid, name = data.get("id"), data.get("name", data.get("id"))
    if not isinstance(pid, str) or not pid or not isinstance(name, str):
        raise ProtocolError(f"{source}: 'id' (and 'name') must be strings")
    systems = data.get("systems") or {}
    if not isinstance(systems, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in systems.items()
    ):
        raise ProtocolError(f"{source}: 'systems' must map scheme designators to URIs")
    p_min = data.get("min_option_probability", 0.5)
    if not isinstance(p_min, (int, float)) or not 0.0 <= float(p_min) < 1.0:
        raise ProtocolError(f"{source}: min_option_probability must be a number in [0, 1)")
    raw = data.get("questions")
    if not isinstance(raw, list) or not raw:
        raise ProtocolError(f"{source}: 'questions' must be a non-empty list")
    questions = [_question(q, f"{source}: questions[{i}]", systems) for i, q in enumerate(raw)]
    ids = [q.qid for q in questions]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ProtocolError(f"{source}: question ids repeat: {', '.join(dupes)}")
    return Protocol(pid, name, tuple(questions), float(p_min), dict(systems), source)


def _yaml():
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - the clinical extra installs it
        raise ProtocolError("reading a protocol needs PyYAML: pip install 'eyecare-edge[clinical]'") from e
    return yaml


def load_protocol(path: str | os.PathLike[str] | None = None) -> Protocol:
    """A protocol file (YAML; JSON is YAML too), or the packaged default when `path` is None."""
    yaml = _yaml()
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
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ProtocolError(f"{source}: invalid YAML ({e})") from e
    return parse_protocol(data, source)
