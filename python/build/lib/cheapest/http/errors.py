"""HTTP errors in OpenAI's shape, and the one function that turns msgspec decode/validation errors into them.

Messages never carry request text: msgspec's own messages name types and the field path, but a few
(`Invalid enum value 'x'`) quote the value, so quoted parts are dropped before anything leaves the server.
"""

from __future__ import annotations

import re

import msgspec

from cheapest.api.common import ErrorDetail, ErrorResponse

_encode = msgspec.json.Encoder().encode
_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


class ApiError(Exception):
    """An error response; raise it from a handler. `message` must never contain request text."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or []

    def body(self) -> bytes:
        return _encode(ErrorResponse(ErrorDetail(self.message, self.type, self.param, self.code)))


def decode_error(exc: msgspec.DecodeError) -> ApiError:
    """msgspec.DecodeError / ValidationError -> a 400 naming the field path, never the value."""
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return ApiError(400, "We could not parse the JSON body of your request. " + _QUOTED.sub("", text).strip(),
                        code="invalid_json")
    m = _PATH.search(text)
    path = m.group("path").lstrip(".") if m else ""
    reason = _QUOTED.sub("", text[: m.start()] if m else text).replace("  ", " ").strip()
    if path:
        return ApiError(400, f"Invalid request body at `{path}`: {reason}", param=path, code="invalid_value")
    return ApiError(400, f"Invalid request body: {reason}", code="invalid_value")


def not_found() -> ApiError:
    return ApiError(404, "Unknown route.", code="not_found")


def method_not_allowed() -> ApiError:
    return ApiError(405, "Method not allowed on this route.", code="method_not_allowed")


def internal_error() -> ApiError:
    return ApiError(500, "The server had an error while processing your request.", type="server_error",
                    code="internal_error")
