"""The screen run: every question about every frame of every file, one line each (`run_screen`),
with its summary and progress callbacks. A file refused as a whole (not a regular file,
unreadable, a header or decoder refusal) becomes one error line and the batch goes on; one
item's failure becomes its line. Consecutive questions about one image reuse its KV prefix
(`Pipeline.ask`), so asking k questions costs one image prefill, not k."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from eyecare_edge.bundle import sha256_file
from eyecare_edge.errors import EXIT_ITEMS_FAILED, EXIT_OK
from eyecare_edge.image_source import not_regular_reason
from eyecare_edge.images import ImageError, display_name, read_header
from eyecare_edge.screening.errors import ScreenError
from eyecare_edge.screening.inputs import SkippedFile
from eyecare_edge.screening.questions import TASKS, Question
from eyecare_edge.screening.results import FILE_LEVEL_PROMPT, ResultsFile, file_error_id, item_id


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
        return EXIT_ITEMS_FAILED if self.n_errors or self.n_previous_errors else EXIT_OK

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
        rec = line(path, sha, None, Question(FILE_LEVEL_PROMPT, ""), error=error)
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
            sha = sha256_file(path)
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
