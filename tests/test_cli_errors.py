"""One error base: a command raising an `EyecareError` exits with its code and prints `error: …`."""

from __future__ import annotations

import ast
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


# Exceptions that are control flow inside one room, never shown to a user (the server turns
# them into HTTP answers); every other exception class the project defines is an EyecareError.
CONTROL_FLOW = {"eyecare_edge.serve.limits.RequestTimeout", "eyecare_edge.serve.limits.Cancelled"}


def _defined_exception_classes() -> list[str]:
    """module.Class of every class in the project's source whose bases name an Error/Exception."""
    from test_import_graph import project_modules

    found = []
    for module, path in sorted(project_modules().items()):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(
                re.search(r"(Error|Exception|Failed|Missing)$", ast.unparse(b)) for b in node.bases
            ):
                found.append(f"{module}.{node.name}")
    return found


def test_every_error_class_derives_from_the_base_and_has_a_documented_exit_code():
    names = _defined_exception_classes()
    assert len(names) > 25, names
    for name in names:
        module, cls_name = name.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), cls_name)
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            continue
        if name in CONTROL_FLOW:
            assert not issubclass(cls, EyecareError), name
            continue
        assert issubclass(cls, EyecareError), f"{name} does not derive from EyecareError"
        assert cls.exit_code in EXIT_CODES, (name, cls.exit_code)


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
