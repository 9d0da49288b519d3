"""OpenAI-shaped error responses."""

from __future__ import annotations

import re

import msgspec
from starlette.responses import JSONResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}
        if status in (429, 503):
            self.headers.setdefault("Retry-After", "1")

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.status,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_PATH = re.compile(r"at `\$\.?([^`]*)`")
_UNKNOWN = re.compile(r"unknown field `([^`]*)`")


def from_validation(err: msgspec.MsgspecError) -> APIError:
    """Turn msgspec's decode/validation message into a 400 that names the field."""
    text = str(err)
    found = _UNKNOWN.search(text)
    if found:
        prefix = _PATH.search(text)
        name = ".".join(p for p in ((prefix.group(1) if prefix else ""), found.group(1)) if p)
        return APIError(
            400, f"unsupported field '{name}': not an option of this endpoint", param=name
        )
    found = _PATH.search(text)
    param = found.group(1) if found else None
    if isinstance(err, msgspec.DecodeError) and param is None:
        return APIError(400, f"request body is not valid JSON: {text}")
    return APIError(400, f"invalid request: {text}", param=param)
