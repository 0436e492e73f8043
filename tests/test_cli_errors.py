"""One error base: a command raising an `EyecareError` exits with its code and prints `error: …`."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from eyecare_edge import cli
from eyecare_edge.bundle import BundleError
from eyecare_edge.clinical.outputs import ClinicalOutputError
from eyecare_edge.clinical.protocol import ProtocolError
from eyecare_edge.errors import EXIT_CODES, EyecareError, EyecareUsageError, ItemsFailed
from eyecare_edge.image_types import ImageError
from eyecare_edge.llm import LLMError
from eyecare_edge.screening import ScreenError
from eyecare_edge.vision import VisionError

ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"

# What a command raises -> (exit code, the stderr line).
CASES = [
    (EyecareError("the job failed"), 1, "error: the job failed"),
    (EyecareUsageError("bad value"), 2, "error: bad value"),
    (ItemsFailed(2, 5, "out.jsonl"), 3, "error: 2 of 5 items failed (see out.jsonl)"),
    (ItemsFailed(1, 3, what="images"), 3, "error: 1 of 3 images failed"),
    (BundleError("b: no manifest.json"), 1, "error: b: no manifest.json"),
    (ImageError("x.jpg", "not an image"), 1, "error: x.jpg: not an image"),
    (VisionError("ort-cpu fp32: cannot load"), 1, "error: ort-cpu fp32: cannot load"),
    (LLMError("llama.cpp: no model"), 1, "error: llama.cpp: no model"),
    (ScreenError("no inputs"), 1, "error: no inputs"),
    (ProtocolError("bad protocol"), 1, "error: bad protocol"),
    (ClinicalOutputError("cannot write"), 1, "error: cannot write"),
]


@click.command("boom")
@click.pass_context
def boom(ctx: click.Context) -> None:
    raise ctx.obj


@pytest.fixture()
def run_boom(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "boom", f"{__name__}:boom")

    def run(error: BaseException):
        return CliRunner().invoke(cli.main, ["boom"], obj=error)

    return run


@pytest.mark.parametrize(
    "error, code, line", CASES, ids=lambda c: type(c).__name__ if isinstance(c, Exception) else None
)
def test_each_error_class_exits_with_its_code(run_boom, error, code, line):
    r = run_boom(error)
    assert r.exit_code == code == error.exit_code
    assert r.stderr == line + "\n" and r.stdout == ""
    assert isinstance(r.exception, SystemExit)  # no traceback: mapped by the CLI


def test_other_exceptions_keep_their_traceback(run_boom):
    r = run_boom(KeyError("a bug"))
    assert r.exit_code == 1 and isinstance(r.exception, KeyError)


def test_every_error_class_has_a_documented_exit_code():
    for module in (
        "eyecare_edge.bundle",
        "eyecare_edge.vision",
        "eyecare_edge.vision.tensorrt",
        "eyecare_edge.llm",
        "eyecare_edge.images",
        "eyecare_edge.screening",
        "eyecare_edge.grammar",
        "eyecare_edge.bench.loaders",
        "eyecare_edge.clinical.constrained",
        "eyecare_edge.clinical.outputs",
        "eyecare_edge.clinical.protocol",
        "eyecare_edge.serve.errors",
    ):
        importlib.import_module(module)
    seen, todo = set(), [EyecareError]
    while todo:
        cls = todo.pop()
        seen.add(cls)
        todo += [c for c in cls.__subclasses__() if c not in seen]
    assert len(seen) > 15
    assert {c.exit_code for c in seen} <= set(EXIT_CODES), {c: c.exit_code for c in seen}


def test_architecture_exit_code_table_equals_exit_codes():
    text = ARCHITECTURE.read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d) \| ([^|]+?) \|", text, flags=re.M)
    assert {int(code): meaning for code, meaning in rows} == EXIT_CODES


def test_real_commands_report_errors_without_tracebacks(tmp_path):
    """A bundle that is not one (info, doctor, ask) and an image that is not one (inspect)."""
    image = tmp_path / "broken.jpg"
    image.write_text("not an image")
    for args in (
        ["info", str(tmp_path)],
        ["doctor", str(tmp_path)],
        ["ask", str(tmp_path), str(image), "-q", "x"],
    ):
        r = CliRunner().invoke(cli.main, args)
        assert r.exit_code == 1 and r.stderr.startswith("error: "), (args, r.output)
        assert isinstance(r.exception, SystemExit), args
    r = CliRunner().invoke(cli.main, ["inspect", str(image), "--preset", "tiny"])
    assert r.exit_code == 3 and r.stderr.endswith("error: 1 of 1 images failed\n"), r.output
    assert "ERROR" in r.stdout
