"""Image-level labels for the vision stage: a CSV or JSONL of (image path, categorical columns).

This is how a clinic adapts the tower to its own cameras with the graded archives it already has
(DR grade, laterality, modality, diagnosis per image), which are far larger than any VQA set; the
phantom generator writes the same shape (`train_labels.jsonl`, one per image set).

- CSV: a header row; the path column is `--path-column` or the first of `image`, `path`, `file`,
  `filename`; every other column (except `id`, `split`, `synthetic`) is a label column unless the
  label columns are named. An empty cell means "not known for this image", not a class.
- JSONL (or a JSON list): one object per image, the same keys; `null` means "not known".

Rows that cannot be used are never allowed to stop a run: a missing file, an image that does not
decode, a row with no labels at all, or (in the held-out split) a class the training split never
saw are skipped with one warning each and counted (`LabelSkips`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from eyecare_edge.errors import EyecareError
from eyecare_edge.qa.loaders import BenchFormatError, read_json_records

log = logging.getLogger("eyecare_edge.training")

PATH_COLUMNS = ("image", "path", "file", "filename")
NOT_LABELS = {"id", "split", "synthetic", "width", "height"}


class LabelFormatError(EyecareError, ValueError):
    """A labels file that cannot be read at all (the message names the file and the reason)."""


@dataclass(frozen=True)
class LabelledImage:
    """One row: the resolved image path and its known labels (column -> class name)."""

    source: str  # "file:line N", for warnings
    path: str
    labels: dict[str, str]


@dataclass
class LabelSkips:
    """Rows left out and why: one warning per row, counted by reason (text before the colon)."""

    reasons: dict[str, str] = field(default_factory=dict)

    def add(self, source: str, reason: str) -> None:
        if source in self.reasons:
            return
        self.reasons[source] = reason
        log.warning("skipping %s: %s", source, reason)

    def __len__(self) -> int:
        return len(self.reasons)

    def by_reason(self) -> dict[str, int]:
        return dict(Counter(r.split(":", 1)[0] for r in self.reasons.values()))


def _cell(value: object) -> str | None:
    """A label cell as a class name; None for unknown (empty, null)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value).strip()
    return text or None


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    if path.suffix.lower() == ".csv":
        try:
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                rows = [(f"{path}:{i + 2}", dict(r)) for i, r in enumerate(reader)]
        except FileNotFoundError:
            raise LabelFormatError(f"{path}: file not found") from None
        except (UnicodeDecodeError, csv.Error) as e:
            raise LabelFormatError(f"{path}: not a readable CSV file ({e})") from None
        return rows
    try:
        records = read_json_records(path)
    except BenchFormatError as e:
        raise LabelFormatError(str(e)) from None
    return [(loc, obj) for loc, obj in records]


def read_labels(
    path: str | os.PathLike[str],
    *,
    images_root: str | os.PathLike[str] | None = None,
    path_column: str | None = None,
    columns: list[str] | None = None,
    skips: LabelSkips | None = None,
) -> tuple[list[LabelledImage], list[str]]:
    """(rows, label column names) of a labels CSV/JSONL; rows whose file is missing or that
    carry no label are skipped into `skips`. Decoding is checked later, where images are read."""
    path = Path(path)
    skips = skips if skips is not None else LabelSkips()
    base = Path(images_root) if images_root is not None else path.parent
    raw = _read_rows(path)
    if not raw:
        raise LabelFormatError(f"{path}: the labels file holds no rows")
    keys: list[str] = []
    for _, obj in raw:
        if isinstance(obj, dict):
            keys += [k for k in obj if k not in keys]
    pcol = path_column or next((c for c in PATH_COLUMNS if c in keys), None)
    if pcol is None or pcol not in keys:
        raise LabelFormatError(
            f"{path}: no image path column (looked for {path_column or ', '.join(PATH_COLUMNS)}; "
            f"columns: {', '.join(keys)})"
        )
    if columns:
        unknown = [c for c in columns if c not in keys]
        if unknown:
            raise LabelFormatError(f"{path}: no label column(s) {unknown}; columns: {', '.join(keys)}")
        names = list(columns)
    else:
        names = [k for k in keys if k != pcol and k not in NOT_LABELS]
    if not names:
        raise LabelFormatError(f"{path}: no label columns besides the path column {pcol!r}")
    rows: list[LabelledImage] = []
    for loc, obj in raw:
        if not isinstance(obj, dict):
            skips.add(loc, f"bad row: expected an object, got {type(obj).__name__}")
            continue
        rel = _cell(obj.get(pcol))
        if rel is None:
            skips.add(loc, f"bad row: empty {pcol!r}")
            continue
        labels = {}
        for n in names:
            v = obj.get(n)
            if isinstance(v, (dict, list)):
                skips.add(loc, f"bad row: column {n!r} is not a categorical value")
                labels = {}
                break
            c = _cell(v)
            if c is not None:
                labels[n] = c
        if not labels:
            if loc not in skips.reasons:
                skips.add(loc, "no labels: every label cell is empty")
            continue
        p = Path(rel)
        full = p if p.is_absolute() else base / p
        if not full.is_file():
            skips.add(loc, f"missing image: {full}")
            continue
        rows.append(LabelledImage(loc, str(full), labels))
    return rows, names


def split_rows(
    rows: list[LabelledImage], eval_fraction: float, seed: int
) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """(train, held-out): a seeded permutation by row; the same (rows, fraction, seed) -> same split."""
    import numpy as np

    n_eval = round(len(rows) * eval_fraction)
    if eval_fraction > 0 and len(rows) >= 2:
        n_eval = min(max(n_eval, 1), len(rows) - 1)
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1AB])).permutation(len(rows))
    held = {int(i) for i in order[:n_eval]}
    train = [r for i, r in enumerate(rows) if i not in held]
    evals = [r for i, r in enumerate(rows) if i in held]
    return train, evals


def class_vocab(rows: list[LabelledImage], names: list[str]) -> dict[str, list[str]]:
    """Each column's classes, as seen in `rows` (sorted, so the head layout is reproducible)."""
    return {n: sorted({r.labels[n] for r in rows if n in r.labels}) for n in names}


def drop_unknown(
    rows: list[LabelledImage], vocab: dict[str, list[str]], skips: LabelSkips
) -> list[LabelledImage]:
    """Rows whose every label is a known class; others are skipped as 'unknown label'."""
    out = []
    for r in rows:
        bad = [f"{k}={v!r}" for k, v in r.labels.items() if k in vocab and v not in vocab[k]]
        if bad:
            skips.add(r.source, f"unknown label: {', '.join(bad)} not among the training classes")
        else:
            out.append(r)
    return out


def write_labels_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
