"""Clinical outputs without a model: the protocol file, option scoring, JSONL lines -> answers,
DICOM SR (read back with pydicom and highdicom, checked by DCMTK's dsrdump) and FHIR (validated
against fhir.resources' R4B models) for DICOM OP, multi-frame OPT and non-DICOM sources, and
--anonymize. The run with a real bundle is in test_clinical_screen.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from clinical_fixtures import FUNDUS, OP_8BIT, OPT, PATIENT, dsrdump, make_op_dicom, make_opt_dicom

from eyecare_edge.clinical import NO_VALID_ANSWER, ClinicalOutputs, answers_from_records, load_protocol
from eyecare_edge.clinical.anonymize import AnonymizingResults, anonymize_record
from eyecare_edge.clinical.answers import DeviceInfo
from eyecare_edge.clinical.constrained import (
    ConstraintError,
    choose_option,
    option_token_ids,
    score_options,
)
from eyecare_edge.clinical.protocol import ProtocolError, parse_protocol

DEVICE = DeviceInfo("eyecare_gpt tiny", "c0ffee" * 10 + "beef", "ort-cpu int8", "llama.cpp q4_k_m", 405, 1)


@pytest.fixture(scope="module")
def protocol():
    return load_protocol()


def _line(q, frame, *, letter=None, p_options=0.9, answer=None, error=None, sha="ab" * 32, path="x"):
    rec = {"question": q.prompt, "question_id": q.qid, "frame": frame, "answer": answer, "error": error}
    rec.update(image_sha256=sha, path=path)
    if q.kind == "closed" and error is None:
        best = letter or q.options[0].letter
        if p_options >= 0.5:
            opt = q.option(best)
            rec["choice"] = {
                "status": "answered",
                "letter": best,
                "option": opt.text,
                "code": {"scheme": opt.code.scheme, "value": opt.code.value, "meaning": opt.code.meaning},
                "p_best": 0.7,
                "p_options": p_options,
                "min_probability": 0.5,
            }
        else:
            rec["choice"] = {
                "status": NO_VALID_ANSWER,
                "letter": None,
                "p_options": p_options,
                "min_probability": 0.5,
            }
        rec["answer"] = rec["choice"]["letter"]
    return rec


def _lines_for(protocol, frames, sha):
    dr, dme, findings = protocol.questions
    out = []
    for f in frames:
        out += [
            _line(dr, f, letter="C", sha=sha),
            _line(dme, f, p_options=0.2, sha=sha),  # the model did not want either letter
            _line(findings, f, answer="Dot haemorrhages in two quadrants.", sha=sha),
        ]
    return out


# --------------------------------------------------------------------------------- protocol


def test_default_protocol_codes_every_option(protocol):
    dr = protocol.question("dr_grade")
    assert [o.code.value for o in dr.options] == [
        "LA18643-9",
        "LA18644-7",
        "LA18645-4",
        "LA18646-2",
        "LA18648-8",
    ]
    assert all(o.code.scheme == "LN" for o in dr.options)
    assert protocol.system("LN") == "http://loinc.org" and protocol.system("99EYECARE").startswith("urn:")
    assert dr.prompt.splitlines()[1] == "A. No apparent retinopathy"
    assert protocol.question("findings").kind == "text"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["questions"][0]["options"]["A"].pop("code"), "needs a code"),
        (
            lambda d: d["questions"][0]["options"].update({"AB": d["questions"][0]["options"]["A"]}),
            "one capital",
        ),
        (lambda d: d["questions"][0]["concept"].update(scheme="99OTHER"), "no FHIR system"),
        (lambda d: d["questions"][0]["options"]["A"]["code"].update(value="x" * 17), "16 characters"),
        (lambda d: d["questions"].append(dict(d["questions"][0])), "repeat"),
        (lambda d: d.update(min_option_probability=1.5), "min_option_probability"),
        (lambda d: d["questions"][2].update(options={"A": {"text": "a"}}), "no options"),
    ],
)
def test_bad_protocols_are_refused_with_the_entry(change, message):
    from importlib import resources

    import yaml

    data = yaml.safe_load(
        resources.files("eyecare_edge.clinical").joinpath("default_protocol.yaml").read_text()
    )
    change(data)
    with pytest.raises(ProtocolError, match=message) as e:
        parse_protocol(data, "p.yaml")
    assert str(e.value).startswith("p.yaml")


def test_protocol_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("id: [unclosed\n")
    with pytest.raises(ProtocolError, match=str(bad)):
        load_protocol(bad)


# --------------------------------------------------------------------------------- scoring


def test_option_tokens_take_single_token_forms_and_refuse_the_rest():
    vocab = {"A": [5], " A": [9], "B": [6], " B": [6, 1], "C": [7, 8], " C": [7, 8]}
    ids = option_token_ids(lambda t: vocab[t], ["A", "B"])
    assert ids == {"A": [5, 9], "B": [6]}
    with pytest.raises(ConstraintError, match="'C'"):
        option_token_ids(lambda t: vocab[t], ["A", "C"])
    with pytest.raises(ConstraintError, match="share"):
        option_token_ids(lambda t: [5], ["A", "B"])


def test_scores_are_log_probabilities_under_the_whole_vocabulary(protocol):
    logits = np.array([0.0, 2.0, 1.0, 3.0, -1.0], dtype=np.float32)
    s = score_options(logits, {"A": [1, 3], "B": [2]})
    p = np.exp(logits.astype(np.float64)) / np.exp(logits.astype(np.float64)).sum()
    assert s.logprobs["A"] == pytest.approx(np.log(p[1] + p[3]))
    assert s.logprobs["B"] == pytest.approx(np.log(p[2]))
    assert s.p_options == pytest.approx(p[1] + p[2] + p[3])
    assert s.best == "A" and s.p_best == pytest.approx((p[1] + p[3]) / s.p_options)

    dme = protocol.question("macular_edema")
    sure = choose_option(score_options(np.array([0.0, 9.0, 1.0]), {"A": [1], "B": [2]}), dme, 0.5)
    assert sure["status"] == "answered" and sure["code"]["value"] == "373066001"
    # Most mass on a token that is no option: no code at all, not the best of a bad lot.
    unsure = choose_option(score_options(np.array([9.0, 1.0, 0.5]), {"A": [1], "B": [2]}), dme, 0.5)
    assert unsure["status"] == NO_VALID_ANSWER and unsure["code"] is None and unsure["letter"] is None


def test_records_become_answers_with_no_valid_answer_and_errors(protocol):
    dr, dme, findings = protocol.questions
    recs = [
        _line(dr, None, letter="B"),
        _line(dme, None, p_options=0.1),
        _line(findings, None, error="ImageError: broken"),
        {"question": "not in the protocol", "frame": None, "answer": "x", "error": None},
    ]
    a = answers_from_records(recs, protocol)
    assert [x.question.qid for x in a] == ["dr_grade", "macular_edema", "findings"]
    assert a[0].status == "answered" and a[0].option.code.value == "LA18644-7"
    assert a[1].status == NO_VALID_ANSWER and a[1].option is None and "0.1" in a[1].text
    assert a[2].status == NO_VALID_ANSWER and "broken" in a[2].text


# --------------------------------------------------------------------------------- SR + FHIR


def _validate_fhir(path: Path) -> dict:
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.device import Device
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    from fhir.resources.R4B.observation import Observation

    data = json.loads(path.read_text())
    Bundle.model_validate(data)
    models = {"DiagnosticReport": DiagnosticReport, "Observation": Observation, "Device": Device}
    for e in data["entry"]:
        models[e["resource"]["resourceType"]].model_validate(e["resource"])
    return data


def _measurement_report(path: Path):
    """The TID 1500 content of an SR file, parsed by highdicom."""
    import highdicom as hd

    report = hd.sr.srread(path)
    assert isinstance(report, hd.sr.ComprehensiveSR)
    return hd.sr.MeasurementReport.from_sequence(report.content)


def _resources(bundle: dict, kind: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def test_op_dicom_sr_and_fhir(tmp_path, protocol):

    src = make_op_dicom(tmp_path / "op.dcm")
    ds_src = pydicom.dcmread(src)
    out = ClinicalOutputs(protocol, DEVICE, sr_dir=tmp_path / "sr", fhir_dir=tmp_path / "fhir")
    sha = "12" * 32
    w = out.write(src, _lines_for(protocol, [None], sha))
    assert w is not None and w.sr.name == f"{sha[:16]}.sr.dcm"

    text = dsrdump(w.sr)
    assert "Doe^Jane" in text and '(LA18645-4,LN,"Moderate non-proliferative retinopathy")' in text
    assert "no valid answer" in text and "Dot haemorrhages" in text

    sr = pydicom.dcmread(w.sr)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    for k, v in PATIENT.items():
        assert str(sr.get(k)) == v, k  # identifiers carried unchanged
    assert sr.StudyInstanceUID == ds_src.StudyInstanceUID
    ev = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert ev.StudyInstanceUID == ds_src.StudyInstanceUID
    assert ev.ReferencedSeriesSequence[0].SeriesInstanceUID == ds_src.SeriesInstanceUID
    ref = ev.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (OP_8BIT, ds_src.SOPInstanceUID)
    assert sr.PreliminaryFlag == "PRELIMINARY" and "eyecare-edge 0.1.0" in sr.SoftwareVersions

    mr = _measurement_report(w.sr)
    groups = mr.get_image_measurement_groups()
    assert len(groups) == 1
    g = groups[0]
    assert g.source_images[0].referenced_sop_instance_uid == ds_src.SOPInstanceUID
    evals = {e.name.value: e.value.value for e in g.get_qualitative_evaluations()}
    assert evals == {"dr-grade": "LA18645-4"}  # the unanswerable question has no code
    items = g[0].ContentSequence
    text = {code: [i.value for i in items if i.name.value == code] for code in ("111001", "111003", "111002")}
    assert text["111001"] == ["eyecare-edge eyecare_gpt tiny"] and text["111003"] == [
        "0.1.0"
    ]  # name, version
    params = text["111002"]
    assert any(DEVICE.bundle_digest in p for p in params) and any("405" in p for p in params)

    bundle = _validate_fhir(w.fhir)
    (dr,) = _resources(bundle, "DiagnosticReport")
    uid_ref = dr["imagingStudy"][0]["identifier"]
    assert uid_ref == {"system": "urn:dicom:uid", "value": f"urn:oid:{ds_src.StudyInstanceUID}"}
    assert dr["identifier"][0]["value"] == f"urn:oid:{sr.SOPInstanceUID}"
    assert dr["subject"]["identifier"]["value"] == "EYE-0042"
    obs = {o["code"]["coding"][0]["code"]: o for o in _resources(bundle, "Observation")}
    assert obs["dr-grade"]["valueCodeableConcept"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "LA18645-4",
        "display": "Moderate non-proliferative retinopathy",
    }
    assert "valueCodeableConcept" not in obs["dme-signs"] and obs["dme-signs"]["dataAbsentReason"]
    assert obs["findings"]["valueString"] == "Dot haemorrhages in two quadrants."
    assert len(dr["result"]) == 3


def test_multiframe_oct_gives_one_sr_referencing_the_frames_read(tmp_path, protocol):

    src = make_opt_dicom(tmp_path / "oct.dcm")
    ds_src = pydicom.dcmread(src)
    assert int(ds_src.NumberOfFrames) == 3
    out = ClinicalOutputs(protocol, DEVICE, sr_dir=tmp_path / "sr", fhir_dir=tmp_path / "fhir")
    w = out.write(src, _lines_for(protocol, [0, 2], "34" * 32))  # frames 1 and 3 were read
    assert len(list((tmp_path / "sr").iterdir())) == 1
    dsrdump(w.sr)
    mr = _measurement_report(w.sr)
    refs = []
    for g in mr.get_image_measurement_groups():
        (img,) = g.source_images
        assert img.referenced_sop_instance_uid == ds_src.SOPInstanceUID
        assert img.referenced_sop_class_uid == OPT
        refs += list(img.referenced_frame_numbers)
    assert refs == [1, 3]
    bundle = _validate_fhir(w.fhir)
    assert len(_resources(bundle, "Observation")) == 6


def test_non_dicom_gets_new_uids_and_says_so(tmp_path, protocol):
    out = ClinicalOutputs(protocol, DEVICE, sr_dir=tmp_path / "sr", fhir_dir=tmp_path / "fhir")
    w = out.write(FUNDUS, _lines_for(protocol, [None], "56" * 32))
    text = dsrdump(w.sr)
    assert "not DICOM (JPG" in text and "generated by eyecare-edge" in text
    sr = pydicom.dcmread(w.sr)
    assert sr.StudyInstanceUID.startswith("2.25.") and "CurrentRequestedProcedureEvidenceSequence" not in sr
    assert str(sr.PatientID) == ""
    bundle = _validate_fhir(w.fhir)
    (dr,) = _resources(bundle, "DiagnosticReport")
    assert dr["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{sr.StudyInstanceUID}"
    assert "not DICOM" in dr["conclusion"] and "subject" not in dr
    again = ClinicalOutputs(protocol, DEVICE, fhir_dir=tmp_path / "fhir2").write(
        FUNDUS, _lines_for(protocol, [None], "56" * 32)
    )
    assert json.loads(again.fhir.read_text())["entry"][1]["resource"]["imagingStudy"] == dr["imagingStudy"]


def test_anonymize_drops_identifiers_from_sr_fhir_and_jsonl(tmp_path, protocol):
    src = make_op_dicom(tmp_path / "Doe_Jane_EYE-0042.dcm")
    ds_src = pydicom.dcmread(src)
    out = ClinicalOutputs(
        protocol, DEVICE, sr_dir=tmp_path / "sr", fhir_dir=tmp_path / "fhir", anonymize=True
    )
    lines = _lines_for(protocol, [None], "78" * 32)
    lines[2]["error"] = f"OSError: {src}: cannot read"
    lines[2]["answer"] = None
    w = out.write(src, lines)
    blobs = [w.sr.read_bytes(), w.fhir.read_bytes(), dsrdump(w.sr).encode()]
    secrets = [
        *(v for v in PATIENT.values() if len(v) > 1),
        ds_src.StudyInstanceUID,
        ds_src.SeriesInstanceUID,
        ds_src.SOPInstanceUID,
        "Doe_Jane",
    ]
    for blob in blobs:
        for s in secrets:
            assert s.encode() not in blob, s
    sr = pydicom.dcmread(w.sr)
    assert sr.PatientIdentityRemoved == "YES"
    assert all(str(sr.get(k, "")) == "" for k in PATIENT), {k: sr.get(k) for k in PATIENT}
    ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID.startswith("2.25.")  # consistently replaced, still referenced
    _validate_fhir(w.fhir)

    rec = anonymize_record({"id": "x", "path": str(src), "error": f"cannot read {src}", "bundle_digest": "d"})
    assert rec["path"].startswith("anon:") and "Doe_Jane" not in json.dumps(rec)
    res = AnonymizingResults(tmp_path / "r.jsonl", digest="d", resume=False)
    res.append({"id": "1", "path": str(src), "error": None, "bundle_digest": "d"})
    res.close()
    assert "Doe_Jane" not in (tmp_path / "r.jsonl").read_text()


def test_resume_merges_earlier_lines_into_the_sr(tmp_path, protocol):
    src = make_op_dicom(tmp_path / "op.dcm")
    lines = _lines_for(protocol, [None], "9a" * 32)
    out = ClinicalOutputs(protocol, DEVICE, fhir_dir=tmp_path / "fhir", previous={"9a" * 32: lines[:2]})
    w = out.write(src, lines[2:])
    assert [a.question.qid for a in w.answers] == ["dr_grade", "macular_edema", "findings"]
    # Nothing new and the files exist: nothing is rewritten.
    assert out.write(src, []) is None
    # Only errors (the file could not be decoded): no SR/FHIR, the JSONL holds the errors.
    errs = [_line(q, None, error="ImageError: corrupt", sha="bc" * 32) for q in protocol.questions]
    assert ClinicalOutputs(protocol, DEVICE, fhir_dir=tmp_path / "f2").write(src, errs) is None


def test_importing_the_package_does_not_import_highdicom():
    code = (
        "import sys, eyecare_edge.clinical, eyecare_edge.commands.screen; "
        "assert 'highdicom' not in sys.modules and 'fhir' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_run_screen_calls_on_file_once_per_file_and_answer_fn_per_item(tmp_path, protocol):
    """The two hooks `screen` uses, with a stand-in pipeline (the real one runs in
    test_clinical_screen): answer_fn replaces ask and adds its record_fields; on_file gets each
    file's lines once it is done, errors included (a refused file: its one line), and on resume only the new lines."""
    import cv2

    from eyecare_edge.clinical.screen_hook import ScreenClinical
    from eyecare_edge.pipeline import decode_source
    from eyecare_edge.screening import ResultsFile, run_screen

    class Pipe:
        digest = "e" * 64

        def decode(self, source):
            return decode_source(source)

        def ask(self, *a, **k):  # pragma: no cover - must not be called
            raise AssertionError("answer_fn replaces ask")

    class Ans:
        def __init__(self, text):
            self.text, self.n_image_tokens, self.n_prompt_tokens, self.n_generated = text, 1, 2, 0
            self.stop_reason, self.cached_prefix, self.timings = "constrained", False, {}
            self.record_fields = {"choice": {"status": "answered", "letter": "A"}}

    good = tmp_path / "a.png"
    cv2.imwrite(str(good), np.full((16, 16, 3), 90, np.uint8))
    broken = tmp_path / "b.png"
    broken.write_bytes(b"\x89PNG not really")
    questions = ScreenClinical(protocol, None, None, False).questions()
    seen: list[tuple[str, int]] = []
    asked: list[str] = []

    def answer_fn(image, prompt):
        asked.append(prompt)
        return Ans("A")

    def on_file(path, lines):
        seen.append((path.name, len(lines)))

    out = tmp_path / "r.jsonl"
    with ResultsFile(out, digest=Pipe.digest, resume=False) as res:
        run_screen(Pipe(), [good, broken], questions, res, task="protocol", answer_fn=answer_fn, on_file=on_file)
    assert seen == [("a.png", 3), ("b.png", 1)] and asked == [q.prompt for q in questions]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(x["choice"]["letter"] == "A" for x in lines[:3]) and all(x["error"] for x in lines[3:])
    seen.clear()
    with ResultsFile(out, digest=Pipe.digest, resume=True) as res:
        run_screen(Pipe(), [good, broken], questions, res, task="protocol", answer_fn=answer_fn, on_file=on_file)
    assert seen == [("a.png", 0), ("b.png", 0)]
