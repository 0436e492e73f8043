"""The server's one error type and its OpenAI-style JSON body."""

from __future__ import annotations


class ApiError(Exception):
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


__all__ = ["ApiError", "error_body"]
