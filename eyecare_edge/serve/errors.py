"""The server's one error type, its OpenAI-style JSON body, and reading a request's JSON."""

from __future__ import annotations

import json
from typing import Any

from eyecare_edge.errors import EyecareError


class ApiError(EyecareError):
    """A request the server answers with `status` and `{"error": {"message", "type", ...}}`.

    type follows OpenAI's names where one fits (invalid_request_error, authentication_error,
    rate_limit_exceeded, not_found_error); `param` names the offending field when there is one.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param)


def error_body(message: str, type_: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": None}}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (numbers must be finite)")


def load_json(raw: bytes) -> Any:
    """A request body's JSON, strictly: Python's json accepts NaN/Infinity, which reached the
    sampler as temperature=NaN (an empty answer, 200) or top_p=NaN (500); and a deeply nested
    body raised RecursionError (500). Both are the client's error: 400."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON (nested too deeply)") from None


__all__ = ["ApiError", "error_body", "load_json"]
