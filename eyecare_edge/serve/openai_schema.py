"""OpenAI chat-completions requests in, `ChatRequest` out; and the response bodies back.

Parsed by hand rather than with pydantic models so that every refusal names the field and the
reason in OpenAI's error shape (a 400, never FastAPI's 422 with a validation dump), and so that
fields we accept but cannot honour (n > 1, tools, logprobs) are refused instead of ignored.

What a request may hold: one `user` message whose content is a string or a list of `text` and
`image_url` parts (the images are placed before the question, as `Pipeline.ask` does). The
bundle carries its own system prompt and the runtime answers one question at a time, so
`system`/`assistant` turns are refused with that reason rather than silently dropped.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from eyecare_edge.grammar import GrammarError, any_json_grammar, json_schema_grammar
from eyecare_edge.serve.errors import ApiError

# Accepted only at their no-op values (OpenAI clients send some of them by default).
_NOOP_FIELDS: dict[str, tuple] = {
    "n": (1, None),
    "frequency_penalty": (0, 0.0, None),
    "presence_penalty": (0, 0.0, None),
    "logprobs": (False, None),
    "top_logprobs": (None, 0),
    "logit_bias": (None,),
    "tools": (None,),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
}
_IGNORED_FIELDS = {"user", "metadata", "store", "service_tier"}
_KNOWN_FIELDS = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "response_format",
    *_NOOP_FIELDS,
    *_IGNORED_FIELDS,
}
MAX_STOP_STRINGS = 4
FINISH_REASONS = {"eog": "stop", "stop_string": "stop", "max_tokens": "length", "context_full": "length"}


@dataclass
class ChatRequest:
    """What one chat-completions request asks for, validated."""

    model: str
    question: str
    image_urls: list[str]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    grammar: str | None
    response_format: str


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def _int(body: dict, name: str, *, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer, got {type(value).__name__}", name)
    if low is not None and value < low:
        raise _bad(f"'{name}' must be >= {low}, got {value}", name)
    if high is not None and value > high:
        raise _bad(f"'{name}' must be <= {high}, got {value}", name)
    return value


def _float(
    body: dict, name: str, default: float, low: float, high: float, *, low_open: bool = False
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"'{name}' must be a number, got {type(value).__name__}", name)
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        side = f"> {low}" if low_open else f">= {low}"
        raise _bad(f"'{name}' must be {side} and <= {high}, got {value}", name)
    return float(value)


def _content(message: dict, i: int) -> tuple[list[str], list[str]]:
    """Text pieces and image URLs of message `i`."""
    content = message.get("content")
    where = f"messages[{i}].content"
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list) or not content:
        raise _bad(f"'{where}' must be a string or a non-empty list of content parts", where)
    texts, urls = [], []
    for j, part in enumerate(content):
        pw = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise _bad(f"'{pw}' must be an object, got {type(part).__name__}", pw)
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _bad(f"'{pw}.text' must be a string", f"{pw}.text")
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise _bad(f"'{pw}.image_url.url' must be a non-empty string", f"{pw}.image_url")
            urls.append(url)
        else:
            raise _bad(f"'{pw}.type' must be 'text' or 'image_url', got {kind!r}", f"{pw}.type")
    return texts, urls


def _response_format(body: dict) -> tuple[str, str | None]:
    fmt = body.get("response_format")
    if fmt is None:
        return "text", None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise _bad("'response_format' must be an object with a 'type'", "response_format")
    kind = fmt["type"]
    try:
        if kind == "text":
            return kind, None
        if kind == "json_object":
            return kind, any_json_grammar()
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise _bad(
                    "'response_format.json_schema.schema' must be a JSON schema object",
                    "response_format.json_schema",
                )
            return kind, json_schema_grammar(spec["schema"])
    except GrammarError as e:
        raise _bad(f"'response_format': {e}", "response_format") from None
    raise _bad(
        f"'response_format.type' must be text, json_object or json_schema, got {kind!r}",
        "response_format.type",
    )


def parse_chat_request(body: Any, *, model_id: str, max_images: int, max_tokens_limit: int) -> ChatRequest:
    """Validate a decoded JSON body; raise ApiError (400, or 404 for an unknown model)."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - _KNOWN_FIELDS)
    if unknown:
        raise _bad(f"unknown field(s) {', '.join(map(repr, unknown))}", unknown[0])
    for name, allowed in _NOOP_FIELDS.items():
        if name in body and body[name] not in allowed:
            raise _bad(f"'{name}'={body[name]!r} is not supported by this server", name)

    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("'model' is required and must be a string", "model")
    if model != model_id:
        raise ApiError(
            404,
            f"model {model!r} does not exist; this server has {model_id!r}",
            "not_found_error",
            param="model",
        )

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' is required and must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"'messages[{i}]' must be an object with a string 'role'", f"messages[{i}]")
    if len(messages) != 1 or messages[0]["role"] != "user":
        roles = [m["role"] for m in messages]
        raise _bad(
            f"send exactly one 'user' message (got roles {roles}): the bundle carries its own system "
            "prompt and answers one question about its images at a time",
            "messages",
        )
    texts, urls = _content(messages[0], 0)
    question = "\n".join(t for t in texts if t).strip()
    if not question:
        raise _bad("the user message has no text (a question is required)", "messages[0].content")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON may escape half a surrogate pair; it reached the tokenizer
        raise _bad(
            f"the question holds an unpaired UTF-16 surrogate ({question[e.start]!r} at character {e.start})",
            "messages[0].content",
        ) from None
    if len(urls) > max_images:
        raise _bad(
            f"{len(urls)} images in one request; this server takes at most {max_images}",
            "messages[0].content",
        )

    max_tokens = _int(body, "max_completion_tokens", low=1, high=max_tokens_limit)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", low=1, high=max_tokens_limit)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise _bad(f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _bad("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    kind, grammar = _response_format(body)
    return ChatRequest(
        model=model,
        question=question,
        image_urls=urls,
        max_tokens=max_tokens or min(256, max_tokens_limit),
        temperature=_float(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_float(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_int(body, "top_k", low=0) or 0,
        seed=_int(body, "seed", low=0),
        stop=tuple(s for s in stops if s),
        stream=bool(stream),
        include_usage=bool((options or {}).get("include_usage", False)),
        grammar=grammar,
        response_format=kind,
    )


# ---------------------------------------------------------------------- responses


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(answer: Any) -> dict:
    """OpenAI usage plus `visual_tokens` (image embedding rows, counted in prompt_tokens) and
    `cached_image_prefix` (the image prefix came from the KV / prefix cache, not vision + prefill)."""
    prompt = int(answer.n_prompt_tokens)
    completion = int(answer.n_generated)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "visual_tokens": int(answer.n_image_tokens),
        "cached_image_prefix": bool(answer.cached_prefix),
    }


def completion_body(cid: str, created: int, model: str, answer: Any, fingerprint: str) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text},
                "finish_reason": FINISH_REASONS.get(answer.stop_reason, "stop"),
                "logprobs": None,
            }
        ],
        "usage": usage(answer),
    }


def chunk_body(
    cid: str,
    created: int,
    model: str,
    fingerprint: str,
    *,
    delta: dict | None = None,
    finish_reason: str | None = None,
    usage_: dict | None = None,
) -> dict:
    """One `chat.completion.chunk`; a usage-only chunk has no choices (OpenAI's include_usage)."""
    body: dict = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [],
    }
    if delta is not None:
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    if usage_ is not None:
        body["usage"] = usage_
    return body


def now() -> int:
    return int(time.time())


__all__ = ["ChatRequest", "chunk_body", "completion_body", "completion_id", "parse_chat_request", "usage"]
