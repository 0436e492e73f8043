"""What the clinical outputs need of a screened file: the DICOM identifiers and UIDs of its
source (or new UIDs for a file that is not DICOM, said so in the outputs)."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

# The patient/study attributes an SR copies from its source (the Patient and General Study
# modules), as pydicom keywords. Carried unchanged unless anonymized.
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def uid_from(text: str) -> str:
    """A deterministic DICOM UID under the 2.25 root (PS3.5 B.2: a 128-bit number from a UUID-like
    hash), so a rerun or resumed run names the same study/series/instance again."""
    return "2.25." + str(int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:32], 16))


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class SourceInfo:
    """The source of one screened file.

    is_dicom False: the UIDs were generated here (from the file's sha256) and `format` says what
    the file was. identifiers: IDENTIFYING keyword -> value as text ("" when absent).
    """

    name: str
    sha256: str
    is_dicom: bool
    study_uid: str
    series_uid: str
    sop_instance_uid: str | None
    sop_class_uid: str | None
    modality: str
    format: str
    laterality: str = ""
    n_frames: int = 1
    identifiers: tuple[tuple[str, str], ...] = ()
    anonymized: bool = False

    def identifier(self, keyword: str) -> str:
        return dict(self.identifiers).get(keyword, "")

    def without_name(self) -> SourceInfo:
        return replace(self, name="")


def read_source(
    path: str | os.PathLike[str] | bytes, sha256: str | None = None, *, name: str = "<bytes>"
) -> SourceInfo:
    """The identifiers of `path` (or of the file's bytes, e.g. an upload, called `name`): from
    its DICOM header (pixels not read), else new UIDs."""
    if isinstance(path, bytes):
        p = Path(name)
        sha = sha256 or hashlib.sha256(path).hexdigest()
        fp: Any = io.BytesIO(path)
    else:
        p = Path(path)
        sha = sha256 or file_sha256(p)
        fp = p
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, ValueError, TypeError):
        ds = None
    except OSError as e:
        raise OSError(f"{p}: cannot read the source file ({e.strerror or e})") from e
    if ds is not None and all(k in ds for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")):
        ident = tuple((k, str(ds.get(k, "") or "")) for k in IDENTIFYING)
        lat = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "") or "")
        return SourceInfo(
            name=str(p),
            sha256=sha,
            is_dicom=True,
            study_uid=str(ds.StudyInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.get("SOPClassUID", "")) or None,
            modality=str(ds.get("Modality", "") or "OT"),
            format="DICOM",
            laterality=lat if lat in ("L", "R", "B") else "",
            n_frames=int(ds.get("NumberOfFrames", 1) or 1),
            identifiers=ident,
        )
    return SourceInfo(
        name=str(p),
        sha256=sha,
        is_dicom=False,
        study_uid=uid_from(f"eyecare-edge study\0{sha}"),
        series_uid=uid_from(f"eyecare-edge series\0{sha}"),
        sop_instance_uid=None,
        sop_class_uid=None,
        modality="OT",
        format=(p.suffix.lstrip(".").upper() or "unknown") if ds is None else "DICOM without UIDs",
    )
