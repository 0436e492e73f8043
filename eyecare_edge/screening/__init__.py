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

The package, by job: `inputs` (files, folders, globs -> files; skipped entries), `questions`
(tasks, questions files), `results` (item ids, the resumable JSONL file), `run` (`run_screen`,
its summary and progress), `errors` (`ScreenError`). Import the public names from here.
"""

from eyecare_edge.screening.errors import ScreenError
from eyecare_edge.screening.inputs import InputScan, SkippedFile, expand_inputs, scan_inputs
from eyecare_edge.screening.questions import TASKS, Question, default_questions, load_questions
from eyecare_edge.screening.results import ResultsFile, file_error_id, fsync_dir, item_id
from eyecare_edge.screening.run import Progress, ScreenPipeline, ScreenSummary, run_screen

__all__ = [
    "TASKS",
    "InputScan",
    "Progress",
    "Question",
    "ResultsFile",
    "ScreenError",
    "ScreenPipeline",
    "ScreenSummary",
    "SkippedFile",
    "default_questions",
    "expand_inputs",
    "file_error_id",
    "fsync_dir",
    "item_id",
    "load_questions",
    "run_screen",
    "scan_inputs",
]
