"""`--anonymize`: identifiers out of every output (SR, FHIR, JSONL).

What is dropped: the patient and study identifiers an SR would copy (`source.IDENTIFYING`:
names, IDs, birth date, sex, accession number, dates) and the file path. What is replaced: the
study/series/instance UIDs, by 2.25 UIDs hashed from the originals (DICOM PS3.15 Basic Profile
"U": a consistent replacement), so results of one study stay together and an SR still
references "its" image in a collection anonymized with the same mapping. The mapping is an
unsalted hash: anyone holding an original UID can confirm a match (linkage, not
re-identification from the outputs alone); a secret salt would break resume.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from eyecare_edge.clinical.source import IDENTIFYING, SourceInfo, uid_from
from eyecare_edge.screening import ResultsFile


def anonymous_uid(uid: str) -> str:
    return uid_from(f"eyecare-edge anonymize\0{uid}")


def anonymize_source(src: SourceInfo) -> SourceInfo:
    return replace(
        src,
        name="",
        study_uid=anonymous_uid(src.study_uid),
        series_uid=anonymous_uid(src.series_uid),
        sop_instance_uid=None if src.sop_instance_uid is None else anonymous_uid(src.sop_instance_uid),
        identifiers=tuple((k, "") for k in IDENTIFYING),
        anonymized=True,
        header=None,
    )


def path_pseudonym(path: str) -> str:
    """What stands in a JSONL line for a file path: a hash of the absolute path (so two copies
    of an image still get distinct, stable names) that says nothing of the name."""
    return "anon:" + hashlib.sha256(os.path.abspath(path).encode("utf-8")).hexdigest()[:16]


def scrub_paths(text: str, paths: Iterable[str]) -> str:
    """`text` (an error message) with every file of `paths` replaced by its pseudonym, in each
    form a message may name it: as given, absolute, resolved, or its bare file name. A form is
    replaced only where it stands alone (a file called "a.jpg" leaves "data.jpg" alone)."""
    forms: dict[str, str] = {}
    for p in paths:
        if not p or p.startswith("anon:"):
            continue
        pseudo = path_pseudonym(p)
        for form in (p, os.path.abspath(p), os.path.realpath(p), os.path.basename(p)):
            if form:
                forms.setdefault(form, pseudo)
    if not forms:
        return text
    alternatives = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
    return re.sub(rf"(?<![\w.\-])(?:{alternatives})(?![\w\-]|\.\w)", lambda m: forms[m.group(0)], text)


def anonymize_record(record: Mapping[str, Any], paths: Sequence[str] = ()) -> dict[str, Any]:
    """A JSONL line without the file's path: in the `path` field or inside an error message
    (the line's own path, plus `paths`: the file as the caller knows it)."""
    rec = dict(record)
    path = rec.get("path")
    known = [p for p in (path, *paths) if isinstance(p, str) and p and not p.startswith("anon:")]
    if not known:
        return rec
    if isinstance(path, str) and path and not path.startswith("anon:"):
        rec["path"] = path_pseudonym(path)
    if isinstance(rec.get("error"), str):
        rec["error"] = scrub_paths(rec["error"], known)
    return rec


class AnonymizingResults(ResultsFile):
    """The screen results file, writing every line through `anonymize_record`."""

    def append(self, record: Mapping[str, Any]) -> None:
        super().append(anonymize_record(record))
