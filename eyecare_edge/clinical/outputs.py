"""Writing the SR and FHIR files of screened files: `ClinicalOutputs.write` per file (what
`screen` calls as each file finishes, and what a server calls per answered request).

Files are named by the source file's sha256 (first 16 hex digits): stable across reruns, one
per image content, and nothing of a patient's name or ID in a file name. A file is written to
a temporary name and renamed, so a killed run leaves no half-written SR.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eyecare_edge.bundle import sha256_file
from eyecare_edge.clinical.anonymize import anonymize_record, anonymize_source
from eyecare_edge.clinical.answers import DeviceInfo, QuestionAnswer, answers_from_records
from eyecare_edge.clinical.protocol import Protocol
from eyecare_edge.clinical.source import SourceInfo, read_source
from eyecare_edge.errors import EyecareError


class ClinicalOutputError(EyecareError, RuntimeError):
    """An SR or FHIR file that cannot be written (the message names it and why)."""


def require_highdicom() -> None:
    """Fail early, with the fix, when --sr-dir is asked for without the clinical extra."""
    try:
        import highdicom  # noqa: F401
    except ImportError as e:
        raise ClinicalOutputError(
            "writing DICOM SR needs highdicom: pip install 'eyecare-edge[clinical]'"
        ) from e


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Written:
    source: SourceInfo
    answers: list[QuestionAnswer]
    sr: Path | None = None
    fhir: Path | None = None
    sr_sop_instance_uid: str | None = None


@dataclass
class ClinicalOutputs:
    """SR and/or FHIR writer for one protocol and device. `previous`: JSONL lines of an earlier
    run of the same output (resume), merged with a file's new lines so its SR holds every answer."""

    protocol: Protocol
    device: DeviceInfo
    sr_dir: Path | None = None
    fhir_dir: Path | None = None
    anonymize: bool = False
    previous: Mapping[str, list[Mapping[str, Any]]] = field(default_factory=dict)
    written: list[Written] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.sr_dir is None and self.fhir_dir is None:
            raise ValueError("ClinicalOutputs needs sr_dir or fhir_dir")
        if self.sr_dir is not None:
            require_highdicom()
        for d in (self.sr_dir, self.fhir_dir):
            if d is not None:
                try:
                    Path(d).mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise ClinicalOutputError(
                        f"{d}: cannot create the output folder ({e.strerror or e})"
                    ) from e

    def _paths(self, sha: str) -> tuple[Path | None, Path | None]:
        stem = sha[:16]
        return (
            None if self.sr_dir is None else Path(self.sr_dir) / f"{stem}.sr.dcm",
            None if self.fhir_dir is None else Path(self.fhir_dir) / f"{stem}.fhir.json",
        )

    def write(
        self,
        path: str | os.PathLike[str] | bytes,
        records: Iterable[Mapping[str, Any]],
        *,
        name: str = "<bytes>",
    ) -> Written | None:
        """Write the SR/FHIR of `path` (or of a file's bytes, called `name`) from its screen
        `records` (this run's; an earlier run's come from `previous`). Returns None when no record
        of the file answers a protocol question (e.g. the file could not be decoded: its error
        lines are in the JSONL) or nothing is new."""
        new = list(records)
        sha = next((r["image_sha256"] for r in new if r.get("image_sha256")), None)
        if sha is None:
            sha = hashlib.sha256(path).hexdigest() if isinstance(path, bytes) else sha256_file(path)
        sr_path, fhir_path = self._paths(sha)
        if not new and all(p is None or p.exists() for p in (sr_path, fhir_path)):
            return None
        merged = [*self.previous.get(sha, []), *new]
        if self.anonymize:  # error texts may name the file
            merged = [
                anonymize_record(r, [name if isinstance(path, bytes) else os.fspath(path)]) for r in merged
            ]
        answers = answers_from_records(merged, self.protocol)
        if not answers or all(r.get("error") is not None for r in merged):
            return None  # before reading the header: a file that did not decode may not parse either
        src = read_source(path, sha, name=name)
        if self.anonymize:
            src = anonymize_source(src)
        out = Written(src, answers)
        if sr_path is not None:
            from eyecare_edge.clinical.sr import build_sr, sr_bytes

            sr = build_sr(src, answers, self.protocol, self.device)
            out.sr_sop_instance_uid = str(sr.SOPInstanceUID)
            data = sr_bytes(sr)
            try:
                _atomic_write(sr_path, data)
            except OSError as e:
                raise ClinicalOutputError(f"{sr_path}: cannot write the SR ({e.strerror or e})") from e
            out.sr = sr_path
        if fhir_path is not None:
            from eyecare_edge.clinical.fhir import build_bundle

            bundle = build_bundle(
                src, answers, self.protocol, self.device, sr_sop_instance_uid=out.sr_sop_instance_uid
            )
            try:
                _atomic_write(
                    fhir_path, (json.dumps(bundle, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
                )
            except OSError as e:
                raise ClinicalOutputError(
                    f"{fhir_path}: cannot write the FHIR report ({e.strerror or e})"
                ) from e
            out.fhir = fhir_path
        self.written.append(out)
        return out


def previous_records(results_path: str | os.PathLike[str]) -> dict[str, list[dict[str, Any]]]:
    """The lines of an existing results JSONL by image sha256 (for `ClinicalOutputs.previous`);
    a torn last line is skipped (the resumed run truncates it)."""
    out: dict[str, list[dict[str, Any]]] = {}
    p = Path(results_path)
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("image_sha256"):
            out.setdefault(rec["image_sha256"], []).append(rec)
    return out


def write_clinical_results(
    source: str | os.PathLike[str] | bytes,
    records: Iterable[Mapping[str, Any]],
    protocol: Protocol,
    device: DeviceInfo,
    *,
    sr_dir: str | os.PathLike[str] | None = None,
    fhir_dir: str | os.PathLike[str] | None = None,
    anonymize: bool = False,
    name: str = "<bytes>",
) -> Written | None:
    """Write the SR/FHIR of one answered request: `records` are screen-format lines (question =
    the protocol question's prompt, answer/choice/error, frame, image_sha256) about `source` (a
    path, or the file's bytes called `name`). `api.file_clinical_results` answers and writes."""
    outputs = ClinicalOutputs(
        protocol,
        device,
        sr_dir=None if sr_dir is None else Path(sr_dir),
        fhir_dir=None if fhir_dir is None else Path(fhir_dir),
        anonymize=anonymize,
    )
    return outputs.write(source, records, name=name)
