"""Screen results (JSONL lines) as a protocol's answers, and the device that gave them: what
the SR and FHIR writers take."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from eyecare_edge import __version__
from eyecare_edge.clinical.constrained import NO_VALID_ANSWER
from eyecare_edge.clinical.protocol import Option, Protocol, ProtocolQuestion


@dataclass(frozen=True)
class QuestionAnswer:
    """One question's answer about one frame (None: a single-frame file).

    status: "answered" (a closed question's option), "text" (a free-text answer) or
    NO_VALID_ANSWER (then `text` says why: the options' probability, or the item's error).
    """

    question: ProtocolQuestion
    frame: int | None
    status: str
    option: Option | None = None
    text: str | None = None
    p_best: float | None = None  # the chosen option's probability among the options
    p_options: float | None = None  # all options' probability under the whole vocabulary

    @property
    def dicom_frame(self) -> int | None:
        """DICOM frame numbers start at 1; `frame` is the decoder's 0-based index."""
        return None if self.frame is None else self.frame + 1


@dataclass(frozen=True)
class DeviceInfo:
    """What produced the answers: named in the SR (algorithm identification) and the FHIR Device."""

    model: str
    bundle_digest: str
    vision: str
    llm: str
    max_visual_tokens: int
    max_tiles: int | None
    version: str = __version__

    def parameters(self) -> list[str]:
        return [
            f"bundle sha256 {self.bundle_digest}",
            f"vision {self.vision}",
            f"llm {self.llm}",
            f"visual token budget {self.max_visual_tokens} (max tiles {self.max_tiles or 'all'})",
        ]


def device_info(pipeline: Any) -> DeviceInfo:
    """The DeviceInfo of a loaded `Pipeline`."""
    from eyecare_edge.pipeline import max_visual_tokens

    enc = pipeline.vision.encoder
    m = pipeline.manifest.model
    model = f"{m.get('arch', 'eyecare_gpt')} {m.get('preset') or pipeline.bundle.name}"
    return DeviceInfo(
        model=model,
        bundle_digest=pipeline.digest,
        vision=f"{enc.name} {enc.precision}",
        llm=f"llama.cpp {pipeline.llm_entry.precision}",
        max_visual_tokens=max_visual_tokens(pipeline.preprocess),
        max_tiles=pipeline.preprocess.max_tiles,
    )


def _closed(q: ProtocolQuestion, rec: Mapping[str, Any]) -> QuestionAnswer:
    frame = rec.get("frame")
    choice = rec.get("choice")
    if rec.get("error") is not None:
        return QuestionAnswer(q, frame, NO_VALID_ANSWER, text=f"{NO_VALID_ANSWER} (error: {rec['error']})")
    if not isinstance(choice, Mapping) or choice.get("status") != "answered":
        if isinstance(choice, Mapping):
            why = f"options' probability {choice.get('p_options')} < {choice.get('min_probability')}"
        else:
            why = "the answer was not constrained to the options"
        return QuestionAnswer(q, frame, NO_VALID_ANSWER, text=f"{NO_VALID_ANSWER} ({why})")
    try:
        opt = q.option(str(choice.get("letter")))
    except KeyError:
        return QuestionAnswer(
            q, frame, NO_VALID_ANSWER, text=f"{NO_VALID_ANSWER} (letter outside the options)"
        )
    return QuestionAnswer(
        q, frame, "answered", option=opt, p_best=choice.get("p_best"), p_options=choice.get("p_options")
    )


def answers_from_records(records: Iterable[Mapping[str, Any]], protocol: Protocol) -> list[QuestionAnswer]:
    """The protocol's answers in `records` (lines of one file), by frame, then protocol order.

    A line counts for a question when it was asked with that question's exact prompt (a line
    of another protocol version is not taken for this one); the last such line wins.
    """
    by_prompt = {q.prompt: q for q in protocol.questions}
    latest: dict[tuple[int, str], tuple[ProtocolQuestion, Mapping[str, Any]]] = {}
    for rec in records:
        q = by_prompt.get(rec.get("question"))
        if q is None:
            continue
        frame = rec.get("frame")
        latest[(-1 if frame is None else int(frame), q.qid)] = (q, rec)
    order = {q.qid: i for i, q in enumerate(protocol.questions)}
    out = []
    for _key, (q, rec) in sorted(latest.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])):
        if q.kind == "closed":
            out.append(_closed(q, rec))
        elif rec.get("error") is not None:
            out.append(
                QuestionAnswer(
                    q, rec.get("frame"), NO_VALID_ANSWER, text=f"{NO_VALID_ANSWER} (error: {rec['error']})"
                )
            )
        elif not (rec.get("answer") or "").strip():
            out.append(
                QuestionAnswer(q, rec.get("frame"), NO_VALID_ANSWER, text=f"{NO_VALID_ANSWER} (empty answer)")
            )
        else:
            out.append(QuestionAnswer(q, rec.get("frame"), "text", text=str(rec["answer"]).strip()))
    return out
