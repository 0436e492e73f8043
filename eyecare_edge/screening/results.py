"""Where a screen run writes: deterministic item ids, and the JSONL results file that resumes
(torn last line cut, done ids skipped, error lines kept or retried) and appends durably (one
write, flush, fsync per line)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eyecare_edge.screening.errors import ScreenError


def item_id(path: str | os.PathLike[str], file_sha256: str | None, frame: int | None, prompt: str) -> str:
    """Deterministic id of one (file, frame, question): the same run asks the same ids, so a
    resumed run knows what is done. The absolute path is part of it, so two copies of one image
    get a line each; a file whose content changed gets new ids (it is asked again)."""
    rest = "\0".join([file_sha256 or "-", "-" if frame is None else str(frame), prompt])
    # The path as its raw bytes: a name that is not UTF-8 (surrogate escapes) hashes too; a UTF-8
    # name gives the same bytes as before, so existing outputs keep their ids.
    blob = os.fsencode(os.path.abspath(path)) + b"\0" + rest.encode("utf-8", "surrogateescape")
    return hashlib.sha256(blob).hexdigest()[:16]


FILE_LEVEL_PROMPT = "\0file"  # the "prompt" of a file's single refusal line (never a real prompt)


def file_error_id(path: str | os.PathLike[str], file_sha256: str | None) -> str:
    """Id of the one line a file refused as a whole gets (whatever its questions and frames)."""
    return item_id(path, file_sha256, None, FILE_LEVEL_PROMPT)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class ResultsFile:
    """The JSONL output: what it already holds (on resume) and a durable `append`."""

    def __init__(
        self, path: str | os.PathLike[str], *, digest: str, resume: bool, retry_errors: bool = False
    ) -> None:
        self.path = Path(path)
        self.digest = digest
        self.done: set[str] = set()
        self.n_existing_errors = 0
        self.truncated_bytes = 0
        self.dropped_errors = 0
        exists = self.path.is_file() and self.path.stat().st_size > 0
        if exists and not resume:
            raise ScreenError(
                f"{self.path}: exists and is not empty; pass --resume to continue it, or choose another output"
            )
        if exists:
            self._load(retry_errors)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # backslashreplace: a lone surrogate (a non-UTF-8 name inside some text) becomes a JSON
            # \udcXX escape, so every line stays valid UTF-8 JSON.
            self._fh = open(self.path, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
        except OSError as e:
            raise OSError(f"{self.path}: cannot write the results file ({e.strerror or e})") from e

    def _load(self, retry_errors: bool) -> None:
        data = self.path.read_bytes()
        cut = data.rfind(b"\n") + 1  # after the last complete line; the rest was cut by a kill
        kept: list[bytes] = []
        for n, line in enumerate(data[:cut].splitlines(keepends=True), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                rid = rec["id"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ScreenError(
                    f"{self.path}:{n}: not a screen results line ({e}); cannot resume it"
                ) from e
            theirs = rec.get("bundle_digest")
            if theirs != self.digest:
                raise ScreenError(
                    f"{self.path}:{n}: written with bundle {str(theirs)[:16]}, not this bundle {self.digest[:16]}; "
                    "use another output file for another bundle"
                )
            if rec.get("error") is not None:
                if retry_errors:
                    self.dropped_errors += 1
                    continue
                self.n_existing_errors += 1
            self.done.add(rid)
            kept.append(line)
        # Only a file that passed the checks above is changed.
        if cut < len(data):  # drop the torn last line (its item runs again)
            with open(self.path, "r+b") as f:
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
            self.truncated_bytes = len(data) - cut
        if retry_errors and self.dropped_errors:
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "wb") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one line and make it durable before returning (flush + fsync)."""
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.done.add(record["id"])

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
