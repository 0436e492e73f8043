"""Batch screening: input expansion, questions files, the durable results file, resume logic (with a
fake pipeline, so the bookkeeping is tested on its own), and the real `screen` command: exit codes,
and a run killed with SIGKILL then resumed, after which every item is in the output exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from runtime_fixtures import runtime_assets

from eyecare_edge.cli import main
from eyecare_edge.images import ImageError
from eyecare_edge.pipeline import ImageInput
from eyecare_edge.screening import (
    Progress,
    Question,
    ResultsFile,
    ScreenError,
    default_questions,
    expand_inputs,
    file_error_id,
    item_id,
    load_questions,
    run_screen,
)

FAST_CLI = ["--threads", "1", "--vision-threads", "1", "--no-progress"]


def _png(path: Path, value: int = 100, size: tuple[int, int] = (24, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((*size, 3), value, np.uint8))
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# ---------------------------------------------------------------------------------------------
# inputs and questions
# ---------------------------------------------------------------------------------------------


def test_expand_inputs_files_folders_globs_and_dicom(tmp_path):
    a = _png(tmp_path / "a.png")
    _png(tmp_path / "sub" / "deep" / "b.PNG")
    (tmp_path / "sub" / "notes.txt").write_text("skip me")
    (tmp_path / "sub" / ".hidden.png").write_bytes(b"x")
    dicom = tmp_path / "sub" / "IM000001"
    dicom.write_bytes(b"\x00" * 128 + b"DICM" + b"\x00" * 16)
    (tmp_path / "sub" / "README").write_bytes(b"no suffix, not DICOM")
    odd = tmp_path / "scan.raw"
    odd.write_bytes(b"explicitly named: taken whatever the suffix")

    got = expand_inputs([str(a), str(tmp_path / "sub"), str(tmp_path / "*.png"), str(odd)])
    names = [p.name for p in got]
    assert names == ["a.png", "IM000001", "b.PNG", "scan.raw"]  # a.png once, folder sorted
    assert [p.name for p in expand_inputs([str(tmp_path / "**" / "*.png")])] == ["a.png"]
    assert len(expand_inputs([str(tmp_path / "**" / "*.[pP][nN][gG]")])) == 2

    for bad, msg in [
        (tmp_path / "missing.jpg", "no such file"),
        (tmp_path / "*.jpg", "matches no files"),
    ]:
        with pytest.raises(ScreenError, match=msg):
            expand_inputs([str(bad)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScreenError, match="no image files"):
        expand_inputs([str(tmp_path / "empty")])


def test_questions_files(tmp_path):
    j = tmp_path / "q.json"
    j.write_text(
        json.dumps(
            {"questions": [{"id": "dr", "question": "Is there DR?", "options": {"A": "Yes", "B": "No"}}]}
        )
    )
    (q,) = load_questions(j, "closed")
    assert q.qid == "dr" and q.options == {"A": "Yes", "B": "No"}
    assert q.prompt.splitlines()[:3] == ["Is there DR?", "A. Yes", "B. No"]

    jl = tmp_path / "q.jsonl"
    jl.write_text('"Describe the macula."\n\n{"question": "Any haemorrhage?"}\n')
    assert [x.prompt for x in load_questions(jl, "open")] == ["Describe the macula.", "Any haemorrhage?"]
    txt = tmp_path / "q.txt"
    txt.write_text("# one per line\nWhat is shown?\n\n")
    assert [x.prompt for x in load_questions(txt, "open")] == ["What is shown?"]

    with pytest.raises(ScreenError, match="needs 'options'"):
        load_questions(jl, "closed")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok"}\n{broken\n')
    with pytest.raises(ScreenError, match="bad.jsonl:2: invalid JSON"):
        load_questions(bad, "open")
    with pytest.raises(ScreenError, match="needs --questions"):
        default_questions("closed")
    assert default_questions("report", "Write it.")[0].prompt == "Write it."


# ---------------------------------------------------------------------------------------------
# results file and resume bookkeeping (fake pipeline)
# ---------------------------------------------------------------------------------------------


@dataclass
class FakeAnswer:
    text: str
    n_image_tokens: int = 10
    n_prompt_tokens: int = 20
    n_generated: int = 3
    stop_reason: str = "eog"
    cached_prefix: bool = False
    timings: dict = field(default_factory=lambda: {"total_ms": 1.0})


class FakePipeline:
    """Decodes with the real image loader; answers with a string, fails on request."""

    digest = "d" * 64

    def __init__(self, fail_on: set[str] = frozenset(), stop_after: int | None = None) -> None:
        self.fail_on = fail_on
        self.stop_after = stop_after
        self.asked: list[tuple[str, int | None, str]] = []

    def decode(self, source):
        from eyecare_edge.pipeline import decode_source

        return decode_source(source)

    def ask(self, image: ImageInput, question: str, *, max_tokens: int = 256):
        if self.stop_after is not None and len(self.asked) >= self.stop_after:
            raise KeyboardInterrupt  # stands in for a kill between two items
        self.asked.append((Path(image.name).name, image.frame, question))
        if question in self.fail_on:
            raise RuntimeError("transient failure")
        return FakeAnswer(f"answer to {question} about {Path(image.name).name}#{image.frame}")


def _multi_frame_tiff(path: Path, n: int) -> Path:
    import io

    from PIL import Image

    frames = [Image.fromarray(np.full((16, 16, 3), 30 * i, np.uint8)) for i in range(n)]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    path.write_bytes(buf.getvalue())
    return path


def test_run_screen_resume_after_interrupt_writes_each_item_once(tmp_path):
    files = [_png(tmp_path / f"im{i}.png", 20 * i) for i in range(3)]
    files.append(_multi_frame_tiff(tmp_path / "stack.tif", 3))
    bad = tmp_path / "bad.jpg"
    bad.write_text("text, not a JPEG")
    files.append(bad)
    questions = [Question("Q1", "Q1"), Question("Q2", "Q2")]
    out = tmp_path / "out.jsonl"
    expected = 3 * 2 + 3 * 2 + 1  # three images, three frames (two questions each); one refused file: one line

    totals: list[int] = []
    prog = Progress(add_total=totals.append)
    with (
        ResultsFile(out, digest=FakePipeline.digest, resume=False) as results,
        pytest.raises(KeyboardInterrupt),
    ):
        run_screen(FakePipeline(stop_after=5), files, questions, results, task="open", progress=prog)
    assert len(_lines(out)) == 5

    pipe = FakePipeline()
    with ResultsFile(out, digest=FakePipeline.digest, resume=True) as results:
        summary = run_screen(pipe, files, questions, results, task="open", progress=prog)
    lines = _lines(out)
    assert len(lines) == expected == len({x["id"] for x in lines})
    assert summary.n_skipped == 5 and summary.n_items == expected - 5
    assert summary.n_errors == 1 and summary.exit_code == 3
    assert 4 in totals  # the 3-frame TIFF added (3 - 1) x 2 items
    errors = [x for x in lines if x["error"]]
    assert {x["path"] for x in errors} == {str(bad)} and "text" in errors[0]["error"]
    frames = sorted(x["frame"] for x in lines if x["path"].endswith("stack.tif"))
    assert frames == [0, 0, 1, 1, 2, 2]
    # the resumed run starts with the item the interrupt stopped (file order, questions inner)
    assert pipe.asked[0] == ("im2.png", None, "Q2")
    ok = [x for x in lines if not x["error"]]
    assert all(x["answer"].startswith("answer to ") and x["bundle_digest"] == FakePipeline.digest for x in ok)
    assert all(x["id"] == item_id(x["path"], x["image_sha256"], x["frame"], x["question"]) for x in ok)
    assert errors[0]["id"] == file_error_id(str(bad), errors[0]["image_sha256"]) and errors[0]["question"] is None


def test_resume_truncates_a_torn_line_and_retries_errors_on_request(tmp_path):
    files = [_png(tmp_path / f"im{i}.png", 40 * i) for i in range(2)]
    questions = [Question("Q1", "Q1"), Question("Q2", "Q2")]
    out = tmp_path / "out.jsonl"
    with ResultsFile(out, digest=FakePipeline.digest, resume=False) as results:
        s = run_screen(FakePipeline(fail_on={"Q2"}), files, questions, results, task="open")
    assert (s.n_ok, s.n_errors) == (2, 2)
    # a kill in the middle of a write leaves half a line
    with open(out, "a") as f:
        f.write('{"id": "abc", "path": "im9.png", "answ')
    with pytest.raises(ScreenError, match="exists and is not empty"):
        ResultsFile(out, digest=FakePipeline.digest, resume=False)
    with pytest.raises(ScreenError, match="not this bundle"):
        ResultsFile(out, digest="e" * 64, resume=True)

    with ResultsFile(out, digest=FakePipeline.digest, resume=True) as results:
        assert results.truncated_bytes > 0 and results.n_existing_errors == 2
        s = run_screen(FakePipeline(), files, questions, results, task="open")
    assert s.n_items == 0 and s.n_skipped == 4 and s.exit_code == 3  # errors kept: still 3
    assert out.read_text().endswith("\n") and len(_lines(out)) == 4

    with ResultsFile(out, digest=FakePipeline.digest, resume=True, retry_errors=True) as results:
        assert results.dropped_errors == 2
        s = run_screen(FakePipeline(), files, questions, results, task="open")
    lines = _lines(out)
    assert (s.n_items, s.n_ok, s.exit_code) == (2, 2, 0)
    assert len(lines) == 4 == len({x["id"] for x in lines}) and not any(x["error"] for x in lines)


def test_unreadable_file_becomes_error_lines(tmp_path):
    f = tmp_path / "folder.png"  # named like an image, but open() fails (as for a locked file)
    f.mkdir()
    out = tmp_path / "out.jsonl"
    with ResultsFile(out, digest=FakePipeline.digest, resume=False) as results:
        s = run_screen(FakePipeline(), [f], [Question("Q", "Q")], results, task="open")
    assert s.n_errors == 1 and "is a directory" in _lines(out)[0]["error"]


def test_decode_errors_from_the_pipeline_are_recorded(tmp_path):
    class Failing(FakePipeline):
        def decode(self, source):
            raise ImageError(str(source), "synthetic decoder failure")

    f = _png(tmp_path / "x.png")
    out = tmp_path / "out.jsonl"
    with ResultsFile(out, digest=FakePipeline.digest, resume=False) as results:
        run_screen(Failing(), [f], [Question("A", "A"), Question("B", "B")], results, task="open")
    assert [x["error"] for x in _lines(out)] == ["synthetic decoder failure"]  # one line per refused file


# ---------------------------------------------------------------------------------------------
# the real command
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return runtime_assets(tmp_path_factory)


def test_screen_cli_usage_and_start_errors(assets, tmp_path):
    images = [str(p) for p in assets.images[:2]]
    out = tmp_path / "r.jsonl"
    run = CliRunner().invoke
    r = run(main, ["screen", str(assets.bundle), *images, "-o", str(out), "--task", "closed", *FAST_CLI])
    assert r.exit_code == 2 and "needs --questions" in r.output
    r = run(main, ["screen", str(assets.bundle), str(tmp_path / "nope.png"), "-o", str(out), *FAST_CLI])
    assert r.exit_code == 2 and "no such file" in r.output
    r = run(main, ["screen", str(assets.bundle), *images, "-o", str(out), "--retry-errors", *FAST_CLI])
    assert r.exit_code == 2
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run(main, ["screen", str(assets.bundle), *images, "-o", str(blocker / "r.jsonl"), *FAST_CLI])
    assert r.exit_code == 1 and "cannot write" in r.stderr
    not_bundle = tmp_path / "empty_dir"
    not_bundle.mkdir()
    r = run(main, ["screen", str(not_bundle), *images, "-o", str(out), *FAST_CLI])
    assert r.exit_code == 1 and "not a bundle" in r.stderr

    r = run(
        main,
        [
            "screen",
            str(assets.bundle),
            *images,
            "-o",
            str(out),
            "--task",
            "open",
            "-q",
            "What is shown?",
            "--max-tokens",
            "6",
            *FAST_CLI,
        ],
    )
    assert r.exit_code == 0, r.output
    lines = _lines(out)
    assert len(lines) == 2 and all(x["error"] is None and x["task"] == "open" for x in lines)
    assert {"timings", "image_sha256", "bundle_digest", "vision", "llm"} <= set(lines[0])
    assert "2 item(s)" in r.stderr and "2 ok" in r.stderr
    r = run(main, ["screen", str(assets.bundle), *images, "-o", str(out), "--task", "open", *FAST_CLI])
    assert r.exit_code == 2 and "--resume" in r.output


def test_screen_killed_with_sigkill_resumes_without_loss_or_duplicates(assets, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for p in assets.images[:12]:
        (folder / p.name).write_bytes(p.read_bytes())
    questions = tmp_path / "q.txt"
    questions.write_text("What is shown?\nDescribe the image.\nIs this image normal?\n")
    out = tmp_path / "r.jsonl"
    cmd = [
        sys.executable, "-m", "eyecare_edge.cli", "screen", str(assets.bundle), str(folder),
        "-o", str(out), "--task", "open", "--questions", str(questions), "--max-tokens", "24", *FAST_CLI,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    n_before = out.read_bytes().count(b"\n")
    assert 2 <= n_before < 36

    r = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = _lines(out)
    ids = [x["id"] for x in lines]
    assert len(lines) == 12 * 3 and len(set(ids)) == len(ids)
    assert {(Path(x["path"]).name, x["question"]) for x in lines} == {
        (p.name, q)
        for p in assets.images[:12]
        for q in ("What is shown?", "Describe the image.", "Is this image normal?")
    }
    assert "already done" in r.stderr
