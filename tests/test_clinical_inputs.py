"""Clinical outputs from the DICOM a clinic really sends, not only the tidy test file: names in
Latin-1, UTF-8 and ISO 2022 (Japanese) character sets, the rest of the Patient module (issuer,
age), data sets without the preamble, big endian, a missing Series Instance UID, a private SOP
class; answers the source's character set cannot hold; --anonymize of all of it; and protocol
files with the mistakes people make (a misspelt key, an unquoted Yes, a repeated option), which
must be refused naming the file, the line and the entry. No model: screen-format lines are made
by hand (as in test_clinical.py)."""

from __future__ import annotations

import json
import re

import pydicom
import pytest
from clinical_fixtures import OP_8BIT, PATIENT, dsrdump, make_op_dicom
from pydicom import uid
from test_clinical import _validate_fhir

from eyecare_edge.clinical import ClinicalOutputs, load_protocol
from eyecare_edge.clinical.anonymize import scrub_paths
from eyecare_edge.clinical.answers import DeviceInfo
from eyecare_edge.clinical.protocol import ProtocolError
from eyecare_edge.clinical.screen_hook import ScreenClinical
from eyecare_edge.clinical.source import read_source

DEVICE = DeviceInfo("eyecare_gpt tiny", "c0ffee" * 10 + "beef", "ort-cpu int8", "llama.cpp q4_k_m", 405, 1)
SIDE = 48  # pixels are not what is tested here
MORE_PATIENT = {"IssuerOfPatientID": "KLINIKUM-X", "PatientAge": "091Y", "PatientWeight": "71.5"}


@pytest.fixture(scope="module")
def protocol():
    return load_protocol()


def _lines(protocol, *, findings: str = "Dot haemorrhages.", sha: str = "ab" * 32) -> list[dict]:
    """Screen lines of one file: DR grade answered B, DME unanswerable, findings as text."""
    dr, dme, fnd = protocol.questions
    opt = dr.option("B")
    answered = {"status": "answered", "letter": "B", "option": opt.text, "p_best": 0.8, "p_options": 0.9}
    unsure = {"status": "no valid answer", "letter": None, "p_options": 0.1, "min_probability": 0.5}
    lines = [
        {"question": dr.prompt, "answer": "B", "choice": answered},
        {"question": dme.prompt, "answer": None, "choice": unsure},
        {"question": fnd.prompt, "answer": findings},
    ]
    return [{**r, "frame": None, "error": None, "image_sha256": sha, "path": "x"} for r in lines]


def _write(tmp_path, protocol, src, **kw):
    lines = _lines(protocol, **({"findings": kw.pop("findings")} if "findings" in kw else {}))
    out = ClinicalOutputs(protocol, DEVICE, sr_dir=tmp_path / "sr", fhir_dir=tmp_path / "fhir", **kw)
    w = out.write(src, lines)
    assert w is not None
    return w, pydicom.dcmread(w.sr), json.loads(w.fhir.read_text())


def _report(bundle: dict) -> dict:
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")


def _referenced(sr) -> tuple[str, str, str]:
    """(series UID, SOP class, SOP instance) the SR's evidence sequence references."""
    series = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    ref = series.ReferencedSOPSequence[0]
    return series.SeriesInstanceUID, ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID


# ------------------------------------------------------------------- patient module, charsets


def test_latin1_names_and_the_whole_patient_module_are_copied_unchanged(tmp_path, protocol):
    attrs = {
        "SpecificCharacterSet": "ISO_IR 100",
        "PatientName": "Müller^Jürgen",
        "ReferringPhysicianName": "Schäfer^Anna",
        **MORE_PATIENT,
    }
    src = make_op_dicom(tmp_path / "op.dcm", side=SIDE, attrs=attrs)
    _w, sr, bundle = _write(tmp_path, protocol, src)
    assert sr.SpecificCharacterSet == "ISO_IR 100"
    for k, v in {**PATIENT, **attrs}.items():
        assert str(sr.get(k)) == v, k
    assert "Müller^Jürgen".encode("latin-1") in _w.sr.read_bytes()  # in the declared set
    text = dsrdump(_w.sr)
    assert "Müller^Jürgen" in text and "Schäfer^Anna" in text and "KLINIKUM-X" in text
    assert _report(bundle)["subject"]["display"] == "Müller Jürgen"
    # the source's ImageLaterality (R) is the finding site of every answer, in the SR and FHIR
    import highdicom as hd

    report = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(_w.sr).content)
    (site,) = report.get_image_measurement_groups()[0].finding_sites
    assert (site.value.value, site.laterality.value) == ("81745001", "24028007")  # Eye, Right
    observations = [e["resource"] for e in _validate_fhir(_w.fhir)["entry"][2:]]
    assert {o["bodySite"]["text"] for o in observations} == {"right eye"}
    # every literal reference in the transaction resolves to one of its entries
    refs = re.findall(r'"reference": "([^"]+)"', _w.fhir.read_text())
    assert len(refs) == 3 + 3 and set(refs) <= {e["fullUrl"] for e in bundle["entry"]}


def test_japanese_iso2022_names_keep_every_component_group(tmp_path, protocol):
    name = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    attrs = {"SpecificCharacterSet": ["", "ISO 2022 IR 87"], "PatientName": name}
    src = make_op_dicom(tmp_path / "jp.dcm", side=SIDE, attrs=attrs)
    w, sr, bundle = _write(tmp_path, protocol, src)
    # The empty first value (the default repertoire) is written as its defined term.
    assert list(sr.SpecificCharacterSet) == ["ISO 2022 IR 6", "ISO 2022 IR 87"]
    assert str(sr.PatientName) == name
    assert b"\x1b$B" in w.sr.read_bytes()  # JIS X 0208 designated by its escape sequence
    # DCMTK built on glibc iconv cannot convert ISO 2022 IR 87 at all (the source neither), so
    # highdicom is the reader here.
    import highdicom as hd

    assert str(hd.sr.srread(w.sr).PatientName) == name
    assert _report(bundle)["subject"]["display"] == "Yamada Tarou"


def test_text_the_source_charset_cannot_hold_switches_the_sr_to_utf8(tmp_path, protocol):
    src = make_op_dicom(tmp_path / "op.dcm", side=SIDE)  # no Specific Character Set: ASCII
    w, sr, _bundle = _write(tmp_path, protocol, src, findings="Ödem der Makula, ∅ 2 mm")
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    texts: list[str] = []
    sr.walk(lambda _ds, elem: texts.append(elem.value) if elem.keyword == "TextValue" else None)
    assert "Ödem der Makula, ∅ 2 mm" in texts
    assert str(sr.PatientName) == PATIENT["PatientName"]
    assert "Ödem der Makula" in dsrdump(w.sr)


# ------------------------------------------------------------------- unusual DICOM files


@pytest.mark.parametrize(
    "how",
    [
        {"bare": True},  # no preamble, no file meta: what images.py decodes, so must the SR
        {"transfer_syntax": uid.ExplicitVRBigEndian},
        {"transfer_syntax": uid.ImplicitVRLittleEndian},
    ],
    ids=["bare", "big-endian", "implicit"],
)
def test_every_dicom_encoding_the_decoder_reads_keeps_its_identity(tmp_path, protocol, how):
    src = make_op_dicom(tmp_path / "op.dcm", side=SIDE, **how)
    ds = pydicom.dcmread(src, force=True)
    info = read_source(src)
    assert info.is_dicom and info.identifier("PatientID") == PATIENT["PatientID"] and not info.generated
    _w, sr, _bundle = _write(tmp_path, protocol, src)
    assert str(sr.PatientName) == PATIENT["PatientName"] and sr.StudyInstanceUID == ds.StudyInstanceUID
    assert _referenced(sr) == (ds.SeriesInstanceUID, OP_8BIT, ds.SOPInstanceUID)


def test_missing_series_uid_keeps_the_patient_and_generates_only_that_uid(tmp_path, protocol):
    src = make_op_dicom(tmp_path / "op.dcm", side=SIDE, attrs={"SeriesInstanceUID": None})
    ds = pydicom.dcmread(src)
    w, sr, bundle = _write(tmp_path, protocol, src)
    assert str(sr.PatientID) == PATIENT["PatientID"] and sr.StudyInstanceUID == ds.StudyInstanceUID
    series, sop_class, sop = _referenced(sr)
    assert (sop_class, sop) == (OP_8BIT, ds.SOPInstanceUID) and series.startswith("2.25.")
    text = dsrdump(w.sr)
    assert "has no SeriesInstanceUID" in text and "generated by eyecare-edge" in text
    assert _report(bundle)["subject"]["identifier"]["value"] == PATIENT["PatientID"]


def test_missing_sop_instance_uid_references_nothing_but_keeps_the_patient(tmp_path, protocol):
    src = make_op_dicom(tmp_path / "op.dcm", side=SIDE, attrs={"SOPInstanceUID": None})
    _w, sr, _bundle = _write(tmp_path, protocol, src)
    assert str(sr.PatientName) == PATIENT["PatientName"]
    assert "CurrentRequestedProcedureEvidenceSequence" not in sr


def test_a_sop_class_highdicom_does_not_know_is_still_referenced_as_itself(tmp_path, protocol):
    private = "1.2.826.0.1.3680043.8.498.1.77"  # a vendor's private image storage class
    src = make_op_dicom(tmp_path / "op.dcm", side=SIDE, attrs={"SOPClassUID": private, **MORE_PATIENT})
    ds = pydicom.dcmread(src)
    w, sr, _bundle = _write(tmp_path, protocol, src)
    assert _referenced(sr) == (ds.SeriesInstanceUID, private, ds.SOPInstanceUID)
    assert str(sr.PatientName) == PATIENT["PatientName"] and sr.IssuerOfPatientID == "KLINIKUM-X"
    # dsrdump refuses an IMAGE item of a class it does not know to be an image; highdicom reads it.
    import highdicom as hd

    groups = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(w.sr).content).get_image_measurement_groups()
    (img,) = groups[0].source_images
    assert (img.referenced_sop_class_uid, img.referenced_sop_instance_uid) == (private, ds.SOPInstanceUID)


# ------------------------------------------------------------------- --anonymize


def test_anonymize_drops_the_rest_of_the_patient_module_too(tmp_path, protocol):
    attrs = {"SpecificCharacterSet": "ISO_IR 100", "PatientName": "Müller^Jürgen", **MORE_PATIENT}
    attrs["InstitutionName"] = "Augenklinik Köln"
    src = make_op_dicom(tmp_path / "Mueller_Juergen.dcm", side=SIDE, attrs=attrs)
    w, sr, bundle = _write(tmp_path, protocol, src, anonymize=True)
    blob = w.sr.read_bytes() + w.fhir.read_bytes()
    for secret in ["Müller", "M\xfcller", "KLINIKUM-X", "091Y", "Köln", "Mueller", *PATIENT.values()]:
        if len(secret) > 1:
            assert secret.encode("utf-8") not in blob and secret.encode("latin-1") not in blob, secret
    assert sr.PatientIdentityRemoved == "YES" and "subject" not in _report(bundle)


def test_scrub_paths_hides_every_form_of_every_file(tmp_path):
    a, b = tmp_path / "in" / "Mueller_Juergen.dcm", tmp_path / "in" / "Doe_Jane.jpg"
    line = f"in/Mueller_Juergen.dcm: broken; {a}: broken; Doe_Jane.jpg: broken"
    out = scrub_paths(line, [str(a), str(b), "in/Mueller_Juergen.dcm"])
    assert "Mueller" not in out and "Doe_Jane" not in out and out.count("anon:") == 3
    assert out.endswith(": broken") and out.startswith("anon:")
    # a short name is replaced where it stands alone, not inside other words or names
    assert scrub_paths("a.jpg: bad; data.jpg: ok; a.jpgx", ["a.jpg"]).split(";")[1:] == [
        " data.jpg: ok",
        " a.jpgx",
    ]


def test_screen_hook_failures_are_reported_anonymized_and_undecodable_files_are_skipped(tmp_path, protocol):
    hook = ScreenClinical(protocol, tmp_path / "sr", tmp_path / "fhir", anonymize=True)
    hook.outputs = ClinicalOutputs(
        protocol, DEVICE, sr_dir=hook.sr_dir, fhir_dir=hook.fhir_dir, anonymize=True
    )
    # Did not decode (garbage after the DICM magic): its error lines are the report, no SR and no
    # second error for the header the SR writer cannot parse either.
    bad = tmp_path / "Doe_Jane_broken.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    hook.on_file(
        bad,
        [{**r, "error": f"{bad}: corrupt DICOM", "choice": None} for r in _lines(protocol, sha="cd" * 32)],
    )
    assert hook.failures == [] and not list(hook.sr_dir.iterdir())
    # Decoded, but the SR cannot be written (its name is taken by a folder): reported, no names.
    src = make_op_dicom(tmp_path / "Doe_Jane.dcm", side=SIDE)
    (hook.sr_dir / f"{'ab' * 8}.sr.dcm").mkdir()
    hook.on_file(src, _lines(protocol))
    (failure,) = hook.failures
    assert failure.startswith("anon:") and "SR/FHIR not written" in failure and "Doe" not in failure


# ------------------------------------------------------------------- protocol files

_PROTOCOL = """\
id: p
min_option_probability: 0.5
questions:
  - id: dme
    question: Macular edema?
    concept: {scheme: SCT, value: "1234", meaning: DME}
    options:
      A: {text: "Yes", code: {scheme: SCT, value: "373066001", meaning: "Yes"}}
      B: {text: "No", code: {scheme: SCT, value: "373067005", meaning: "No"}}
"""


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        # a misspelt threshold was ignored and 0.5 used without a word
        ("min_option_probability", "min_option_probabilty", r":2: unknown key\(s\) 'min_option_probabilty'"),
        ('A: {text: "Yes"', "A: {text: Yes", r":8: questions\[0\] \(dme\)\.A: 'text' .*got True.*quote it"),
        ('value: "373066001"', "value: 373066001", r":8: questions\[0\] \(dme\)\.A\.code: 'value' .*number"),
        ("      B: {", "      A: {", r":9: key 'A' repeats"),  # PyYAML kept the second A silently
        ("    concept:", "    conept:", r":6: questions\[0\] \(dme\): unknown key\(s\) 'conept'"),
        ("      A: {text", "     A: {text", r":9: invalid YAML"),
    ],
    ids=["typo-key", "unquoted-yes", "numeric-code", "repeated-option", "typo-concept", "indent"],
)
def test_protocol_mistakes_name_the_file_line_and_entry(tmp_path, old, new, message):
    good = tmp_path / "good.yaml"
    good.write_text(_PROTOCOL)
    assert load_protocol(good).question("dme").option("A").code.value == "373066001"
    bad = tmp_path / "bad.yaml"
    assert old in _PROTOCOL
    bad.write_text(_PROTOCOL.replace(old, new, 1))
    with pytest.raises(ProtocolError, match=f"^{bad}{message}"):
        load_protocol(bad)
