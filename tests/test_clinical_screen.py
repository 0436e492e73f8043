"""Clinical outputs from a real (tiny) bundle: `Pipeline.next_token_logits` is what greedy `ask`
samples from, option scoring on it, and `screen --protocol --sr-dir --fhir-dir [--anonymize]`
over a DICOM fundus photo (OP), a multi-frame OCT (OPT) and a JPEG, each SR passing dsrdump."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from click.testing import CliRunner
from clinical_fixtures import FUNDUS, OP_8BIT, PATIENT, dsrdump, make_op_dicom, make_opt_dicom
from runtime_fixtures import FAST, runtime_assets

from eyecare_edge.cli import main
from eyecare_edge.clinical import NO_VALID_ANSWER, ProtocolAnswerer, load_protocol
from eyecare_edge.clinical.protocol import parse_protocol
from eyecare_edge.pipeline import Pipeline

FAST_CLI = [
    "--threads",
    "1",
    "--vision-threads",
    "1",
    "--no-progress",
    "--llm",
    "f32",
    "--vision-precision",
    "fp32",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return runtime_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(assets):
    with Pipeline.load(assets.bundle, llm="f32", vision_precision="fp32", **FAST) as p:
        yield p


def _protocol_file(path: Path, min_p: float) -> Path:
    from importlib import resources

    data = yaml.safe_load(
        resources.files("eyecare_edge.clinical").joinpath("default_protocol.yaml").read_text()
    )
    data["min_option_probability"] = min_p
    path.write_text(yaml.safe_dump(data))
    return path


def test_next_token_logits_are_what_greedy_ask_samples_from(pipe, assets):
    image = assets.images[0]
    prompt = load_protocol().question("dr_grade").prompt
    logits, first = pipe.next_token_logits(image, prompt)
    assert logits.shape == (pipe.lm.n_vocab,) and first.n_generated <= 1
    top = int(np.argmax(logits))
    answer = pipe.ask(image, prompt, max_tokens=1)
    assert answer.cached_prefix  # the image prefix was kept
    expected = "" if pipe.lm.is_eog(top) else pipe.lm.token_to_piece(top).decode("utf-8", "replace").strip()
    assert answer.text == expected
    again, second = pipe.next_token_logits(image, prompt)
    assert second.cached_prefix and np.allclose(again, logits, atol=1e-4)


def test_protocol_answers_are_an_option_or_no_valid_answer(pipe, assets):
    image = pipe.decode(assets.images[1])[0]
    base = load_protocol()
    q = base.question("dr_grade")
    lenient = ProtocolAnswerer(pipe, parse_protocol({**_raw(), "min_option_probability": 0.0}, "p"))
    a = lenient(image, q.prompt)
    choice = a.choice
    assert choice["status"] == "answered" and a.text in {o.letter for o in q.options}
    assert choice["code"]["value"] == q.option(a.text).code.value
    lp = choice["logprobs"]
    assert set(lp) == set("ABCDE") and 0 < choice["p_options"] <= 1.0001
    assert choice["letter"] == max(lp, key=lp.get)
    # A threshold above what the model put on the letters: no code, never the best guess.
    strict = ProtocolAnswerer(
        pipe,
        parse_protocol({**_raw(), "min_option_probability": min(0.999, choice["p_options"] + 1e-3)}, "p"),
    )
    b = strict(image, q.prompt)
    assert b.text is None and b.choice["status"] == NO_VALID_ANSWER and b.choice["code"] is None
    # Free-text questions are asked as usual.
    t = lenient(image, base.question("findings").prompt)
    assert isinstance(t.text, str) and not hasattr(t, "choice")


def _raw() -> dict:
    from importlib import resources

    return yaml.safe_load(
        resources.files("eyecare_edge.clinical").joinpath("default_protocol.yaml").read_text()
    )


def test_screen_writes_sr_and_fhir_per_file(assets, tmp_path):
    op = make_op_dicom(tmp_path / "op.dcm")
    oct_ = make_opt_dicom(tmp_path / "oct.dcm")
    proto = _protocol_file(tmp_path / "p.yaml", 0.0)
    out = tmp_path / "r.jsonl"
    args = ["screen", str(assets.bundle), str(op), str(oct_), str(FUNDUS), "-o", str(out)]
    args += ["--protocol", str(proto), "--sr-dir", str(tmp_path / "sr"), "--fhir-dir", str(tmp_path / "fhir")]
    r = CliRunner().invoke(main, [*args, "--max-tokens", "6", *FAST_CLI])
    assert r.exit_code == 0, r.output
    assert "3 file(s) written" in r.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 3 * 3 + 3 + 3 and all(x["task"] == "protocol" for x in lines)
    closed = [x for x in lines if x["question_id"] in ("dr_grade", "macular_edema")]
    assert all(x["choice"]["status"] == "answered" for x in closed)

    protocol = load_protocol(proto)
    codes = {o.code.value for q in protocol.questions for o in q.options}
    srs = sorted((tmp_path / "sr").iterdir())
    assert len(srs) == 3 and len(list((tmp_path / "fhir").iterdir())) == 3
    for f in srs:
        text = dsrdump(f)
        assert "Findings" in text
        coded = [ln for ln in text.splitlines() if "<contains CODE:" in ln]
        assert coded and all(any(c in ln for c in codes) for ln in coded)
    src = pydicom.dcmread(op)
    op_sr = next(
        pydicom.dcmread(f) for f in srs if pydicom.dcmread(f).StudyInstanceUID == src.StudyInstanceUID
    )
    ref = (
        op_sr.CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
    )
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (OP_8BIT, src.SOPInstanceUID)
    assert op_sr.PatientName == PATIENT["PatientName"]
    oct_src = pydicom.dcmread(oct_)
    oct_sr = next(
        pydicom.dcmread(f) for f in srs if pydicom.dcmread(f).StudyInstanceUID == oct_src.StudyInstanceUID
    )
    frames = [
        int(i.ReferencedSOPSequence[0].ReferencedFrameNumber)
        for g in oct_sr.ContentSequence[-1].ContentSequence
        for i in g.ContentSequence
        if i.ValueType == "IMAGE"
    ]
    assert frames == [1, 2, 3]

    from fhir.resources.R4B.bundle import Bundle

    for f in (tmp_path / "fhir").iterdir():
        Bundle.model_validate(json.loads(f.read_text()))

    # Resumed with nothing left to do: no line or file twice, SRs kept.
    r = CliRunner().invoke(main, [*args, "--resume", *FAST_CLI])
    assert r.exit_code == 0, r.output
    assert len(out.read_text().splitlines()) == len(lines) and len(list((tmp_path / "sr").iterdir())) == 3


def test_screen_anonymize_and_usage(assets, tmp_path):
    op = make_op_dicom(tmp_path / "Doe_Jane.dcm")
    out = tmp_path / "r.jsonl"
    args = ["screen", str(assets.bundle), str(op), "-o", str(out), "--fhir-dir", str(tmp_path / "fhir")]
    run = CliRunner().invoke
    r = run(main, [*args, "-q", "What?", *FAST_CLI])
    assert r.exit_code == 2 and "protocol" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: x\nquestions: []\n")
    r = run(main, [*args, "--protocol", str(bad), *FAST_CLI])
    assert r.exit_code == 2 and "bad.yaml" in r.output

    # A file that cannot be decoded: its error lines (JSONL and stderr) must not name it either.
    broken = tmp_path / "Doe_Jane_EYE-0042.dcm"
    broken.write_bytes(op.read_bytes()[:3000])
    args[3:3] = [str(broken)]
    r = run(main, [*args, "--sr-dir", str(tmp_path / "sr"), "--anonymize", "--max-tokens", "4", *FAST_CLI])
    assert r.exit_code == 3, r.output
    assert "error: anon:" in r.output and "Doe" not in r.output and "EYE-0042" not in r.output
    written = [out.read_text(), *(f.read_text() for f in (tmp_path / "fhir").iterdir())]
    written += [dsrdump(f) for f in (tmp_path / "sr").iterdir()]
    src = pydicom.dcmread(op)
    for blob in written:
        for secret in ("Doe", "EYE-0042", "ACC-7781", "19580312", src.StudyInstanceUID, src.SOPInstanceUID):
            assert secret not in blob
    # With the closed answers under the default threshold the tiny model may or may not answer;
    # either way every closed line is an option or "no valid answer".
    for line in map(json.loads, out.read_text().splitlines()):
        if line["question_id"] != "findings" and line["error"] is None:
            assert line["choice"]["status"] in ("answered", NO_VALID_ANSWER)
        assert line["path"].startswith("anon:") and "Doe" not in (line["error"] or "")


def test_screen_sr_without_highdicom_says_how_to_install(assets, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom -> ImportError
    args = [
        "screen",
        str(assets.bundle),
        str(FUNDUS),
        "-o",
        str(tmp_path / "r.jsonl"),
        "--sr-dir",
        str(tmp_path),
    ]
    r = CliRunner().invoke(main, [*args, *FAST_CLI])
    assert r.exit_code == 1 and "eyecare-edge[clinical]" in r.stderr


def test_one_call_per_request_from_uploaded_bytes(pipe, tmp_path):
    """What a server calls per answered request: DICOM bytes in, SR + FHIR out."""
    from eyecare_edge.clinical import file_clinical_results

    data = make_op_dicom(tmp_path / "op.dcm").read_bytes()
    w = file_clinical_results(
        pipe, data, load_protocol(), sr_dir=tmp_path / "sr", fhir_dir=tmp_path / "fhir", max_tokens=4
    )
    assert w is not None and [a.question.qid for a in w.answers] == ["dr_grade", "macular_edema", "findings"]
    assert "Doe^Jane" in dsrdump(w.sr)
    src = pydicom.dcmread(tmp_path / "op.dcm")
    assert pydicom.dcmread(w.sr).StudyInstanceUID == src.StudyInstanceUID

    from fhir.resources.R4B.bundle import Bundle

    Bundle.model_validate(json.loads(w.fhir.read_text()))
