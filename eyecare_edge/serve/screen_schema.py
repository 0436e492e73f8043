"""The JSON of `POST /v1/screen` and `GET /v1/protocols`: request parsing (JSON body, or a raw
`application/dicom` body with options in the query string) and the response bodies.

Hand-written like `openai_schema.py`: every refusal is a 400 naming the field (404 for an unknown
protocol or model), unknown fields are refused rather than ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from eyecare_edge.serve.errors import ApiError, load_json

if TYPE_CHECKING:
    from eyecare_edge.serve.screen import ClinicalConfig, ScreenResult

FIELDS = frozenset({"image", "protocol", "max_tokens", "anonymize", "model"})
DICOM_QUERY = frozenset({"protocol", "max_tokens", "anonymize"})
DEFAULT_MAX_TOKENS = 256


@dataclass
class ScreenRequest:
    protocol: Any
    max_tokens: int
    anonymize: bool
    image: str | None = None  # JSON: a data: URI or an allowed local path
    data: bytes | None = None  # application/dicom: the body


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def _protocol(value: Any, config: ClinicalConfig) -> Any:
    if value is None:
        return config.protocols[config.default_protocol]
    if not isinstance(value, str):
        raise _bad("'protocol' must be a protocol id (a string); see GET /v1/protocols", "protocol")
    if value not in config.protocols:
        raise ApiError(
            404,
            f"protocol {value!r} is not on this server (it has {', '.join(map(repr, config.protocols))})",
            "not_found_error",
            param="protocol",
        )
    return config.protocols[value]


def _max_tokens(value: Any, limit: int) -> int:
    if value is None:
        return DEFAULT_MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise _bad(f"'max_tokens' must be an integer from 1 to {limit}, got {value!r}", "max_tokens")
    return value


def parse_json_request(body: Any, config: ClinicalConfig, *, model_id: str, n_ctx: int) -> ScreenRequest:
    """A decoded JSON body: {"image": str, "protocol"?: id, "max_tokens"?: int, "anonymize"?: bool,
    "model"?: the server's model id}. Raises ApiError (400; 404 unknown protocol or model)."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise _bad(f"unknown field(s) {', '.join(map(repr, unknown))}", unknown[0])
    if "model" in body and body["model"] != model_id:
        raise ApiError(
            404,
            f"model {body['model']!r} does not exist; this server has {model_id!r}",
            "not_found_error",
            param="model",
        )
    image = body.get("image")
    if not isinstance(image, str) or not image:
        raise _bad(
            "'image' is required: a data: URI (JPEG, PNG, TIFF or DICOM bytes) or a local path", "image"
        )
    anonymize = body.get("anonymize", False)
    if not isinstance(anonymize, bool):
        raise _bad("'anonymize' must be true or false", "anonymize")
    return ScreenRequest(
        _protocol(body.get("protocol"), config),
        _max_tokens(body.get("max_tokens"), max(n_ctx, 1)),
        anonymize or config.anonymize,
        image=image,
    )


def parse_dicom_request(
    data: bytes, query: dict[str, str], config: ClinicalConfig, *, n_ctx: int
) -> ScreenRequest:
    """A raw `application/dicom` body, options in the query string (?protocol=&max_tokens=&anonymize=)."""
    unknown = sorted(set(query) - DICOM_QUERY)
    if unknown:
        raise _bad(f"unknown query parameter(s) {', '.join(map(repr, unknown))}", unknown[0])
    if not data:
        raise _bad("the application/dicom body is empty", "image")
    tokens = query.get("max_tokens")
    if tokens is not None and not tokens.isdigit():
        raise _bad(f"'max_tokens' must be an integer, got {tokens!r}", "max_tokens")
    anon = query.get("anonymize", "false").lower()
    if anon not in ("true", "false", "1", "0"):
        raise _bad(f"'anonymize' must be true or false, got {anon!r}", "anonymize")
    return ScreenRequest(
        _protocol(query.get("protocol"), config),
        _max_tokens(None if tokens is None else int(tokens), max(n_ctx, 1)),
        anon in ("true", "1") or config.anonymize,
        data=data,
    )


def _code(protocol: Any, code: Any) -> dict[str, str]:
    return {
        "system": protocol.system(code.scheme),
        "scheme": code.scheme,
        "code": code.value,
        "display": code.meaning,
    }


def answer_body(protocol: Any, a: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "question_id": a.question.qid,
        "kind": a.question.kind,
        "frame": a.dicom_frame,
        "status": a.status,
        "option": None,
        "code": None,
        "text": a.text,
    }
    if a.option is not None:
        out["option"] = {"letter": a.option.letter, "text": a.option.text}
        out["code"] = _code(protocol, a.option.code)
        out["p_best"] = a.p_best
        out["p_options"] = a.p_options
    return out


def screen_body(result: ScreenResult, *, rid: str, created: int, model_id: str, fingerprint: str) -> dict:
    """The JSON answer: answers with codes, what was filed, the UIDs the files reference, usage.
    No patient name, ID, birth date or study date/accession: those stay in the files."""
    src, proto = result.source, result.protocol
    files: dict[str, Any] = {}
    if result.sr is not None:
        files["sr"] = {"file": result.names["sr"], "sop_instance_uid": result.sr_sop_instance_uid}
    if result.fhir is not None:
        files["fhir"] = {"file": result.names["fhir"], "resource_type": "Bundle"}
    return {
        "id": rid,
        "object": "screening",
        "created": created,
        "model": model_id,
        "system_fingerprint": fingerprint,
        "protocol": {"id": proto.pid, "name": proto.name},
        "source": {
            "dicom": src.is_dicom,
            "uids": "from the source" if src.is_dicom else "generated (the source is not DICOM)",
            "format": src.format,
            "study_instance_uid": src.study_uid,
            "series_instance_uid": src.series_uid,
            "sop_instance_uid": src.sop_instance_uid,
            "sop_class_uid": src.sop_class_uid,
            "frames": src.n_frames,
        },
        "anonymized": result.anonymized,
        "answers": [answer_body(proto, a) for a in result.answers],
        "files": files,
        "usage": {**result.usage, "cached_image_prefixes": result.cached_prefixes},
    }


def protocols_body(config: ClinicalConfig) -> dict[str, Any]:
    """GET /v1/protocols: every protocol with its questions, options and codes (what an
    integrator maps the answers to), the default first."""
    data = []
    for proto in config.protocols.values():
        data.append(
            {
                "id": proto.pid,
                "object": "protocol",
                "name": proto.name,
                "default": proto.pid == config.default_protocol,
                "min_option_probability": proto.min_option_probability,
                "questions": [
                    {
                        "id": q.qid,
                        "kind": q.kind,
                        "question": q.question,
                        "concept": _code(proto, q.concept),
                        "options": [
                            {"letter": o.letter, "text": o.text, "code": _code(proto, o.code)}
                            for o in q.options
                        ],
                    }
                    for q in proto.questions
                ],
            }
        )
    return {
        "object": "list",
        "data": data,
        "filing": {
            "sr": config.sr_dir is not None,
            "fhir": config.fhir_dir is not None,
            "anonymize": config.anonymize,
        },
    }


async def read_screen_request(
    request: Any, config: ClinicalConfig, *, model_id: str, n_ctx: int
) -> ScreenRequest:
    """The request from a JSON body or a raw application/dicom body; 415 for anything else."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("application/json", "application/dicom"):
        raise ApiError(
            415,
            f"Content-Type must be application/json or application/dicom, got {ctype or 'none'!r}",
            "invalid_request_error",
        )
    raw = await request.body()
    if ctype == "application/dicom":
        return parse_dicom_request(raw, dict(request.query_params), config, n_ctx=n_ctx)
    if request.query_params:
        raise _bad("a JSON request carries its options in the body, not the query string")
    body = load_json(raw)
    return parse_json_request(body, config, model_id=model_id, n_ctx=n_ctx)


__all__ = [
    "ScreenRequest",
    "answer_body",
    "parse_dicom_request",
    "parse_json_request",
    "protocols_body",
    "read_screen_request",
    "screen_body",
]
