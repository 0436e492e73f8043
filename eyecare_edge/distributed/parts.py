"""The results of a distributed screen run: a directory of parts, each a whole number of sources.

Why parts and not one appended JSONL: the driver receives finished sources in blocks from many
workers, and one atomic file per block is what makes a SIGKILL harmless. A part is written as a
hidden temporary file, fsynced, renamed into place and the directory fsynced, so a part on disk
is always complete; a kill leaves at most a `.tmp` file, which the next open deletes. A block
holds every line of the sources it carries, so a source is either wholly in the parts or not at
all, and resume is the union of the sources the parts complete.

Lines are the local engine's lines (`screening.run_screen`) plus `source_id`, `source_items`
(lines the source has in all: frames x questions) and `worker`. Reading dedupes by line `id`
(the first copy wins) and so does resume, which also rewrites parts to drop any duplicate, so
the directory holds every item exactly once even if something upstream ever sent one twice.

Parts are JSONL by default, or Parquet (pyarrow; dict-valued fields such as `timings` and
`options` are stored as JSON text and parsed back on read).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eyecare_edge.screening import ScreenError, fsync_dir

PART_FORMATS = ("jsonl", "parquet")
_JSON_COLUMNS_KEY = b"eyecare_edge.json_columns"


def _is_part(p: Path) -> bool:
    return p.is_file() and p.name.startswith("part-") and p.suffix in (".jsonl", ".parquet")


def list_parts(root: str | os.PathLike[str]) -> list[Path]:
    """The finished parts of a results directory, in name (= write) order."""
    r = Path(root)
    return sorted(p for p in r.iterdir() if _is_part(p)) if r.is_dir() else []


def _read_part(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise ScreenError(f"{path}: not a readable Parquet part ({e}); cannot resume it") from e
        meta = table.schema.metadata or {}
        json_cols = json.loads(meta.get(_JSON_COLUMNS_KEY, b"[]"))
        rows = table.to_pylist()
        for row in rows:
            for k in json_cols:
                if row.get(k) is not None:
                    row[k] = json.loads(row[k])
        return rows
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ScreenError(f"{path}:{n}: not a screen results line ({e}); cannot resume it") from e
    return rows


def _write_atomically(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        json_cols = sorted({k for r in rows for k, v in r.items() if isinstance(v, (dict, list))})
        flat = [
            {
                k: (json.dumps(v, ensure_ascii=False) if k in json_cols and v is not None else v)
                for k, v in r.items()
            }
            for r in rows
        ]
        table = pa.Table.from_pylist(flat)
        table = table.replace_schema_metadata({_JSON_COLUMNS_KEY: json.dumps(json_cols).encode()})
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
    else:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_parts(root: str | os.PathLike[str]) -> Iterator[dict]:
    """Every line of a results directory once (deduped by `id`, first copy wins), part by part."""
    seen: set[str] = set()
    for part in list_parts(root):
        for row in _read_part(part):
            rid = row.get("id")
            if rid in seen:
                continue
            seen.add(rid)
            yield row


@dataclass
class PartsState:
    """What a results directory already holds, as resume needs it."""

    done_ids: set[str] = field(default_factory=set)
    ids_by_source: dict[str, set[str]] = field(default_factory=dict)
    items_by_source: dict[str, int] = field(default_factory=dict)
    n_rows: int = 0
    n_errors: int = 0  # error lines kept (resume without retry)
    dropped_errors: int = 0  # error lines removed to run again (retry_errors)
    dropped_duplicates: int = 0

    def source_done(self, sid: str) -> bool:
        """Every line of the source is present (a retried error leaves it partly done)."""
        expected = self.items_by_source.get(sid)
        return expected is not None and len(self.ids_by_source.get(sid, ())) >= expected


class PartsDir:
    """A results directory: refuses to mix runs or bundles, resumes, writes parts atomically."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        digest: str,
        resume: bool,
        retry_errors: bool = False,
        fmt: str = "jsonl",
    ) -> None:
        if fmt not in PART_FORMATS:
            raise ScreenError(f"unknown part format {fmt!r}; expected one of {', '.join(PART_FORMATS)}")
        self.root = Path(root)
        self.digest = digest
        self.fmt = fmt
        self.state = PartsState()
        if self.root.exists() and not self.root.is_dir():
            raise ScreenError(
                f"{self.root}: exists and is not a directory (the ray engine writes a directory of parts)"
            )
        existing = list_parts(self.root)
        if existing and not resume:
            raise ScreenError(
                f"{self.root}: already holds {len(existing)} part(s); pass --resume to continue it, or choose another output"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for leftover in self.root.glob(".part-*.tmp"):  # a part a kill cut short: never renamed in
                leftover.unlink()
        except OSError as e:
            raise OSError(f"{self.root}: cannot write the results directory ({e.strerror or e})") from e
        # Names sort in write order across runs, and never repeat (two runs in one second and
        # process, or a pid reused after a reboot, must not overwrite a part).
        self._run = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._seq = 0
        if existing:
            self._load(existing, retry_errors)

    def _load(self, parts: list[Path], retry_errors: bool) -> None:
        st = self.state
        loaded = [(p, _read_part(p)) for p in parts]
        for p, rows in loaded:  # checked before anything is changed
            for n, row in enumerate(rows, 1):
                if not isinstance(row, dict) or "id" not in row or "source_id" not in row:
                    raise ScreenError(f"{p}: line {n} is not a ray screen line (no id / source_id)")
                if row.get("bundle_digest") != self.digest:
                    raise ScreenError(
                        f"{p}: line {n} was written with bundle {str(row.get('bundle_digest'))[:16]}, not this "
                        f"bundle {self.digest[:16]}; use another output directory for another bundle"
                    )
        for p, rows in loaded:
            kept = []
            for row in rows:
                if row["id"] in st.done_ids:
                    st.dropped_duplicates += 1
                    continue
                if row.get("error") is not None and retry_errors:
                    st.dropped_errors += 1
                    continue
                kept.append(row)
                st.done_ids.add(row["id"])
                sid = row["source_id"]
                st.ids_by_source.setdefault(sid, set()).add(row["id"])
                st.items_by_source[sid] = int(row.get("source_items") or 0)
                st.n_errors += row.get("error") is not None
            st.n_rows += len(kept)
            if len(kept) < len(rows):  # rewrite without duplicates / retried errors
                if kept:
                    _write_atomically(p, kept)
                else:
                    p.unlink()
                    fsync_dir(p.parent)

    def write(self, rows: Sequence[Mapping[str, Any]]) -> Path | None:
        """One new part with `rows` minus lines already present; durable when this returns."""
        st = self.state
        fresh = []
        for row in rows:
            if row["id"] not in st.done_ids:
                st.done_ids.add(row["id"])
                fresh.append(row)
        if not fresh:
            return None
        self._seq += 1
        path = self.root / f"part-{self._run}-{self._seq:06d}.{self.fmt}"
        _write_atomically(path, fresh)
        for row in fresh:
            sid = row["source_id"]
            st.ids_by_source.setdefault(sid, set()).add(row["id"])
            st.items_by_source[sid] = int(row.get("source_items") or 0)
        st.n_rows += len(fresh)
        return path
