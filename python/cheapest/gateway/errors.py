"""Refusals: why the gateway said no, in words any transport can encode.

A `Refusal` carries OpenAI's error fields (`message`, `type`, `code`, `param`) and, for a rate or budget refusal,
when to retry. Its class says what kind of refusal it is; the transport maps each class to a status code (the
HTTP server: 400, 401, 402, 403, 404, 409, 429, 500, 502, 503). Messages never carry request text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cheapest.gateway.admission import RateState


class Refusal(Exception):
    default_type = "invalid_request_error"

    def __init__(self, message: str, *, code: str, type: str | None = None, param: str | None = None,
                 retry_after: float | None = None, rate: RateState | None = None,
                 reset_at: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.type = type or self.default_type
        self.param = param
        self.retry_after = retry_after  # seconds until a retry can succeed
        self.rate = rate  # the caller's rate-limit state, when the refusal is about it
        self.reset_at = reset_at  # unix seconds at which a spent budget resets


class InvalidRequest(Refusal):
    """The request cannot be served as asked (a bad value, a prompt too long for the model)."""


class Unauthenticated(Refusal):
    """No usable key: missing, malformed, unknown, or of a deleted account."""


class PaymentRequired(Refusal):
    """A credit-funded account whose balance is used up."""

    default_type = "insufficient_quota"


class Forbidden(Refusal):
    """A known key that may not do this: wrong kind, disabled, expired, or a lapsed subscription."""

    default_type = "permission_error"


class NotFound(Refusal):
    """No such object for this caller (another account's objects read as missing too)."""


class Conflict(Refusal):
    """The thing asked for belongs to someone else (a transfer another account claimed)."""


class RateLimited(Refusal):
    """A rate limit or a budget window is spent; `retry_after` says when to come back."""


class ModelFailed(Refusal):
    """The model failed while generating; the message is generic."""

    default_type = "server_error"


class UpstreamFailed(Refusal):
    """A payment provider or chain node answered with an error."""

    default_type = "server_error"


class Unavailable(Refusal):
    """Not possible right now: the model is loading, a payment method is not configured, a node is unreachable."""

    default_type = "server_error"
