"""`POST /v1/screen` as a clinic integrator uses it: a real `eyecare-edge serve` process (uvicorn on
loopback, API key, allowed media dir, --sr-dir/--fhir-dir, two protocols) on the trained tiny
bundle, called over raw HTTP.

A DICOM OP photo posted -> answers with the protocol's codes (the same as `answer_protocol` in
this process), an SR that `dsrdump` prints without warnings and that references the source's UIDs,
a FHIR Bundle that validates against the R4B models; the raw application/dicom form; a multi-frame
OCT by allowed local path; a request asking for anonymization; bad requests -> 4xx JSON; /metrics;
nothing identifying in the responses or the server's log.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from importlib import resources
from pathlib import Path

import pydicom
import pytest
import yaml

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("highdicom")

from click.testing import CliRunner
from clinical_fixtures import PATIENT, dsrdump, make_op_dicom, make_opt_dicom
from runtime_fixtures import FAST, runtime_assets
from test_serve import _get, _post, _start_server

from eyecare_edge.cli import main
from eyecare_edge.clinical import answer_protocol, load_protocol
from eyecare_edge.pipeline import Pipeline

KEY = "screen-key-0123456789"
MAX_TOKENS = 6
P0 = "dr-p0"  # the packaged protocol with min_option_probability 0: every closed answer gets a code
DEFAULT_ID = "eyecare-dr-screening"
DEFAULT_YAML = resources.files("eyecare_edge.clinical").joinpath("default_protocol.yaml")
IDENTIFIERS = [v for k, v in PATIENT.items() if k != "PatientSex"] + ["Doe Jane"]


def _protocol_p0(path: Path) -> Path:
    data = yaml.safe_load(DEFAULT_YAML.read_text())
    data["id"], data["min_option_probability"] = P0, 0.0
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return runtime_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screen-serve")


@pytest.fixture(scope="module")
def media_dir(assets, out) -> Path:
    d = out / "media"
    d.mkdir()
    make_opt_dicom(d / "oct.dcm")
    shutil.copy(assets.images[0], d / "photo.png")
    return d


@pytest.fixture(scope="module")
def server(assets, out, media_dir):
    srv = _start_server(
        assets.bundle, out / "server.log",
        "--workers", "1", "--queue", "2", "--api-key", KEY, "--allowed-media-dir", str(media_dir),
        "--max-body-mb", "2", "--sr-dir", str(out / "sr"), "--fhir-dir", str(out / "fhir"),
        "--protocol", str(_protocol_p0(out / "p0.yaml")), "--protocol", str(DEFAULT_YAML),
        "--llm", "f32", "--vision-precision", "fp32", "--threads", "1", "--vision-threads", "1",
        "--log-level", "info",
    )  # fmt: skip
    yield srv
    srv.proc.terminate()
    try:
        srv.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
    log = srv.log.read_text()
    assert srv.proc.returncode in (0, -15) and "Traceback" not in log, log
    leaked = [v for v in IDENTIFIERS if v in log]
    assert not leaked, f"identifiers in the server log: {leaked}\n{log}"


@pytest.fixture(scope="module")
def pipe(assets):
    with Pipeline.load(assets.bundle, llm="f32", vision_precision="fp32", **FAST) as p:
        yield p


def _screen(server, body: dict | bytes, ctype: str = "application/json", query: str = "", key: str = KEY):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": ctype, "Authorization": f"Bearer {key}"}
    return _post(server.base + "/v1/screen" + query, data, headers)


def _data_uri(data: bytes, mime: str = "application/dicom") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


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


def _resource(bundle: dict, kind: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def _referenced_sop_instances(sr: pydicom.Dataset) -> list[str]:
    return [
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    ]


def test_dicom_op_posted_is_answered_with_codes_and_filed_as_sr_and_fhir(server, pipe, out):
    src_path = make_op_dicom(out / "op.dcm")
    data = src_path.read_bytes()
    src = pydicom.dcmread(src_path)
    status, _, body = _screen(server, {"image": _data_uri(data), "max_tokens": MAX_TOKENS})
    assert status == 200, body

    # The answers are the protocol's, constrained: exactly what answer_protocol gives in process.
    p0 = load_protocol(out / "p0.yaml")
    expected = answer_protocol(pipe, data, p0, max_tokens=MAX_TOKENS)
    answers = body["answers"]
    assert [a["question_id"] for a in answers] == ["dr_grade", "macular_edema", "findings"]
    for a, line in zip(answers, expected, strict=True):
        if a["kind"] == "closed":
            assert a["status"] == "answered" and a["option"]["letter"] == line["choice"]["letter"]
            option = p0.question(a["question_id"]).option(a["option"]["letter"])
            assert (a["code"]["scheme"], a["code"]["code"]) == (option.code.scheme, option.code.value)
        elif line["answer"].strip():
            assert a["status"] == "text" and a["text"] == line["answer"].strip()
        else:
            assert a["status"] == "no valid answer"
    assert body["protocol"]["id"] == P0 and body["anonymized"] is False
    assert body["source"]["dicom"] is True and body["source"]["sop_instance_uid"] == src.SOPInstanceUID
    assert body["usage"]["evaluations"] == 3 and body["usage"]["visual_tokens"] > 0
    assert not [v for v in IDENTIFIERS if v in json.dumps(body)], "identifiers in the response"

    # The SR: dsrdump-clean, with the codes, referencing the source study/series/instance.
    sr_path = out / "sr" / body["files"]["sr"]["file"]
    assert sr_path.parent == out / "sr" / P0  # several protocols: a folder per protocol id
    text = dsrdump(sr_path)
    assert "Doe^Jane" in text  # carried unchanged into the file the clinic asked for
    for a in answers[:2]:
        assert f"({a['code']['code']},{a['code']['scheme']}," in text
    sr = pydicom.dcmread(sr_path)
    assert sr.SOPInstanceUID == body["files"]["sr"]["sop_instance_uid"]
    assert (sr.StudyInstanceUID, sr.PatientID) == (src.StudyInstanceUID, src.PatientID)
    assert _referenced_sop_instances(sr) == [src.SOPInstanceUID]
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID == (
        src.SeriesInstanceUID
    )

    # FHIR: validates, references the same study and the SR.
    bundle = _validate_fhir(out / "fhir" / body["files"]["fhir"]["file"])
    (report,) = _resource(bundle, "DiagnosticReport")
    assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{src.StudyInstanceUID}"
    assert report["identifier"][0]["value"] == f"urn:oid:{sr.SOPInstanceUID}"
    codes = [o["valueCodeableConcept"]["coding"][0]["code"] for o in _resource(bundle, "Observation")[:2]]
    assert codes == [a["code"]["code"] for a in answers[:2]]

    # The same file as a raw application/dicom body, with the default protocol (threshold 0.5):
    # each closed answer is what the protocol gives in process, a code only above the threshold.
    status, _, raw = _screen(server, data, "application/dicom", f"?protocol={DEFAULT_ID}&max_tokens=4")
    assert status == 200, raw
    default = load_protocol(None)  # the packaged protocol the server serves as DEFAULT_ID
    in_process = answer_protocol(pipe, data, default, max_tokens=4)[:2]
    assert [a["status"] for a in raw["answers"][:2]] == [x["choice"]["status"] for x in in_process]
    assert raw["files"]["sr"]["file"].startswith(f"{DEFAULT_ID}/")
    assert raw["usage"]["cached_image_prefixes"] >= 1  # the photo's prefix from the first request
    dsrdump(out / "sr" / raw["files"]["sr"]["file"])
    observations = _resource(_validate_fhir(out / "fhir" / raw["files"]["fhir"]["file"]), "Observation")
    for a, obs in zip(raw["answers"][:2], observations, strict=False):
        if a["status"] == "answered":
            assert obs["valueCodeableConcept"]["coding"][0]["code"] == a["code"]["code"]
        else:  # no code is guessed below the threshold
            assert a["code"] is None and obs["dataAbsentReason"]["coding"][0]["code"] == "unknown"
            assert "valueCodeableConcept" not in obs


def test_multiframe_oct_and_png_by_local_path(server, out, media_dir):
    status, _, body = _screen(server, {"image": "oct.dcm", "max_tokens": 2, "protocol": P0})
    assert status == 200, body
    assert [a["frame"] for a in body["answers"]] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert body["source"]["frames"] == 3
    sr_path = out / "sr" / body["files"]["sr"]["file"]
    dsrdump(sr_path)
    oct_uid = pydicom.dcmread(media_dir / "oct.dcm").SOPInstanceUID
    assert _referenced_sop_instances(pydicom.dcmread(sr_path)) == [oct_uid]

    status, _, png = _screen(server, {"image": f"file://{media_dir / 'photo.png'}", "max_tokens": 2})
    assert status == 200, png
    assert png["source"]["dicom"] is False and png["source"]["uids"].startswith("generated")
    assert png["source"]["format"] == "PNG"
    assert "was not DICOM (PNG" in dsrdump(out / "sr" / png["files"]["sr"]["file"])
    _validate_fhir(out / "fhir" / png["files"]["fhir"]["file"])


def test_a_request_can_ask_for_anonymized_outputs(server, out):
    src_path = make_op_dicom(out / "op-anon.dcm", side=300)
    src = pydicom.dcmread(src_path)
    status, _, body = _screen(
        server, {"image": _data_uri(src_path.read_bytes()), "max_tokens": 2, "anonymize": True}
    )
    assert status == 200, body
    assert body["anonymized"] is True
    originals = [src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID]
    assert body["source"]["study_instance_uid"] not in originals
    sr_path = out / "sr" / body["files"]["sr"]["file"]
    fhir_path = out / "fhir" / body["files"]["fhir"]["file"]
    blobs = {
        "response": json.dumps(body),
        "sr": sr_path.read_bytes().decode("latin-1"),
        "dsrdump": dsrdump(sr_path),
        "fhir": fhir_path.read_text(),
    }
    for where, blob in blobs.items():
        leaked = [v for v in IDENTIFIERS + originals if v in blob]
        assert not leaked, f"{where} holds {leaked}"
    sr = pydicom.dcmread(sr_path)
    assert sr.PatientIdentityRemoved == "YES" and sr.StudyInstanceUID == body["source"]["study_instance_uid"]
    _validate_fhir(fhir_path)


def test_bad_screen_requests_get_4xx_json_and_nothing_is_filed(server, out):
    def files() -> list[Path]:
        return sorted(p for d in (out / "sr", out / "fhir") for p in d.rglob("*") if p.is_file())

    before = files()
    dicom_sr = next((out / "sr").rglob("*.sr.dcm")).read_bytes()  # a DICOM without pixels
    cases = [
        ("unknown protocol", {"image": _data_uri(b"x"), "protocol": "nope"}, "application/json", "", 404, "nope"),
        ("protocol not a string", {"image": "photo.png", "protocol": {"id": 1}}, "application/json", "", 400,
         "protocol id"),
        ("not an image", {"image": _data_uri(b"hello, not an image", "image/png")}, "application/json", "", 400,
         "not usable"),
        ("a DICOM without pixels", {"image": _data_uri(dicom_sr)}, "application/json", "", 400, "not usable"),
        ("raw body not an image", b"\x00" * 300, "application/dicom", "", 400, "not usable"),
        ("empty raw body", b"", "application/dicom", "", 400, "empty"),
        ("no image", {"max_tokens": 3}, "application/json", "", 400, "'image' is required"),
        ("unknown field", {"image": "photo.png", "question": "x"}, "application/json", "", 400, "unknown field"),
        ("bad max_tokens", {"image": "photo.png", "max_tokens": 0}, "application/json", "", 400, "max_tokens"),
        ("bad anonymize", {"image": "photo.png", "anonymize": "yes"}, "application/json", "", 400, "anonymize"),
        ("unknown query", b"DICM", "application/dicom", "?foo=1", 400, "unknown query"),
        ("other model", {"image": "photo.png", "model": "gpt-4"}, "application/json", "", 404, "gpt-4"),
        ("outside the media dir", {"image": "/etc/passwd"}, "application/json", "", 403, "outside"),
        ("dot-dot", {"image": "../p0.yaml"}, "application/json", "", 403, ".."),
        ("remote URL", {"image": "https://example.com/a.jpg"}, "application/json", "", 400, "remote"),
        ("not JSON", b"{", "application/json", "", 400, "not valid JSON"),
        ("NaN max_tokens", b'{"image": "photo.png", "max_tokens": NaN}', "application/json", "", 400, "NaN"),
        ("nested too deeply", b"[" * 100_000 + b"]" * 100_000, "application/json", "", 400, "nested"),
        ("text/plain", b"{}", "text/plain", "", 415, "Content-Type"),
        ("over the body limit", b"\x00" * (3 << 20), "application/dicom", "", 413, "larger"),
    ]  # fmt: skip
    for what, body, ctype, query, code, phrase in cases:
        status, _, err = _screen(server, body, ctype, query)
        assert status == code, (what, status, err)
        assert phrase in err["error"]["message"], (what, err)
        assert server.health() == 200, what
    status, headers, err = _screen(server, {"image": "photo.png"}, key="wrong-key-123")
    assert status == 401 and headers.get("www-authenticate") == "Bearer", err
    assert files() == before and not list(out.glob("**/*.tmp"))

    status, raw = _get(server.base + "/v1/protocols", KEY)
    listing = json.loads(raw)
    assert status == 200 and [p["id"] for p in listing["data"]] == [P0, DEFAULT_ID]
    assert listing["data"][0]["default"] and listing["filing"] == {
        "sr": True,
        "fhir": True,
        "anonymize": False,
    }
    dr = listing["data"][0]["questions"][0]
    assert dr["options"][0]["code"] == {
        "system": "http://loinc.org", "scheme": "LN", "code": "LA18643-9", "display": "No apparent retinopathy",
    }  # fmt: skip

    status, raw = _get(server.base + "/metrics", KEY)
    metrics = raw.decode()
    assert status == 200
    for line in (
        'eyecare_requests_total{path="/v1/screen",code="404"} 2',
        'eyecare_requests_total{path="/v1/screen",code="413"} 1',
        'eyecare_requests_total{path="/v1/screen",code="200"} 5',
        "eyecare_screenings_total 5",
        'eyecare_filed_total{kind="sr"} 5',
        'eyecare_filed_total{kind="fhir"} 5',
        'eyecare_screen_answers_total{status="answered"}',
        "eyecare_screen_duration_seconds_count 5",
    ):
        assert line in metrics, line


def test_startup_refusals(assets, tmp_path):
    def run(*args: str):
        return CliRunner().invoke(main, ["serve", str(assets.bundle), "--port", "0", *args])

    bad = tmp_path / "bad.yaml"
    bad.write_text("id: x\nquestions:\n  - id: q\n    kind: closed\n    question: Q?\n")
    r = run("--protocol", str(bad))
    assert r.exit_code == 2 and "bad.yaml" in r.output and "concept" in r.output, r.output
    r = run("--protocol", str(DEFAULT_YAML), "--protocol", str(DEFAULT_YAML))
    assert r.exit_code == 2 and "already used" in r.output, r.output
    spaced = tmp_path / "spaced.yaml"
    data = yaml.safe_load(DEFAULT_YAML.read_text())
    data["id"] = "has space"
    spaced.write_text(yaml.safe_dump(data))
    r = run("--protocol", str(spaced), "--protocol", str(DEFAULT_YAML))
    assert r.exit_code == 2 and "names a folder" in r.output, r.output
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run("--sr-dir", str(blocker / "sr"))
    assert r.exit_code == 1 and "cannot create the output folder" in r.output, r.output


def test_the_deadline_is_checked_before_every_question(pipe, assets):
    """A request whose time is up stops before the next evaluation (RequestTimeout -> 504)."""
    from eyecare_edge.serve.limits import Cancelled, RequestTimeout
    from eyecare_edge.serve.screen import GuardedPipeline

    class Ticket:
        cancelled = False
        deadline = time.monotonic() - 1

        class pool:
            stopping = False

    frames = pipe.decode(assets.images[0])
    with pytest.raises(RequestTimeout):
        answer_protocol(GuardedPipeline(pipe, frames, Ticket()), b"x", load_protocol())
    Ticket.deadline, Ticket.cancelled = time.monotonic() + 60, True
    with pytest.raises(Cancelled):
        answer_protocol(GuardedPipeline(pipe, frames, Ticket()), b"x", load_protocol())


def test_answers_only_server_anonymizes_every_request(assets, tmp_path):
    """No --sr-dir/--fhir-dir: the answers come back, nothing is written; the server's --anonymize
    cannot be undone by a request."""
    srv = _start_server(
        assets.bundle, tmp_path / "server.log", "--anonymize", "--workers", "1",
        "--llm", "f32", "--vision-precision", "fp32", "--threads", "1", "--vision-threads", "1",
    )  # fmt: skip
    try:
        src_path = make_op_dicom(tmp_path / "op.dcm", side=200)
        src = pydicom.dcmread(src_path)
        body = {"image": _data_uri(src_path.read_bytes()), "max_tokens": 2, "anonymize": False}
        status, _, res = _post(
            srv.base + "/v1/screen", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        assert status == 200, res
        assert res["anonymized"] is True and res["files"] == {} and res["protocol"]["id"] == DEFAULT_ID
        assert [a["question_id"] for a in res["answers"]] == ["dr_grade", "macular_edema", "findings"]
        leaked = [v for v in [*IDENTIFIERS, src.StudyInstanceUID, src.SOPInstanceUID] if v in json.dumps(res)]
        assert not leaked, leaked
        assert sorted(p.name for p in tmp_path.iterdir()) == ["op.dcm", "server.log"]
        status, raw = _get(srv.base + "/v1/protocols")
        assert json.loads(raw)["filing"] == {"sr": False, "fhir": False, "anonymize": True}
    finally:
        srv.proc.terminate()
        srv.proc.wait(timeout=20)
    assert "Traceback" not in srv.log.read_text()
