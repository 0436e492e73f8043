"""Results a clinic can file: DICOM Structured Reports (TID 1500, via highdicom, imported only
when an SR is written) and FHIR R4 DiagnosticReport + Observations, from a screening protocol
whose closed answers are constrained to coded options.

protocol: the protocol YAML; constrained: option scoring; answers: records -> answers, device;
source: the source file's identifiers/UIDs; anonymize: --anonymize; sr / fhir: the writers;
outputs: per-file writing (`ClinicalOutputs`, `write_clinical_results`); api: one call per
request for a server (`file_clinical_results`: answer the protocol about an image, write SR/FHIR).
"""

from eyecare_edge.clinical.answers import DeviceInfo, QuestionAnswer, answers_from_records, device_info
from eyecare_edge.clinical.api import answer_protocol, file_clinical_results
from eyecare_edge.clinical.constrained import NO_VALID_ANSWER, ProtocolAnswerer, score_options
from eyecare_edge.clinical.outputs import (
    ClinicalOutputError,
    ClinicalOutputs,
    previous_records,
    write_clinical_results,
)
from eyecare_edge.clinical.protocol import Protocol, ProtocolError, load_protocol

__all__ = [
    "NO_VALID_ANSWER",
    "ClinicalOutputError",
    "ClinicalOutputs",
    "DeviceInfo",
    "Protocol",
    "ProtocolAnswerer",
    "ProtocolError",
    "QuestionAnswer",
    "answer_protocol",
    "answers_from_records",
    "device_info",
    "file_clinical_results",
    "load_protocol",
    "previous_records",
    "score_options",
    "write_clinical_results",
]
