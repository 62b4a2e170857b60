"""HTTP errors in OpenAI's shape: transport errors (`ApiError`), the gateway's refusals mapped to statuses and
headers, and the one function that turns msgspec decode/validation errors into a 400.

Messages never carry request text: msgspec's own messages name types and the field path, but a few
(`Invalid enum value 'x'`) quote the value, so quoted parts are dropped before anything leaves the server.
"""

from __future__ import annotations

import math
import re

import msgspec

from cheapest.api.common import ErrorDetail, ErrorResponse
from cheapest.gateway.admission import RateState
from cheapest.gateway.errors import Refusal

_encode = msgspec.json.Encoder().encode
_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")

STATUS: dict[str, int] = {
    "invalid_request": 400, "unauthenticated": 401, "payment_required": 402, "forbidden": 403, "not_found": 404,
    "conflict": 409, "rate_limited": 429, "model_failed": 500, "upstream_failed": 502, "unavailable": 503,
}


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


def _duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1.5s", "6m0s"."""
    if seconds < 1.0:
        return "0ms" if seconds <= 0.0 else f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60.0:
        return f"{round(seconds, 3):g}s"
    m, s = divmod(seconds, 60.0)
    return f"{int(m)}m{round(s, 3):g}s"


def rate_headers(rate: RateState) -> list[tuple[str, str]]:
    """`x-ratelimit-*`: on every /v1 response."""
    req, tok = rate
    return [
        ("x-ratelimit-limit-requests", str(req.limit)),
        ("x-ratelimit-limit-tokens", str(tok.limit)),
        ("x-ratelimit-remaining-requests", str(req.remaining)),
        ("x-ratelimit-remaining-tokens", str(tok.remaining)),
        ("x-ratelimit-reset-requests", _duration(req.reset_after)),
        ("x-ratelimit-reset-tokens", _duration(tok.reset_after)),
    ]


def refused(refusal: Refusal) -> ApiError:
    """A gateway refusal as an HTTP error: its kind's status, rate-limit and retry headers."""
    headers = rate_headers(refusal.rate) if refusal.rate is not None else []
    if refusal.retry_after is not None:
        headers.append(("retry-after", str(max(1, math.ceil(refusal.retry_after)))))
        if refusal.rate is not None:
            headers.append(("retry-after-ms", str(max(1, math.ceil(refusal.retry_after * 1000)))))
    if refusal.reset_at is not None:
        headers.append(("x-budget-reset", str(refusal.reset_at)))
    return ApiError(STATUS[refusal.kind], refusal.message, refusal.type, refusal.param, refusal.code, headers)


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


def store_full() -> ApiError:
    """The store refused a write for want of room: nothing of this request was written, nothing before is lost."""
    return ApiError(507, "The service cannot store this change right now; retry later.", type="server_error",
                    code="insufficient_storage")


def store_unavailable() -> ApiError:
    """The shared store (PostgreSQL) cannot be reached: nothing was changed; a retry may succeed."""
    return ApiError(503, "The service's store is unreachable right now; nothing was changed. Retry shortly.",
                    type="server_error", code="store_unavailable", headers=[("retry-after", "1")])


def internal_error() -> ApiError:
    return ApiError(500, "The server had an error while processing your request.", type="server_error",
                    code="internal_error")
