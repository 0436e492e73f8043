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

import warnings
from collections.abc import Sequence
from copy import deepcopy
from io import BytesIO

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from eyecare_edge.clinical.answers import DeviceInfo, QuestionAnswer
from eyecare_edge.clinical.protocol import Code, Protocol
from eyecare_edge.clinical.source import IDENTIFYING, SourceInfo, uid_from

SERIES_NUMBER = 9180  # arbitrary but fixed: the series an eyecare-edge SR lands in
MANUFACTURER = "eyecare-edge"
# The concept of the note on where the UIDs came from: DCM 121106 "Comment".
COMMENT = codes.DCM.Comment
# DICOM (Image) Laterality -> the SNOMED CT laterality qualifier of the finding site "Eye"
LATERALITY = {"L": codes.SCT.Left, "R": codes.SCT.Right, "B": codes.SCT.RightAndLeft}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # the evidence class of a source that is not DICOM


def _coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _evidence(src: SourceInfo, sop_class_uid: str | None = None) -> Dataset:
    """The source as highdicom's `evidence`, from whose first item highdicom copies the Patient
    and Study modules and the Specific Character Set into the SR, and whose instance it references.

    A DICOM source gives its whole header (those modules unchanged, names in their character
    set); an anonymized or non-DICOM one only the UIDs and empty identifiers. `sop_class_uid`
    overrides the class (see `build_sr`: a class highdicom has no IOD for)."""
    ds = deepcopy(src.header) if src.header is not None and not src.anonymized else Dataset()
    ds.StudyInstanceUID = src.study_uid
    ds.SeriesInstanceUID = src.series_uid
    ds.SOPInstanceUID = src.sop_instance_uid or uid_from(f"eyecare-edge no instance\0{src.sha256}")
    ds.SOPClassUID = sop_class_uid or src.sop_class_uid or SECONDARY_CAPTURE
    for keyword in IDENTIFYING:
        if keyword not in ds or src.anonymized:
            setattr(ds, keyword, None)
    charset = _charset(ds.get("SpecificCharacterSet"))
    if charset is None:
        ds.pop("SpecificCharacterSet", None)
    else:
        ds.SpecificCharacterSet = charset
    return ds


def _charset(value: object) -> str | list[str] | None:
    """The source's Specific Character Set as highdicom accepts it. DICOM writes the default
    repertoire as an empty first value ("\\ISO 2022 IR 87", Japanese) or "ISO_IR 6", which
    highdicom refuses; ISO 2022 IR 6 is the same set. A value highdicom does not know: UTF-8
    (pydicom has already decoded the names; UTF-8 holds them all)."""
    values = [value] if isinstance(value, str) else [str(v) for v in value or []]
    values = [v.strip() for v in values]
    if not any(values) or values == ["ISO_IR 6"]:
        return None
    if len(values) > 1:
        values = [v if v not in ("", "ISO_IR 6") else "ISO 2022 IR 6" for v in values]
    known = {v.value for v in hd.enum.SpecificCharacterSetValues}
    if not all(v in known for v in values):
        return "ISO_IR 192"
    return values[0] if len(values) == 1 else values


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
    sites = None
    if src.laterality:  # a DR grade is per eye: the source's (Image) Laterality travels with it
        sites = [hd.sr.FindingSite(codes.SCT.Eye, laterality=LATERALITY[src.laterality])]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        algorithm_id=algorithm,
        finding_sites=sites,
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
    if not src.is_dicom or src.generated:
        root_items = report[0].ContentSequence
        if src.is_dicom:
            what = f"Source DICOM image (sha256 {src.sha256}) has no {' or '.join(src.generated)}"
            uids = "the missing UIDs"
        else:
            what = f"Source image was not DICOM ({src.format}, sha256 {src.sha256})"
            uids = "its study and series UIDs"
        root_items.append(
            hd.sr.TextContentItem(
                name=COMMENT,
                value=f"{what}; {uids} were generated by eyecare-edge.",
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )

    def comprehensive_sr(evidence: Dataset) -> hd.sr.ComprehensiveSR:
        return hd.sr.ComprehensiveSR(
            evidence=[evidence],
            content=report[0],
            series_instance_uid=series_uid,
            series_number=SERIES_NUMBER,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,  # unverified machine output: PRELIMINARY until a clinician signs it
            series_description=f"eyecare-edge {protocol.pid}"[:64],
        )

    series_uid, sop_uid = hd.UID(), sop_instance_uid or hd.UID()
    try:
        sr = comprehensive_sr(_evidence(src))
    except KeyError:
        # highdicom copies the Patient/Study modules by the evidence's IOD and has none for this
        # SOP class (a private or retired one): copy them through a Secondary Capture carrier
        # (same modules), then reference the instance by its real class.
        sr = comprehensive_sr(_evidence(src, SECONDARY_CAPTURE))
        for study in sr.get("CurrentRequestedProcedureEvidenceSequence", []):
            for series in study.ReferencedSeriesSequence:
                for item in series.ReferencedSOPSequence:
                    item.ReferencedSOPClassUID = src.sop_class_uid
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
    if src.sop_instance_uid is None and "CurrentRequestedProcedureEvidenceSequence" in sr:
        # No DICOM instance exists to reference; the evidence was only a carrier for the new UIDs.
        del sr.CurrentRequestedProcedureEvidenceSequence
    if src.anonymized:
        sr.PatientIdentityRemoved = "YES"
        sr.DeidentificationMethod = "eyecare-edge --anonymize: identifiers removed, UIDs replaced"
    return sr


def sr_bytes(sr: hd.sr.ComprehensiveSR) -> bytes:
    """The SR as a DICOM file. Written in the source's Specific Character Set when every text
    (names, answers, the protocol's meanings) encodes in it, else in UTF-8 (ISO_IR 192):
    pydicom would otherwise write '?' for what the set cannot hold, e.g. a German answer in an
    SR of an ASCII-only source."""
    buf = BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            sr.save_as(buf, enforce_file_format=True)
    except UserWarning:
        sr.SpecificCharacterSet = "ISO_IR 192"
        buf = BytesIO()
        sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
