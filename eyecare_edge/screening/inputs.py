"""What a screen run reads: files, folders (recursive) and globs -> the image files, each once,
and the folder entries that are not images (listed and counted as skipped)."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from eyecare_edge.image_source import not_regular_reason
from eyecare_edge.images import SUPPORTED_SUFFIXES, UNSUPPORTED_IMAGE_SUFFIXES, display_name
from eyecare_edge.screening.errors import ScreenError

_GLOB_CHARS = frozenset("*?[")


def _has_dicom_preamble(path: Path) -> bool:
    """PACS exports often have no suffix (IM000001); the DICM magic at byte 128 identifies them.

    Only a regular file is opened (a FIFO would block the scan for ever)."""
    try:
        if not_regular_reason(os.stat(path).st_mode) is not None:
            return False
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


@dataclass(frozen=True)
class SkippedFile:
    """A file a folder scan did not take, and why (listed and counted in the run's summary)."""

    path: str  # printable (see images.display_name)
    reason: str


@dataclass
class InputScan:
    files: list[Path] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)


def _skip_reason(p: Path) -> str:
    suffix = p.suffix.lower()
    if suffix in UNSUPPORTED_IMAGE_SUFFIXES:
        return f"{UNSUPPORTED_IMAGE_SUFFIXES[suffix]} is not a supported image format"
    if suffix:
        return f"suffix {display_name(suffix)} is not an image format screen reads"
    return "no suffix and no DICOM preamble"


def _scan_folder(folder: Path, skipped: list[SkippedFile] | None = None) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            p = Path(root) / name
            suffix = p.suffix.lower()
            if suffix in SUPPORTED_SUFFIXES or (suffix == "" and _has_dicom_preamble(p)):
                out.append(p)
            elif skipped is not None:
                skipped.append(SkippedFile(display_name(p), _skip_reason(p)))
    return out


def expand_inputs(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The files of :func:`scan_inputs` (without the list of skipped ones)."""
    return scan_inputs(inputs).files


def scan_inputs(inputs: Iterable[str | os.PathLike[str]]) -> InputScan:
    """Files, folders (recursive: supported suffixes, plus suffix-less DICOM) and globs -> files,
    in the order given (folders and globs sorted), each once.

    A file named explicitly is taken whatever its suffix (its bytes decide the format). A path
    that does not exist, or a glob/folder that matches nothing, is a ScreenError: a typo should
    stop the run at once, not after hours. Files in folders that are not images are returned as
    ``skipped`` with the reason.
    """
    seen: set[str] = set()
    out: list[Path] = []
    skipped: list[SkippedFile] = []

    def add(p: Path) -> None:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)

    for item in inputs:
        text = os.fspath(item)
        p = Path(text)
        if p.is_dir():
            found = _scan_folder(p, skipped)
            if not found:
                raise ScreenError(
                    f"{text}: folder holds no image files ({', '.join(sorted(SUPPORTED_SUFFIXES))})"
                )
            for f in found:
                add(f)
        elif p.exists():
            add(p)
        elif _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(text, recursive=True))
            files = []
            for m in matches:
                mp = Path(m)
                files.extend(_scan_folder(mp, skipped) if mp.is_dir() else [mp])
            if not files:
                raise ScreenError(f"{text}: pattern matches no files")
            for f in files:
                add(f)
        else:
            raise ScreenError(f"{display_name(text)}: no such file or folder")
    return InputScan(out, skipped)
