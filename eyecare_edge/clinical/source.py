"""What the clinical outputs need of a screened file: the DICOM identifiers and UIDs of its
source (or new UIDs for a file that is not DICOM, said so in the outputs)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from eyecare_edge.bundle import sha256_file
from eyecare_edge.images import read_dicom_header

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
_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def uid_from(text: str) -> str:
    """A deterministic DICOM UID under the 2.25 root (PS3.5 B.2: a 128-bit number from a UUID-like
    hash), so a rerun or resumed run names the same study/series/instance again."""
    return "2.25." + str(int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:32], 16))


@dataclass(frozen=True)
class SourceInfo:
    """The source of one screened file.

    is_dicom False: the UIDs were generated here (from the file's sha256) and `format` says what
    the file was; a DICOM header without some of the study/series/instance UIDs keeps its
    identifiers and gets the missing UIDs generated (`generated`). identifiers: IDENTIFYING
    keyword -> value as text ("" when absent).
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
    generated: tuple[str, ...] = ()  # keywords of the UIDs made here (a DICOM header lacked them)
    # The DICOM header (pydicom data set, no pixels): the SR copies its Patient and Study modules
    # and Specific Character Set whole, as highdicom does from an evidence instance.
    header: Any = field(default=None, compare=False, repr=False)

    def identifier(self, keyword: str) -> str:
        return dict(self.identifiers).get(keyword, "")

    def without_name(self) -> SourceInfo:
        return replace(self, name="")


def read_source(
    path: str | os.PathLike[str] | bytes, sha256: str | None = None, *, name: str = "<bytes>"
) -> SourceInfo:
    """The identifiers of `path` (or of the file's bytes, e.g. an upload, called `name`): from
    its DICOM header, read as `images` reads it (bare data sets without the preamble included),
    else new UIDs. Raises ImageError for a file that cannot be read."""
    if isinstance(path, bytes):
        p = Path(name)
        sha = sha256 or hashlib.sha256(path).hexdigest()
    else:
        p = Path(path)
        sha = sha256 or sha256_file(p)
    ds = read_dicom_header(path, name=str(p))
    if ds is None:
        return SourceInfo(
            name=str(p),
            sha256=sha,
            is_dicom=False,
            study_uid=uid_from(f"eyecare-edge study\0{sha}"),
            series_uid=uid_from(f"eyecare-edge series\0{sha}"),
            sop_instance_uid=None,
            sop_class_uid=None,
            modality="OT",
            format=p.suffix.lstrip(".").upper() or "unknown",
        )
    uids = {k: str(ds.get(k, "") or "").strip() for k in _UIDS}
    generated = tuple(k for k, v in uids.items() if not v)
    lat = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "") or "")
    return SourceInfo(
        name=str(p),
        sha256=sha,
        is_dicom=True,
        study_uid=uids["StudyInstanceUID"] or uid_from(f"eyecare-edge study\0{sha}"),
        series_uid=uids["SeriesInstanceUID"] or uid_from(f"eyecare-edge series\0{sha}"),
        sop_instance_uid=uids["SOPInstanceUID"] or None,
        sop_class_uid=str(ds.get("SOPClassUID", "") or "").strip() or None,
        modality=str(ds.get("Modality", "") or "OT"),
        format="DICOM" if not generated else f"DICOM without {', '.join(generated)}",
        laterality=lat if lat in ("L", "R", "B") else "",
        n_frames=int(ds.get("NumberOfFrames", 1) or 1),
        identifiers=tuple((k, str(ds.get(k, "") or "")) for k in IDENTIFYING),
        generated=generated,
        header=ds,
    )
