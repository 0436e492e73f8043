"""What a screen run reads: image files, folders, globs and manifests -> `Source`s with stable ids.

A manifest lists the archive instead of walking it (walking millions of files on a network share
takes longer than the listing a PACS export already has):

* CSV/TSV with a header that has a `path` column and optionally an `id` column;
* JSONL, one `{"path": ..., "id": ...}` object a line;
* Parquet with `path` (and optional `id`) columns (needs pyarrow, which the `ray` extra brings);
* a file list (`.txt`/`.lst`): one path a line, `#` comments.

Relative paths are relative to the manifest's folder. A manifest row is not checked on the
driver: a missing or unreadable file becomes error lines when it is screened, so one stale row in
a million does not stop the run (a missing file or folder named on the command line still does,
as in the local engine).

The id of a source is what resume recognises it by, so it must survive the archive being moved:
the manifest's `id` when there is one; else, for DICOM, `dicom:<SOPInstanceUID>` (read from the
header on the driver, a few KB per file; give ids in the manifest to skip that); else the
absolute path. An item (one line) is a source, a frame and a question.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from eyecare_edge.screening import InputScan, ScreenError, SkippedFile, expand_inputs, scan_inputs

MANIFEST_SUFFIXES = frozenset({".csv", ".tsv", ".jsonl", ".parquet", ".txt", ".lst"})
_DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})


@dataclass(frozen=True)
class Source:
    """One file to screen: its absolute path and the id resume knows it by."""

    path: str
    source_id: str


def is_manifest(path: str | os.PathLike[str]) -> bool:
    """A manifest is an existing file with a manifest suffix (an image never has one)."""
    p = Path(path)
    return p.suffix.lower() in MANIFEST_SUFFIXES and p.is_file()


def _rows_csv(p: Path, text: str) -> list[tuple[str, str | None]]:
    dialect = "excel-tab" if p.suffix.lower() == ".tsv" else "excel"
    reader = csv.DictReader(text.splitlines(), dialect=dialect)
    if not reader.fieldnames or "path" not in [f.strip() for f in reader.fieldnames]:
        raise ScreenError(f"{p}: a manifest needs a header with a 'path' column (and optionally 'id')")
    rows = []
    for n, row in enumerate(reader, 2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not row.get("path"):
            raise ScreenError(f"{p}:{n}: empty 'path'")
        rows.append((row["path"], row.get("id") or None))
    return rows


def _rows_jsonl(p: Path, text: str) -> list[tuple[str, str | None]]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ScreenError(f"{p}:{n}: invalid JSON ({e})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("path"), str) or not obj["path"]:
            raise ScreenError(f"{p}:{n}: expected an object with a 'path' string")
        rid = obj.get("id")
        rows.append((obj["path"], None if rid is None else str(rid)))
    return rows


def _rows_parquet(p: Path) -> list[tuple[str, str | None]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ScreenError(f"{p}: a Parquet manifest needs pyarrow (pip install 'eyecare-edge[ray]')") from e
    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises its own types for corrupt files
        raise ScreenError(f"{p}: cannot read the Parquet manifest ({e})") from e
    if "path" not in table.column_names:
        raise ScreenError(f"{p}: a manifest needs a 'path' column (and optionally 'id')")
    paths = table.column("path").to_pylist()
    ids = table.column("id").to_pylist() if "id" in table.column_names else [None] * len(paths)
    rows = []
    for n, (path, rid) in enumerate(zip(paths, ids, strict=True)):
        if not path:
            raise ScreenError(f"{p}: row {n}: empty 'path'")
        rows.append((str(path), None if rid is None else str(rid)))
    return rows


def read_manifest_rows(path: str | os.PathLike[str]) -> list[tuple[Path, str | None]]:
    """(absolute path, id or None) for each row of a manifest, in its order."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        rows = _rows_parquet(p)
    else:
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ScreenError(f"{p}: cannot read the manifest ({e})") from e
        if suffix in (".csv", ".tsv"):
            rows = _rows_csv(p, text)
        elif suffix == ".jsonl":
            rows = _rows_jsonl(p, text)
        else:
            rows = [
                (line.strip(), None)
                for line in text.splitlines()
                if line.strip() and not line.lstrip().startswith("#")
            ]
    if not rows:
        raise ScreenError(f"{p}: the manifest lists no files")
    base = p.parent.absolute()
    return [(Path(os.path.normpath(base / r)), rid) for r, rid in rows]


def is_dicom(path: str | os.PathLike[str]) -> bool:
    """By suffix, or (suffix-less PACS exports) by the DICM magic at byte 128."""
    p = Path(path)
    if p.suffix.lower() in _DICOM_SUFFIXES:
        return True
    if p.suffix:
        return False
    try:
        with open(p, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def dicom_instance_uid(path: str | os.PathLike[str]) -> str | None:
    """The SOPInstanceUID from a DICOM header (pixels not read), or None when there is none."""
    import pydicom

    try:
        ds = pydicom.dcmread(os.fspath(path), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    except Exception:  # an unreadable header: the screen run records the reason
        try:
            ds = pydicom.dcmread(
                os.fspath(path), stop_before_pixels=True, specific_tags=["SOPInstanceUID"], force=True
            )
        except Exception:
            return None
    uid = getattr(ds, "SOPInstanceUID", None)
    return str(uid).strip() or None if uid is not None else None


def source_id(path: str | os.PathLike[str], manifest_id: str | None = None) -> str:
    """The stable id of a source (see the module docstring for the order)."""
    if manifest_id:
        return manifest_id
    if is_dicom(path):
        uid = dicom_instance_uid(path)
        if uid:
            return f"dicom:{uid}"
    return os.path.abspath(path)


def resolve_sources(inputs: Iterable[str | os.PathLike[str]]) -> list[Source]:
    """Manifests, files, folders and globs -> sources in the order given, each path once.

    Two sources with one id (a manifest id used twice, or two copies of one DICOM instance) are
    a ScreenError naming both paths: resume could not tell them apart.
    """
    by_path: dict[str, Source] = {}
    by_id: dict[str, str] = {}
    for item in inputs:
        if is_manifest(item):
            rows = read_manifest_rows(item)
        else:
            rows = [(p, None) for p in expand_inputs([item])]
        for p, rid in rows:
            path = os.path.abspath(p)
            if path in by_path:
                continue
            sid = source_id(path, rid)
            if sid in by_id:
                raise ScreenError(f"{path}: same id {sid!r} as {by_id[sid]}; ids must be unique")
            by_id[sid] = path
            by_path[path] = Source(path, sid)
    return list(by_path.values())


def scan_paths(inputs: Iterable[str | os.PathLike[str]]) -> InputScan:
    """The local engine's inputs: `screening.scan_inputs` (files and the folder entries it
    skipped), plus manifests (their paths, in manifest order)."""
    items = list(inputs)
    if not any(is_manifest(i) for i in items):
        return scan_inputs(items)
    seen: set[str] = set()
    out: list[Path] = []
    skipped: list[SkippedFile] = []
    for item in items:
        if is_manifest(item):
            paths = [Path(p) for p, _ in read_manifest_rows(item)]
        else:
            scan = scan_inputs([item])
            paths, skipped = scan.files, skipped + list(scan.skipped)
        for p in paths:
            key = os.path.abspath(p)
            if key not in seen:
                seen.add(key)
                out.append(p)
    return InputScan(out, skipped)


def expand_paths(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The files of :func:`scan_paths`."""
    return scan_paths(inputs).files
