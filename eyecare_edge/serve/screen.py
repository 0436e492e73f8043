"""`POST /v1/screen`: run a screening protocol on one image and file the results a clinic keeps
(DICOM SR + FHIR), on the server's worker pool.

What a clinic integrator gets: the fundus camera's DICOM (or a JPEG/PNG/TIFF) goes in, as a JSON
`{"image": "data:...;base64,..." | "/allowed/path.dcm"}` or as the raw `application/dicom` body;
the protocol's questions are answered (closed ones constrained to the protocol's coded options,
so each answer is an option's code or "no valid answer"); the SR is written to `--sr-dir`, the
FHIR transaction Bundle to `--fhir-dir`; the response lists each answer with its code, the
written file names and the SR's SOP Instance UID, and the UIDs the files reference.

Why the protocols are the server's (`--protocol`, repeatable, selected by id) and not sent by
the client: the codes filed into a patient record are the clinic's configuration, checked once at
start (and their option letters checked against the model's vocabulary at load), not whatever a
key holder posts.

Privacy: the response carries no patient name/ID/dates (the caller has them; the files have
them); UIDs in it are those of the files (the replaced ones under `--anonymize` or a request's
`"anonymize": true`); nothing identifying is logged. The request's deadline (`--timeout`) and a
client leaving are checked before every question and at every generated token.

This module: configuration, reading the image, the job on a pipeline; `screen_schema`: the JSON.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eyecare_edge.images import ImageError
from eyecare_edge.pipeline import decode_source
from eyecare_edge.serve.errors import ApiError
from eyecare_edge.serve.limits import Cancelled, RequestTimeout
from eyecare_edge.serve.media import MediaPolicy, data_uri_bytes, resolve_local
from eyecare_edge.serve.screen_schema import ScreenRequest

log = logging.getLogger("eyecare_edge.serve")
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _bad(message: str, param: str = "image") -> ApiError:
    return ApiError(400, message, param=param)


@dataclass
class ClinicalConfig:
    """The server's protocols (by id; the first is the default) and where results are filed.

    sr_dir / fhir_dir None: that kind is not written (both None: answers only, nothing filed).
    anonymize: every request's outputs are anonymized (a request can ask for it, not undo it).
    max_frames: frames of one image screened at most (a multi-frame OCT volume costs
    frames x questions evaluations)."""

    protocols: dict[str, Any]
    sr_dir: Path | None = None
    fhir_dir: Path | None = None
    anonymize: bool = False
    max_frames: int = 64
    write_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def default_protocol(self) -> str:
        return next(iter(self.protocols))

    def dirs(self, pid: str) -> tuple[Path | None, Path | None]:
        """Where a protocol's files go: the folders themselves with one protocol (as `screen`
        writes them), a subfolder per protocol id with several (files are named by the image's
        sha256, so two protocols' results about one image would otherwise overwrite each other)."""
        if len(self.protocols) == 1:
            return self.sr_dir, self.fhir_dir
        return tuple(None if d is None else d / pid for d in (self.sr_dir, self.fhir_dir))  # type: ignore[return-value]


def load_clinical_config(
    protocol_files: list[Path],
    sr_dir: Path | None,
    fhir_dir: Path | None,
    anonymize: bool,
    max_frames: int = 64,
) -> ClinicalConfig:
    """Protocols read and output folders created at start. Raises ProtocolError (a bad protocol
    file, or two with one id) or ClinicalOutputError (highdicom missing, a folder that cannot be
    created) — the command turns these into exit 2 / exit 1 before the model loads."""
    from eyecare_edge.clinical import ProtocolError, load_protocol
    from eyecare_edge.clinical.outputs import ClinicalOutputError, require_highdicom

    protocols: dict[str, Any] = {}
    for p in protocol_files or [None]:
        proto = load_protocol(p)
        if proto.pid in protocols:
            raise ProtocolError(
                f"{p}: protocol id {proto.pid!r} is already used by {protocols[proto.pid].source}"
            )
        protocols[proto.pid] = proto
    if len(protocols) > 1:  # their ids name subfolders
        for proto in protocols.values():
            if not SAFE_ID.fullmatch(proto.pid):
                raise ProtocolError(
                    f"{proto.source}: protocol id {proto.pid!r} names a folder when several protocols are "
                    "served; use letters, digits, '.', '_' and '-' only"
                )
    if sr_dir is not None:
        require_highdicom()
    config = ClinicalConfig(protocols, sr_dir, fhir_dir, anonymize, max_frames)
    for pid in protocols:
        for d in config.dirs(pid):
            if d is not None:
                try:
                    d.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise ClinicalOutputError(
                        f"{d}: cannot create the output folder ({e.strerror or e})"
                    ) from e
    return config


def check_protocols(pipeline: Any, config: ClinicalConfig) -> None:
    """Raise ConstraintError when an option letter of a protocol is not one token of this
    model (found at load, so no request ever fails on the server's own configuration)."""
    from eyecare_edge.clinical import ProtocolAnswerer

    for proto in config.protocols.values():
        ProtocolAnswerer(pipeline, proto)


_SNIFF = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"II*\x00", "tif"), (b"MM\x00*", "tif"))


def upload_name(data: bytes) -> str:
    """What an uploaded file is called in messages; its extension is the sniffed format (a
    non-DICOM SR says which format its generated UIDs stand for)."""
    if data[128:132] == b"DICM":
        return "upload.dcm"
    return "upload." + next((ext for magic, ext in _SNIFF if data.startswith(magic)), "bin")


def read_image(req: ScreenRequest, media: MediaPolicy, max_frames: int) -> tuple[bytes, str, list]:
    """(the file's bytes, its name for messages, its decoded frames); ApiError 400/403 otherwise.
    Runs off the event loop (reading and decoding take a while on a 20 MB DICOM)."""
    try:
        if req.data is not None:
            data = req.data
        elif req.image.startswith("data:"):
            data = data_uri_bytes(req.image)
        elif req.image.startswith(("http://", "https://")):
            raise _bad(
                "remote image URLs are not fetched; send a data: URI or an allowed local path", "image"
            )
        else:
            real = resolve_local(req.image, media)
            try:
                data = real.read_bytes()
            except OSError as e:
                raise _bad(f"cannot read image {req.image!r} ({e.strerror or e})", "image") from None
    except ApiError as e:
        e.param = "image"
        raise
    name = upload_name(data)
    try:
        frames = decode_source(data, max_pixels=media.max_pixels)
    except ImageError as e:
        raise _bad(f"the image is not usable: {str(e).replace('<bytes>', name)}", "image") from None
    if len(frames) > max_frames:
        raise _bad(f"the image has {len(frames)} frames; this server screens at most {max_frames}", "image")
    return data, name, frames


# ---------------------------------------------------------------------- the job


class GuardedPipeline:
    """A `Pipeline` as `clinical.answer_protocol` uses it, with the request's frames already
    decoded, the deadline / client-gone checks before each question and at each generated token,
    and the tokens counted for usage and /metrics."""

    def __init__(self, pipeline: Any, frames: list, ticket: Any) -> None:
        self._pipe = pipeline
        self._frames = frames
        self._ticket = ticket
        self.usage = {"prompt_tokens": 0, "visual_tokens": 0, "completion_tokens": 0, "evaluations": 0}
        self.cached_prefixes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def decode(self, source: Any) -> list:
        return self._frames

    def _check(self, _piece: str = "") -> None:
        if self._ticket.cancelled or self._ticket.pool.stopping:
            raise Cancelled()
        if time.monotonic() > self._ticket.deadline:
            raise RequestTimeout()

    def _count(self, answer: Any, generated: int) -> None:
        self.usage["prompt_tokens"] += int(answer.n_prompt_tokens)
        self.usage["visual_tokens"] += int(answer.n_image_tokens)
        self.usage["completion_tokens"] += generated
        self.usage["evaluations"] += 1
        self.cached_prefixes += bool(answer.cached_prefix)

    def next_token_logits(self, image: Any, question: str) -> tuple[Any, Any]:
        self._check()
        logits, first = self._pipe.next_token_logits(image, question)
        self._count(first, 0)  # the scored token is not generated text
        return logits, first

    def ask(self, image: Any, question: str, **kw: Any) -> Any:
        self._check()
        answer = self._pipe.ask(image, question, stream=self._check, **kw)
        self._count(answer, int(answer.n_generated))
        return answer


@dataclass
class ScreenResult:
    protocol: Any
    source: Any  # clinical.source.SourceInfo as filed (anonymized when asked)
    answers: list
    anonymized: bool
    usage: dict[str, int]
    cached_prefixes: int
    sr: Path | None = None
    fhir: Path | None = None
    sr_sop_instance_uid: str | None = None
    names: dict[str, str] = field(default_factory=dict)  # sr/fhir -> path inside --sr-dir/--fhir-dir


def make_screen_job(
    req: ScreenRequest, data: bytes, name: str, frames: list, ticket: Any, config: ClinicalConfig
) -> Callable[[Any], ScreenResult]:
    """The work on a pipeline thread: answer every question about every frame, then write the
    SR/FHIR (under one lock: two requests for the same image write the same file names)."""

    def work(pipe: Any) -> ScreenResult:
        from eyecare_edge.clinical import answer_protocol, answers_from_records, device_info
        from eyecare_edge.clinical.anonymize import anonymize_source
        from eyecare_edge.clinical.outputs import ClinicalOutputs
        from eyecare_edge.clinical.source import read_source

        guarded = GuardedPipeline(pipe, frames, ticket)
        lines = answer_protocol(guarded, data, req.protocol, max_tokens=req.max_tokens)
        result = ScreenResult(req.protocol, None, [], req.anonymize, guarded.usage, guarded.cached_prefixes)
        sr_dir, fhir_dir = config.dirs(req.protocol.pid)
        if sr_dir is None and fhir_dir is None:
            src = read_source(data, lines[0]["image_sha256"] if lines else None, name=name)
            result.source = anonymize_source(src) if req.anonymize else src
            result.answers = answers_from_records(lines, req.protocol)
            return result
        outputs = ClinicalOutputs(
            req.protocol,
            device_info(pipe),
            sr_dir=sr_dir,
            fhir_dir=fhir_dir,
            anonymize=req.anonymize,
        )
        with config.write_lock:
            written = outputs.write(data, lines, name=name)
        if written is None:  # only when no line answers a question: cannot happen for a decoded image
            raise RuntimeError("no answer to file")
        result.source, result.answers = written.source, written.answers
        result.sr, result.fhir = written.sr, written.fhir
        result.sr_sop_instance_uid = written.sr_sop_instance_uid
        for kind, path, base in (("sr", written.sr, config.sr_dir), ("fhir", written.fhir, config.fhir_dir)):
            if path is not None and base is not None:
                result.names[kind] = path.relative_to(base).as_posix()
        return result

    return work


def as_screen_error(e: BaseException) -> BaseException:
    """Errors of the job as API errors: a write failure is the server's (500, no path of the
    source in it); the rest as for chat (timeout 504, bad image 400...)."""
    from eyecare_edge.clinical.outputs import ClinicalOutputError
    from eyecare_edge.serve.jobs import as_api_error

    if isinstance(e, (ClinicalOutputError, OSError)):
        return ApiError(500, f"the results could not be filed: {' '.join(str(e).split())}", "server_error")
    return as_api_error(e)


async def run_screen_request(state: Any, req: ScreenRequest, t0: float, receive: Any) -> ScreenResult:
    """Admit (429 when full), read + decode the image off the event loop, run the job on a
    pipeline (abandoned, 499, if the client leaves first), count it. Errors are ApiErrors."""
    from eyecare_edge.serve.jobs import abandon, run_job, wait_or_client_gone

    config: ClinicalConfig = state.config.clinical
    ticket = state.pool.admit()
    try:
        data, name, frames = await asyncio.get_running_loop().run_in_executor(
            None, read_image, req, state.config.media, config.max_frames
        )
    except BaseException:
        ticket.release()
        raise
    task = run_job(state, ticket, make_screen_job(req, data, name, frames, ticket, config))
    try:
        await wait_or_client_gone(receive, task)
        result = task.result()
    except BaseException as e:
        if not task.done():
            abandon(task, ticket)
        if isinstance(e, ApiError) or not isinstance(e, Exception):
            raise
        err = as_screen_error(e)
        if isinstance(err, ApiError):
            if err.status >= 500:
                log.error("screening failed: %s", err.message)
            raise err from None
        raise
    state.metrics.observe_screening(total_s=time.monotonic() - t0, result=result)
    return result


def clinical_unavailable(reason: str) -> ApiError:
    return ApiError(501, f"screening is not available on this server: {reason}", "not_implemented")


__all__ = [
    "ClinicalConfig",
    "GuardedPipeline",
    "ScreenResult",
    "check_protocols",
    "clinical_unavailable",
    "load_clinical_config",
    "make_screen_job",
    "read_image",
    "run_screen_request",
]
