"""What `eyecare-edge screen` needs for --protocol / --sr-dir / --fhir-dir / --anonymize: checked
before the model loads (a bad protocol or a missing extra should not cost a minute of loading),
then attached to the loaded pipeline as `run_screen`'s answer_fn and on_file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eyecare_edge.clinical.anonymize import scrub_paths
from eyecare_edge.clinical.answers import device_info
from eyecare_edge.clinical.constrained import ProtocolAnswerer
from eyecare_edge.clinical.outputs import (
    ClinicalOutputError,
    ClinicalOutputs,
    previous_records,
    require_highdicom,
)
from eyecare_edge.clinical.protocol import Protocol, load_protocol
from eyecare_edge.images import ImageError
from eyecare_edge.screening import Question


@dataclass
class ScreenClinical:
    protocol: Protocol
    sr_dir: Path | None
    fhir_dir: Path | None
    anonymize: bool
    failures: list[str] = field(default_factory=list)
    outputs: ClinicalOutputs | None = None

    @classmethod
    def prepare(
        cls,
        protocol_file: str | os.PathLike[str] | None,
        sr_dir: Path | None,
        fhir_dir: Path | None,
        anonymize: bool,
    ) -> ScreenClinical:
        """Raises ProtocolError (bad protocol file) or ClinicalOutputError (highdicom missing)."""
        protocol = load_protocol(protocol_file)
        if sr_dir is not None:
            require_highdicom()
        return cls(protocol, sr_dir, fhir_dir, anonymize)

    def questions(self) -> list[Question]:
        out = []
        for q in self.protocol.questions:
            options = {o.letter: o.text for o in q.options} if q.kind == "closed" else None
            out.append(Question(q.prompt, q.question, options, q.qid))
        return out

    def attach(self, pipeline: Any, *, results_path: Path, resume: bool, max_tokens: int) -> dict[str, Any]:
        """run_screen keyword arguments: answer_fn (constrained closed answers) and, when SR/FHIR
        are wanted, on_file. Raises ConstraintError when an option letter is not one token."""
        kwargs: dict[str, Any] = {
            "answer_fn": ProtocolAnswerer(pipeline, self.protocol, max_tokens=max_tokens)
        }
        if self.sr_dir is not None or self.fhir_dir is not None:
            self.outputs = ClinicalOutputs(
                self.protocol,
                device_info(pipeline),
                sr_dir=self.sr_dir,
                fhir_dir=self.fhir_dir,
                anonymize=self.anonymize,
                previous=previous_records(results_path) if resume else {},
            )
            kwargs["on_file"] = self.on_file
        return kwargs

    def on_file(self, path: Path, lines: list[dict]) -> None:
        """Write one file's SR/FHIR; a failure is recorded (the batch goes on, exit code 3)."""
        assert self.outputs is not None
        try:
            self.outputs.write(path, lines)
        except Exception as e:  # one file's SR must not stop a batch of thousands (its JSONL lines are kept)
            why = (
                str(e)
                if isinstance(e, (ClinicalOutputError, OSError, ImageError))
                else f"{type(e).__name__}: {e}"
            )
            line = f"{path}: SR/FHIR not written ({' '.join(why.split())})"
            self.failures.append(scrub_paths(line, [str(path)]) if self.anonymize else line)

    @property
    def n_written(self) -> int:
        return 0 if self.outputs is None else len(self.outputs.written)
