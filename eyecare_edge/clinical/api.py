"""One call per request for a server (or any caller holding a loaded `Pipeline`): answer a
protocol about one image and file the results as SR and/or FHIR."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from eyecare_edge.bundle import sha256_file
from eyecare_edge.clinical.answers import device_info
from eyecare_edge.clinical.constrained import ProtocolAnswerer
from eyecare_edge.clinical.outputs import Written, write_clinical_results
from eyecare_edge.clinical.protocol import Protocol


def answer_protocol(
    pipeline: Any, source: str | os.PathLike[str] | bytes, protocol: Protocol, *, max_tokens: int = 256
) -> list[dict]:
    """Every protocol question about every frame of `source` (a path or the file's bytes), as
    screen-format lines (question, question_id, frame, answer, choice for closed questions,
    image_sha256, error None). Raises what `Pipeline.decode` raises for an unreadable image."""
    sha = hashlib.sha256(source).hexdigest() if isinstance(source, bytes) else sha256_file(source)
    answerer = ProtocolAnswerer(pipeline, protocol, max_tokens=max_tokens)
    lines = []
    for image in pipeline.decode(source):
        for q in protocol.questions:
            a = answerer(image, q.prompt)
            line = {
                "question": q.prompt,
                "question_id": q.qid,
                "frame": image.frame,
                "answer": a.text,
                "error": None,
                "image_sha256": sha,
                "bundle_digest": pipeline.digest,
            }
            line.update(getattr(a, "record_fields", {}))
            lines.append(line)
    return lines


def file_clinical_results(
    pipeline: Any,
    source: str | os.PathLike[str] | bytes,
    protocol: Protocol,
    *,
    sr_dir: str | os.PathLike[str] | None = None,
    fhir_dir: str | os.PathLike[str] | None = None,
    anonymize: bool = False,
    name: str = "<upload>",
    max_tokens: int = 256,
) -> Written | None:
    """Answer `protocol` about `source` and write its SR / FHIR bundle; returns what was written
    (paths, the SR's SOP Instance UID, the answers). `name`: what bytes are called in errors."""
    lines = answer_protocol(pipeline, source, protocol, max_tokens=max_tokens)
    return write_clinical_results(
        source,
        lines,
        protocol,
        device_info(pipeline),
        sr_dir=None if sr_dir is None else Path(sr_dir),
        fhir_dir=None if fhir_dir is None else Path(fhir_dir),
        anonymize=anonymize,
        name=name,
    )
