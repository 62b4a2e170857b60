"""Admission by requests and tokens per minute, shared by all workers through the core's GCRA table.

TPM is charged at admission as prompt tokens + max_tokens (capped at the limit, so a large max_tokens is not
refused forever) and corrected with `adjust()` once the real completion length is known.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from cheapest.config import Settings
from cheapest.http.errors import ApiError
from cheapest.store import AccountRecord, KeyRecord

PERIOD = 60.0


class Limits(NamedTuple):
    rpm: int
    tpm: int
    # The limiter's table keys for this key ("rpm:<key id>", "tpm:<key id>"), built with the limits (which
    # /v1 caches per authenticated key) rather than per call.
    rpm_name: str = ""
    tpm_name: str = ""


def limits_for(settings: Settings, account: AccountRecord, key: KeyRecord) -> Limits:
    plan = settings.plan(account.plan)
    rpm, tpm = plan.rpm, plan.tpm
    kl = key.limits
    if kl.rpm is not None and kl.rpm < rpm:
        rpm = kl.rpm
    if kl.tpm is not None and kl.tpm < tpm:
        tpm = kl.tpm
    return Limits(rpm, tpm, "rpm:" + key.id, "tpm:" + key.id)


def _duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1.5s", "6m0s"."""
    if seconds < 1.0:
        return "0ms" if seconds <= 0.0 else f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60.0:
        return f"{round(seconds, 3):g}s"
    m, s = divmod(seconds, 60.0)
    return f"{int(m)}m{round(s, 3):g}s"


def rate_headers(req: Any, tok: Any) -> list[tuple[str, str]]:
    return [
        ("x-ratelimit-limit-requests", str(req.limit)),
        ("x-ratelimit-limit-tokens", str(tok.limit)),
        ("x-ratelimit-remaining-requests", str(req.remaining)),
        ("x-ratelimit-remaining-tokens", str(tok.remaining)),
        ("x-ratelimit-reset-requests", _duration(req.reset_after)),
        ("x-ratelimit-reset-tokens", _duration(tok.reset_after)),
    ]


class Admission:
    __slots__ = ("headers", "charged_tokens")

    def __init__(self, headers: list[tuple[str, str]], charged_tokens: int) -> None:
        self.headers = headers
        self.charged_tokens = charged_tokens


def peek(limiter: Any, key_id: str, limits: Limits) -> list[tuple[str, str]]:
    return rate_headers(limiter.peek(limits.rpm_name or "rpm:" + key_id, limits.rpm, PERIOD),
                        limiter.peek(limits.tpm_name or "tpm:" + key_id, limits.tpm, PERIOD))


def admit(limiter: Any, key_id: str, limits: Limits, prompt_tokens: int, max_tokens: int) -> Admission:
    """Charge one request and its token estimate, all or nothing; raise a 429 ApiError when refused."""
    if prompt_tokens > limits.tpm:
        headers = peek(limiter, key_id, limits)
        raise ApiError(429, f"Request too large: {prompt_tokens} prompt tokens exceed this key's limit of "
                       f"{limits.tpm} tokens per minute.", type="tokens", code="rate_limit_exceeded",
                       headers=headers)
    charge = prompt_tokens + max_tokens
    if charge > limits.tpm:
        charge = limits.tpm
    req, tok = limiter.acquire_all([(limits.rpm_name or "rpm:" + key_id, limits.rpm, PERIOD, 1),
                                    (limits.tpm_name or "tpm:" + key_id, limits.tpm, PERIOD, charge)])
    headers = rate_headers(req, tok)
    if req.allowed and tok.allowed:
        return Admission(headers, charge)
    retry = max(req.retry_after, tok.retry_after)
    headers.append(("retry-after", str(max(1, math.ceil(retry)))))
    headers.append(("retry-after-ms", str(max(1, math.ceil(retry * 1000)))))
    if not req.allowed:
        msg, typ = f"Rate limit reached: {limits.rpm} requests per minute. Retry in {retry:.1f}s.", "requests"
    else:
        msg, typ = f"Rate limit reached: {limits.tpm} tokens per minute. Retry in {retry:.1f}s.", "tokens"
    raise ApiError(429, msg, type=typ, code="rate_limit_exceeded", headers=headers)


def settle(limiter: Any, key_id: str, limits: Limits, charged: int, used: int) -> None:
    """Correct the TPM charge to the tokens really used (prompt + completion)."""
    if used != charged:
        limiter.adjust(limits.tpm_name or "tpm:" + key_id, limits.tpm, PERIOD, used - charged)
