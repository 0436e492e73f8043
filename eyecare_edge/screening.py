"""Batch screening: many images, a few questions each, one JSONL line per answer as it finishes.

What makes a long run safe to interrupt:

* Every (file, frame, question) has a deterministic `id` (`item_id`: the file's absolute path, its
  sha256, the frame and the question). A line is written with one `write`, flushed and fsynced
  as soon as its answer is done, so a killed run (even SIGKILL) loses at most the item in flight.
* `--resume` reads the output first. A last line cut by the kill (no newline) is truncated away;
  every id already present is skipped, so no item is written twice. Items that ended in an error
  are skipped too (a file that cannot be decoded fails again), unless `retry_errors`: then their
  lines are removed (the file is rewritten atomically) and the items run again, so each item
  still appears exactly once.
* Without resume, an existing non-empty output is refused rather than appended to.
* Lines written by a different bundle (digest) are refused: one output file, one bundle.

A file refused as a whole (not a regular file, unreadable, a header or decoder refusal) becomes
ONE error line (``frame`` and ``question`` null, its own id), whatever its questions or claimed
frames, and the batch goes on; a folder's files that are not images are listed and counted as
skipped in the summary. Paths that are not valid UTF-8 are written escaped (``\xe9``) and
hashed as their raw bytes, so lines stay valid JSON and resume works past them.
Consecutive questions about one image reuse its KV prefix (`Pipeline.ask`), so asking k
questions costs one image prefill, not k.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from eyecare_edge.errors import EyecareError
from eyecare_edge.image_source import not_regular_reason
from eyecare_edge.images import (
    SUPPORTED_SUFFIXES,
    UNSUPPORTED_IMAGE_SUFFIXES,
    ImageError,
    display_name,
    read_header,
)
from eyecare_edge.prompts import OPEN_QA_DEFAULT_PROMPT, REPORT_PROMPT, format_closed_question

TASKS = ("report", "closed", "open", "protocol")
_GLOB_CHARS = frozenset("*?[")


class ScreenError(EyecareError):
    """A screen run that cannot start: bad inputs, questions or output file (message says why)."""


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """One question of a run. `prompt` is what the model is asked (options formatted in for
    closed questions); `question`/`options`/`qid` are what the questions file said."""

    prompt: str
    question: str
    options: Mapping[str, str] | None = None
    qid: str | None = None


def _question_from(obj: Any, where: str, task: str) -> Question:
    if isinstance(obj, str):
        obj = {"question": obj}
    if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or not obj["question"].strip():
        raise ScreenError(f"{where}: expected a question string or an object with a 'question' string")
    text = obj["question"].strip()
    options = obj.get("options")
    valid_options = isinstance(options, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in options.items()
    )
    if options is not None and not (valid_options and options):
        raise ScreenError(f"{where}: 'options' must be an object of letter -> option text")
    if task == "closed" and not options:
        raise ScreenError(f"{where}: a closed question needs 'options' (letter -> text)")
    prompt = format_closed_question(text, options) if task == "closed" else text
    qid = obj.get("id")
    return Question(prompt, text, dict(options) if options else None, None if qid is None else str(qid))


def load_questions(path: str | os.PathLike[str], task: str) -> list[Question]:
    """Questions from JSON (a list, or {"questions": [...]}), JSONL (one per line) or text (one
    question per line, `#` comments). An entry is a string or {"question", "options"?, "id"?};
    closed questions need options."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ScreenError(f"{p}: cannot read the questions file ({e})") from e
    entries: list[tuple[str, Any]] = []
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ScreenError(f"{p}: invalid JSON ({e})") from e
        if isinstance(data, dict) and "questions" in data:
            data = data["questions"]
        if not isinstance(data, list):
            raise ScreenError(f"{p}: expected a list of questions")
        entries = [(f"{p}[{i}]", obj) for i, obj in enumerate(data)]
    elif p.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append((f"{p}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ScreenError(f"{p}:{n}: invalid JSON ({e})") from e
    else:
        entries = [
            (f"{p}:{n}", line.strip())
            for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    questions = [_question_from(obj, where, task) for where, obj in entries]
    if not questions:
        raise ScreenError(f"{p}: no questions")
    return questions


def default_questions(task: str, report_prompt: str | None = None) -> list[Question]:
    """The question of a task when no questions file is given (closed QA has none)."""
    if task == "report":
        prompt = report_prompt or REPORT_PROMPT
        return [Question(prompt, prompt)]
    if task == "open":
        return [Question(OPEN_QA_DEFAULT_PROMPT, OPEN_QA_DEFAULT_PROMPT)]
    raise ScreenError("--task closed needs --questions FILE (questions with options)")


# ---------------------------------------------------------------------------------------------
# Results file
# ---------------------------------------------------------------------------------------------


def item_id(path: str | os.PathLike[str], file_sha256: str | None, frame: int | None, prompt: str) -> str:
    """Deterministic id of one (file, frame, question): the same run asks the same ids, so a
    resumed run knows what is done. The absolute path is part of it, so two copies of one image
    get a line each; a file whose content changed gets new ids (it is asked again)."""
    rest = "\0".join([file_sha256 or "-", "-" if frame is None else str(frame), prompt])
    # The path as its raw bytes: a name that is not UTF-8 (surrogate escapes) hashes too; a UTF-8
    # name gives the same bytes as before, so existing outputs keep their ids.
    blob = os.fsencode(os.path.abspath(path)) + b"\0" + rest.encode("utf-8", "surrogateescape")
    return hashlib.sha256(blob).hexdigest()[:16]


_FILE_LEVEL = "\0file"  # the "prompt" of a file's single refusal line (never a real prompt)


def file_error_id(path: str | os.PathLike[str], file_sha256: str | None) -> str:
    """Id of the one line a file refused as a whole gets (whatever its questions and frames)."""
    return item_id(path, file_sha256, None, _FILE_LEVEL)


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


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


class ScreenPipeline(Protocol):
    """What `run_screen` needs of a `Pipeline` (a protocol, so bookkeeping is testable alone)."""

    digest: str

    def decode(self, source: Any) -> list[Any]: ...

    def ask(self, images: Any, question: str, *, max_tokens: int = ...) -> Any: ...


@dataclass
class ScreenSummary:
    n_files: int = 0
    n_items: int = 0  # asked (or failed) in this run
    n_ok: int = 0
    n_errors: int = 0
    n_skipped: int = 0  # already in the output (resume)
    n_previous_errors: int = 0  # error lines kept from before (resume without retry)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    skipped_files: list[SkippedFile] = field(default_factory=list)  # not images (folder scans)

    @property
    def n_skipped_files(self) -> int:
        return len(self.skipped_files)

    @property
    def items_per_min(self) -> float:
        return 60.0 * self.n_items / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 when every item in the output succeeded, 3 when some ended in an error."""
        return 3 if self.n_errors or self.n_previous_errors else 0

    def to_dict(self) -> dict:
        return {
            "files": self.n_files,
            "items": self.n_items,
            "ok": self.n_ok,
            "errors": self.n_errors,
            "skipped": self.n_skipped,
            "previous_errors": self.n_previous_errors,
            "skipped_files": self.n_skipped_files,
            "seconds": round(self.seconds, 2),
            "items_per_min": round(self.items_per_min, 2),
        }


@dataclass
class Progress:
    """Callbacks a caller may give `run_screen` (e.g. a progress bar). The total starts at
    files x questions; `add_total(n)` corrects it as the run learns more (n > 0: frames of a
    multi-frame file; n < 0: items already done in a resumed output). `advance(1, line)` follows
    each written line."""

    add_total: Callable[[int], None] = lambda n: None
    advance: Callable[[int, dict], None] = lambda n, line: None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _error_text(e: BaseException) -> str:
    if isinstance(e, ImageError):
        return display_name(e.reason)
    text = " ".join(display_name(str(e)).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}"


def run_screen(
    pipeline: ScreenPipeline,
    files: Sequence[Path],
    questions: Sequence[Question],
    results: ResultsFile,
    *,
    task: str,
    max_tokens: int = 256,
    progress: Progress | None = None,
    extra_fields: Mapping[str, Any] | None = None,
    answer_fn: Callable[[Any, str], Any] | None = None,
    on_file: Callable[[Path, list[dict]], None] | None = None,
    skipped_files: Sequence[SkippedFile] = (),
) -> ScreenSummary:
    """Ask every question about every frame of every file, appending one line per item.

    Lines: id, path, frame, image_sha256, task, question (as asked), question_id, options,
    answer, error (None when ok), timings (ms; decode_ms on the first item of a file),
    n_image_tokens, n_prompt_tokens, n_generated, stop_reason, cached_prefix, bundle_digest,
    plus `extra_fields` (e.g. which vision backend and GGUF ran). A file refused as a whole gets
    one line (`file_error_id`; frame, question, options null). `skipped_files` (from
    `scan_inputs`) are listed in the summary.

    answer_fn(image, prompt) replaces `pipeline.ask` (e.g. constrained closed answers); fields
    in its answer's `record_fields` join the line. on_file(path, lines) is called once each file
    is done, with the lines this run wrote for it (e.g. to write its DICOM SR).
    """
    if task not in TASKS:
        raise ScreenError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    prog = progress or Progress()
    summary = ScreenSummary(
        n_files=len(files), n_previous_errors=results.n_existing_errors, skipped_files=list(skipped_files)
    )
    extra = dict(extra_fields or {})
    t_start = time.perf_counter()

    def line(path: Path, sha: str | None, frame: int | None, q: Question, **values: Any) -> dict:
        rec = {
            "id": item_id(path, sha, frame, q.prompt),
            "path": display_name(path),
            "frame": frame,
            "image_sha256": sha,
            "task": task,
            "question": q.prompt,
            "question_id": q.qid,
            "options": q.options,
            "answer": None,
            "error": None,
            "timings": {},
            "bundle_digest": pipeline.digest,
        }
        rec.update(values)
        rec.update(extra)
        return rec

    file_lines: list[tuple[Path, list[dict]]] = []  # the file being asked and its lines, for on_file

    def file_done() -> None:
        if on_file is not None and file_lines:
            on_file(*file_lines.pop())
    def refuse(path: Path, sha: str | None, error: str, counted: int) -> None:
        """The one line of a file refused as a whole; `counted` items were in the progress total."""
        rec = line(path, sha, None, Question(_FILE_LEVEL, ""), error=error)
        rec.update(id=file_error_id(path, sha), question=None)
        prog.add_total(1 - counted)
        write(rec)

    def write(rec: dict) -> None:
        results.append(rec)
        if file_lines:
            file_lines[-1][1].append(rec)
        summary.n_items += 1
        if rec["error"] is None:
            summary.n_ok += 1
        else:
            summary.n_errors += 1
            if len(summary.errors) < 20:
                summary.errors.append(f"{rec['path']}: {rec['error']}")
        prog.advance(1, rec)

    for path in files:
        file_done()
        file_lines.append((path, []))
        nq = len(questions)
        t_file = time.perf_counter()
        sha: str | None = None
        try:
            reason = not_regular_reason(os.stat(path).st_mode)  # before opening: a FIFO blocks
            if reason is not None:
                raise OSError(reason)
            sha = _file_sha256(path)
            read_error: str | None = None
        except OSError as e:
            read_error = str(e) if e.errno is None else f"cannot read the file ({e.strerror or e})"
        if file_error_id(path, sha) in results.done:  # refused as a whole in an earlier run
            summary.n_skipped += 1
            prog.add_total(-nq)
            continue
        if read_error is None:
            try:
                n_frames = read_header(path).frames
            except ImageError as e:
                read_error = _error_text(e)
        if read_error is not None:
            refuse(path, sha, display_name(read_error), nq)
            continue
        header_frames: list[int | None] = [None] if n_frames <= 1 else list(range(n_frames))
        if len(header_frames) > 1:
            prog.add_total((len(header_frames) - 1) * nq)
        pending = [
            (f, q)
            for f in header_frames
            for q in questions
            if item_id(path, sha, f, q.prompt) not in results.done
        ]
        skipped = len(header_frames) * nq - len(pending)
        summary.n_skipped += skipped
        if skipped:  # done before: not work of this run (keeps the ETA honest)
            prog.add_total(-skipped)
        if not pending:
            continue
        try:
            frames = pipeline.decode(path)
        except (ImageError, ValueError, MemoryError, OSError) as e:
            refuse(path, sha, _error_text(e), len(pending))
            continue
        decode_ms = 1000.0 * (time.perf_counter() - t_file)
        decoded_frames = [im.frame for im in frames]
        if decoded_frames != header_frames:  # header and decoder disagree on frames: trust the decoder
            prog.add_total((len(decoded_frames) - len(header_frames)) * nq)
        first = True
        for image in frames:
            for q in questions:
                rid = item_id(path, sha, image.frame, q.prompt)
                if rid in results.done:
                    continue
                try:
                    if answer_fn is None:
                        answer = pipeline.ask(image, q.prompt, max_tokens=max_tokens)
                    else:
                        answer = answer_fn(image, q.prompt)
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # one item's failure must not stop the batch
                    write(line(path, sha, image.frame, q, error=_error_text(e)))
                    continue
                timings = dict(answer.timings)
                timings["decode_ms"] = decode_ms if first else 0.0
                first = False
                write(
                    line(
                        path,
                        sha,
                        image.frame,
                        q,
                        answer=answer.text,
                        timings={k: round(v, 2) for k, v in timings.items()},
                        n_image_tokens=answer.n_image_tokens,
                        n_prompt_tokens=answer.n_prompt_tokens,
                        n_generated=answer.n_generated,
                        stop_reason=answer.stop_reason,
                        cached_prefix=answer.cached_prefix,
                        **getattr(answer, "record_fields", {}),
                    )
                )
    file_done()
    summary.seconds = time.perf_counter() - t_start
    return summary
