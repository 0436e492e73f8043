"""The FHIR R4 result of one screened file: a transaction Bundle with a DiagnosticReport, one
Observation per answer and the Device that answered, as plain JSON (no FHIR library at run time;
tests validate it against fhir.resources' R4B models, whose DiagnosticReport/Observation/Device
elements used here are those of R4).

* DiagnosticReport: status preliminary (machine output, not yet verified), code: the protocol;
  imagingStudy: the source study by its DICOM Study Instance UID (ImagingStudy.identifier
  `urn:dicom:uid` / `urn:oid:<uid>`, the FHIR convention); identifier: the SR's SOP Instance
  UID when one is written, so the two records name each other.
* Observation: code: the question's concept; valueCodeableConcept: the option's code (system
  from the protocol), or valueString for free text, or dataAbsentReason "unknown" with the
  reason for "no valid answer"; derivedFrom the study; note: the frame of a multi-frame file.
* subject: the patient by identifier (PatientID) when the source has one and not anonymized.

Entries reference each other by `urn:uuid:` full URLs, resolved by a FHIR server on POST.
"""

from __future__ import annotations

import datetime as _dt
import uuid
from collections.abc import Sequence
from typing import Any

from eyecare_edge.clinical.answers import DeviceInfo, QuestionAnswer
from eyecare_edge.clinical.protocol import Code, Protocol
from eyecare_edge.clinical.source import SourceInfo

DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DICOM_UID = "urn:dicom:uid"


def _uuid(*parts: str) -> str:
    """Deterministic per (file, run inputs), so a rewritten result keeps its entry ids."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "eyecare-edge:" + "\0".join(parts)))


def _concept(code: Code, protocol: Protocol, text: str | None = None) -> dict[str, Any]:
    cc: dict[str, Any] = {
        "coding": [{"system": protocol.system(code.scheme), "code": code.value, "display": code.meaning}]
    }
    if text:
        cc["text"] = text
    return cc


def _display_name(pn: str) -> str:
    """A DICOM person name as display text: its first non-empty component group (alphabetic,
    else ideographic or phonetic: "Yamada^Tarou=山田^太郎=やまだ^たろう" -> "Yamada Tarou"),
    components joined by spaces."""
    group = next((g for g in pn.split("=") if g.strip("^ ")), "")
    return " ".join(c.strip() for c in group.split("^") if c.strip())


def _study_date(src: SourceInfo) -> str | None:
    """The study date as a FHIR date. DICOM's StudyTime has no time zone and FHIR dateTimes with
    a time need one, so the time is left out rather than guessed."""
    d = src.identifier("StudyDate")
    return f"{d[:4]}-{d[4:6]}-{d[6:]}" if len(d) == 8 and d.isdigit() else None


def build_bundle(
    src: SourceInfo,
    answers: Sequence[QuestionAnswer],
    protocol: Protocol,
    device: DeviceInfo,
    *,
    sr_sop_instance_uid: str | None = None,
    issued: _dt.datetime | None = None,
) -> dict[str, Any]:
    """The transaction Bundle (a dict ready for json.dumps)."""
    now = (issued or _dt.datetime.now(_dt.timezone.utc)).isoformat(timespec="seconds")
    key = (src.sha256, protocol.pid, device.bundle_digest)
    study_ref = {
        "type": "ImagingStudy",
        "identifier": {"system": DICOM_UID, "value": f"urn:oid:{src.study_uid}"},
    }
    patient_id = src.identifier("PatientID")
    subject = None
    if patient_id:
        subject = {"type": "Patient", "identifier": {"value": patient_id}}
        name = _display_name(src.identifier("PatientName"))
        if name:
            subject["display"] = name
    effective = _study_date(src)

    device_url = f"urn:uuid:{_uuid(*key, 'device')}"
    device_res = {
        "resourceType": "Device",
        "deviceName": [{"name": f"eyecare-edge {device.model}", "type": "model-name"}],
        "manufacturer": "eyecare-edge",
        "version": [{"value": f"eyecare-edge {device.version}"}]
        + [{"value": p} for p in device.parameters()],
    }
    entries: list[dict[str, Any]] = [
        {"fullUrl": device_url, "resource": device_res, "request": {"method": "POST", "url": "Device"}}
    ]
    obs_refs = []
    conclusion = []
    for a in answers:
        url = f"urn:uuid:{_uuid(*key, 'obs', a.question.qid, str(a.frame))}"
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "status": "preliminary",
            "category": [{"coding": [{"system": OBS_CATEGORY, "code": "imaging", "display": "Imaging"}]}],
            "code": _concept(a.question.concept, protocol, a.question.question),
            "derivedFrom": [study_ref],
            "device": {"reference": device_url},
            "issued": now,
        }
        if subject:
            obs["subject"] = subject
        if src.laterality:  # R4 bodySite has no laterality element: the eye coded, the side as text
            obs["bodySite"] = {
                "coding": [{"system": "http://snomed.info/sct", "code": "81745001", "display": "Eye"}],
                "text": {"L": "left eye", "R": "right eye", "B": "both eyes"}[src.laterality],
            }
        if effective:
            obs["effectiveDateTime"] = effective
        if a.status == "answered" and a.option is not None:
            obs["valueCodeableConcept"] = _concept(a.option.code, protocol, a.option.text)
            conclusion.append(f"{a.question.concept.meaning}: {a.option.text}")
        elif a.status == "text":
            obs["valueString"] = a.text or ""
        else:
            obs["dataAbsentReason"] = {
                "coding": [{"system": DATA_ABSENT, "code": "unknown", "display": "Unknown"}],
                "text": a.text or "no valid answer",
            }
            conclusion.append(f"{a.question.concept.meaning}: no valid answer")
        notes = []
        if a.frame is not None:
            notes.append(f"frame {a.frame + 1} of SOP instance {src.sop_instance_uid or src.sha256}")
        if a.p_best is not None:
            notes.append(f"probability among the options {a.p_best:.3f}")
        if a.p_options is not None:
            notes.append(f"options' total probability {a.p_options:.4f}")
        if notes:
            obs["note"] = [{"text": n} for n in notes]
        obs_refs.append({"reference": url})
        entries.append({"fullUrl": url, "resource": obs, "request": {"method": "POST", "url": "Observation"}})

    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "status": "preliminary",
        "code": {
            "coding": [
                {"system": "urn:eyecare-edge:protocol", "code": protocol.pid, "display": protocol.name[:200]}
            ],
            "text": protocol.name,
        },
        "issued": now,
        "imagingStudy": [study_ref],
        "result": obs_refs,
    }
    if sr_sop_instance_uid:
        report["identifier"] = [{"system": DICOM_UID, "value": f"urn:oid:{sr_sop_instance_uid}"}]
    if subject:
        report["subject"] = subject
    if effective:
        report["effectiveDateTime"] = effective
    text_notes = []
    if not src.is_dicom:
        text_notes.append(
            f"Source image was not DICOM ({src.format}, sha256 {src.sha256}); "
            "its study UID was generated by eyecare-edge."
        )
    if conclusion or text_notes:
        report["conclusion"] = "; ".join(conclusion + text_notes)
    entries.insert(
        1,
        {
            "fullUrl": f"urn:uuid:{_uuid(*key, 'report')}",
            "resource": report,
            "request": {"method": "POST", "url": "DiagnosticReport"},
        },
    )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}
