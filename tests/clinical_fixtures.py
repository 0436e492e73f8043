"""Test-only: real shared images wrapped as the DICOM a fundus camera / OCT sends (Ophthalmic
Photography 8 Bit, Ophthalmic Tomography), with made-up patient identifiers, and a runner for
DCMTK's `dsrdump`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
FUNDUS = SHARED / "hrf" / "images" / "01_dr.JPG"
OCT_SCANS = sorted((SHARED / "kermany-oct" / "images" / "DME").glob("*.jpeg"))[:3]
OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  # Ophthalmic Photography 8 Bit Image Storage
OPT = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # Ophthalmic Tomography Image Storage

PATIENT = {
    "PatientName": "Doe^Jane",
    "PatientID": "EYE-0042",
    "PatientBirthDate": "19580312",
    "PatientSex": "F",
    "AccessionNumber": "ACC-7781",
    "StudyID": "S-19",
    "StudyDate": "20260301",
    "StudyTime": "101500",
    "ReferringPhysicianName": "Who^Doctor",
}


def _base(sop_class: str, modality: str) -> Dataset:
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = sop_class
    fm.MediaStorageSOPInstanceUID = uid.generate_uid()
    fm.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = fm.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid.generate_uid()
    ds.SeriesInstanceUID = uid.generate_uid()
    ds.Modality = modality
    ds.ImageLaterality = "R"
    for k, v in PATIENT.items():
        setattr(ds, k, v)
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    return ds


def _small(img: np.ndarray, side: int) -> np.ndarray:
    scale = side / max(img.shape[:2])
    size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def make_op_dicom(
    out: Path,
    source: Path = FUNDUS,
    side: int = 320,
    *,
    attrs: dict[str, Any] | None = None,
    transfer_syntax: str = uid.ExplicitVRLittleEndian,
    bare: bool = False,
) -> Path:
    """A colour fundus photo as Ophthalmic Photography 8 Bit (RGB, uncompressed).

    attrs: attributes to set over the made-up patient (None deletes one); transfer_syntax: e.g.
    big endian; bare: no preamble and no file meta (implicit VR), as older modalities write."""
    rgb = _small(cv2.imread(str(source), cv2.IMREAD_COLOR), side)[:, :, ::-1]
    ds = _base(OP_8BIT, "OP")
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.PixelData = np.ascontiguousarray(rgb).tobytes()
    for keyword, value in (attrs or {}).items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if bare:
        del ds.file_meta
        ds.save_as(out, implicit_vr=True, little_endian=True, enforce_file_format=False)
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.save_as(out, enforce_file_format=True)
    return out


def make_opt_dicom(out: Path, scans: list[Path] = OCT_SCANS, side: int = 160) -> Path:
    """OCT B-scans as one multi-frame Ophthalmic Tomography instance (MONOCHROME2)."""
    frames = [_small(cv2.imread(str(s), cv2.IMREAD_GRAYSCALE), side) for s in scans]
    h = min(f.shape[0] for f in frames)
    w = min(f.shape[1] for f in frames)
    stack = np.stack([f[:h, :w] for f in frames])
    ds = _base(OPT, "OPT")
    ds.Rows, ds.Columns = h, w
    ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.ascontiguousarray(stack).tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out


# With +U8 DCMTK 3.6.7 converts every value to UTF-8 and then says its VR checker cannot check
# UTF-8, for every file; the values are converted and printed fine.
_DCMTK_UTF8_NOTE = "W: The VR checker does not support this Specific Character Set: ISO_IR 192"


def dsrdump(path: Path) -> str:
    """`dsrdump` of an SR, text converted to UTF-8 (+U8); fails the test on a non-zero exit or any
    error/warning it prints."""
    exe = shutil.which("dsrdump")
    assert exe, "DCMTK's dsrdump is not installed (apt-get install dcmtk)"
    r = subprocess.run(
        [exe, "+U8", "+Pl", "+Pc", str(path)], capture_output=True, encoding="utf-8", timeout=60
    )
    text = r.stdout + r.stderr
    assert r.returncode == 0, text
    bad = [ln for ln in text.splitlines() if ln.startswith(("E:", "W:", "F:")) and ln != _DCMTK_UTF8_NOTE]
    assert not bad, "\n".join(bad)
    return text
