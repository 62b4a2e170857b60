"""Refusals: why the gateway said no, in words any transport can encode.

A `Refusal` carries its `kind`, OpenAI's error fields (`message`, `type`, `code`, `param`) and, for a rate or
budget refusal, when to retry. The transport maps each kind to a status code (the HTTP server: 400, 401, 402,
403, 404, 409, 429, 500, 502, 503). Messages never carry request text. The kinds:

  invalid_request    the request cannot be served as asked (a bad value, a prompt too long for the model)
  unauthenticated    no usable key: missing, malformed, unknown, or of a deleted account
  payment_required   a credit-funded account whose balance is used up
  forbidden          a known key that may not do this: wrong kind, disabled, expired, a lapsed subscription
  not_found          no such object for this caller (another account's objects read as missing too)
  conflict           the thing asked for belongs to someone else (a transfer another account claimed)
  rate_limited       a rate limit or a budget window is spent; `retry_after` says when to come back
  model_failed       the model failed while generating (a generic message)
  upstream_failed    a payment provider or chain node answered with an error
  unavailable        not possible right now: the model is loading, a payment method is not configured, a node
                     is unreachable
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from cheapest.gateway.admission import RateState

RefusalKind = Literal["invalid_request", "unauthenticated", "payment_required", "forbidden", "not_found",
                      "conflict", "rate_limited", "model_failed", "upstream_failed", "unavailable"]

# OpenAI's error `type` for each kind, unless the refusal names its own.
DEFAULT_TYPE: dict[str, str] = {
    "payment_required": "insufficient_quota", "forbidden": "permission_error", "model_failed": "server_error",
    "upstream_failed": "server_error", "unavailable": "server_error",
}


class Refusal(Exception):
    def __init__(self, kind: RefusalKind, message: str, *, code: str, type: str | None = None,
                 param: str | None = None, retry_after: float | None = None, rate: RateState | None = None,
                 reset_at: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.code = code
        self.type = type or DEFAULT_TYPE.get(kind, "invalid_request_error")
        self.param = param
        self.retry_after = retry_after  # seconds until a retry can succeed
        self.rate = rate  # the caller's rate-limit state, when the refusal is about it
        self.reset_at = reset_at  # unix seconds at which a spent budget resets
