"""The DICOM Structured Report of one screened file, written with highdicom: a TID 1500
Imaging Measurement Report (what IHE AI Results files next to the source study).

Layout: the observer is the device (eyecare-edge, the bundle's model); one measurement group
(TID 1501) per frame read, each with
* the algorithm identification (TID 4019): eyecare-edge's version; parameters: bundle sha256,
  vision backend/precision, GGUF precision, visual-token budget;
* the source image reference (DICOM input: SOP class/instance UID, and the frame number of a
  multi-frame file);
* each closed answer as a coded qualitative evaluation (CODE: the question's concept, the
  chosen option's code), each free-text answer and each "no valid answer" as a TEXT item with
  the question's concept: an unanswerable question is never given a code.

Patient and study identifiers come from the source's header unchanged (or anonymized); a
non-DICOM source gets a new study UID and a TEXT item saying so.

This module imports highdicom at its top: import it only when an SR is wanted (the runtime's
install stays lean; `pip install 'eyecare-edge[clinical]'`).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from eyecare_edge.clinical.answers import DeviceInfo, QuestionAnswer
from eyecare_edge.clinical.protocol import Code, Protocol
from eyecare_edge.clinical.source import SourceInfo, uid_from

SERIES_NUMBER = 9180  # arbitrary but fixed: the series an eyecare-edge SR lands in
MANUFACTURER = "eyecare-edge"
# The concept of the note on where the UIDs came from: DCM 121106 "Comment".
COMMENT = codes.DCM.Comment


def _coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _evidence(src: SourceInfo) -> Dataset:
    """The source as highdicom's `evidence`: the patient/study attributes it copies and the
    instance it references."""
    ds = Dataset()
    ds.StudyInstanceUID = src.study_uid
    ds.SeriesInstanceUID = src.series_uid
    ds.SOPInstanceUID = src.sop_instance_uid or uid_from(f"eyecare-edge no instance\0{src.sha256}")
    ds.SOPClassUID = src.sop_class_uid or "1.2.840.10008.5.1.4.1.1.7"
    for keyword, value in src.identifiers:
        setattr(ds, keyword, value or None)
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
    ):
        if keyword not in ds:
            setattr(ds, keyword, None)
    return ds


def _group(
    src: SourceInfo,
    frame: int | None,
    answers: Sequence[QuestionAnswer],
    protocol: Protocol,
    device: DeviceInfo,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    label = protocol.pid if frame is None else f"{protocol.pid} frame {frame + 1}"
    tracking = hd.sr.TrackingIdentifier(
        uid=uid_from(f"eyecare-edge group\0{src.sha256}\0{frame}\0{protocol.pid}"), identifier=label
    )
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"{MANUFACTURER} {device.model}",
        version=device.version,
        parameters=[*device.parameters(), f"protocol {protocol.pid}"],
    )
    evaluations = [
        hd.sr.QualitativeEvaluation(name=_coded(a.question.concept), value=_coded(a.option.code))
        for a in answers
        if a.status == "answered" and a.option is not None
    ]
    sources = None
    if src.is_dicom and src.sop_instance_uid and src.sop_class_uid:
        frames = None if frame is None else [frame + 1]
        sources = [hd.sr.SourceImageForMeasurementGroup(src.sop_class_uid, src.sop_instance_uid, frames)]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        algorithm_id=algorithm,
        qualitative_evaluations=evaluations or None,
        source_images=sources,
    )
    items = group[0].ContentSequence
    for a in answers:
        if a.status != "answered":
            items.append(
                hd.sr.TextContentItem(
                    name=_coded(a.question.concept),
                    value=a.text or "",
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
            )
    return group


def build_sr(
    src: SourceInfo,
    answers: Sequence[QuestionAnswer],
    protocol: Protocol,
    device: DeviceInfo,
    *,
    sop_instance_uid: str | None = None,
) -> hd.sr.ComprehensiveSR:
    """The SR of `answers` (one file's, any frames) about `src`."""
    frames: dict[int | None, list[QuestionAnswer]] = {}
    for a in answers:
        frames.setdefault(a.frame, []).append(a)
    groups = [
        _group(src, f, frames[f], protocol, device)
        for f in sorted(frames, key=lambda f: -1 if f is None else f)
    ]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid_from(f"eyecare-edge device\0{device.bundle_digest}\0{device.vision}\0{device.llm}"),
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=device.model[:64],
            serial_number=device.bundle_digest[:16],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    if not src.is_dicom:
        root_items = report[0].ContentSequence
        root_items.append(
            hd.sr.TextContentItem(
                name=COMMENT,
                value=(
                    f"Source image was not DICOM ({src.format}, sha256 {src.sha256}); "
                    "its study and series UIDs were generated by eyecare-edge."
                ),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    sr = hd.sr.ComprehensiveSR(
        evidence=[_evidence(src)],
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # unverified machine output: PRELIMINARY until a clinician signs it
        series_description=f"eyecare-edge {protocol.pid}"[:64],
    )
    sr.ManufacturerModelName = device.model[:64]
    sr.SoftwareVersions = [f"eyecare-edge {device.version}", f"bundle {device.bundle_digest[:16]}"]
    private = sorted(
        {c.scheme for q in protocol.questions for c in (q.concept, *(o.code for o in q.options))}
        - {"SCT", "LN", "DCM", "UCUM"}
    )
    if private:  # a private scheme is declared in the Coding Scheme Identification Sequence (PS3.3 C.12.1)
        items = []
        for scheme in private:
            item = Dataset()
            item.CodingSchemeDesignator = scheme
            item.CodingSchemeName = f"{scheme} codes of eyecare-edge protocol {protocol.pid}"[:64]
            item.CodingSchemeUID = uid_from(f"eyecare-edge scheme\0{scheme}\0{protocol.pid}")
            items.append(item)
        sr.CodingSchemeIdentificationSequence = items
    if not src.is_dicom and "CurrentRequestedProcedureEvidenceSequence" in sr:
        # No DICOM instance exists to reference; the evidence was only a carrier for the new UIDs.
        del sr.CurrentRequestedProcedureEvidenceSequence
    if src.anonymized:
        sr.PatientIdentityRemoved = "YES"
        sr.DeidentificationMethod = "eyecare-edge --anonymize: identifiers removed, UIDs replaced"
    return sr
