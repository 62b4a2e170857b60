"""The service's shared vocabulary: time units, key kinds, funding kinds, budget windows, money.

Every package speaks these words (configuration, the API types, the gateway's policy, the store, privacy jobs),
so they are defined once here and imported, never respelled.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Final, Literal

HOUR: Final = 3600
DAY: Final = 86_400

# Inference keys (`sk_`) call /v1; management keys (`mk_`) call /api.
KeyKind = Literal["sk", "mk"]
KEY_KIND_NAMES: Final[dict[str, str]] = {"sk": "an inference key (sk_...)", "mk": "a management key (mk_...)"}

AccountStatus = Literal["active", "disabled", "deleted"]

# How a plan is paid for: "free" (no charge), "subscription" (a Stripe subscription in good standing),
# "credits" (each request's cost debits the account's balance).
Funding = Literal["free", "subscription", "credits"]

# Budget windows: fixed, aligned to the Unix epoch (UTC).
BudgetWindow = Literal["5h", "8h", "1d", "30d"]
BUDGET_WINDOWS: Final[dict[str, int]] = {"5h": 5 * HOUR, "8h": 8 * HOUR, "1d": DAY, "30d": 30 * DAY}


def window_start(window: str, now: float) -> int:
    """Budget windows are fixed and aligned to the Unix epoch (UTC): a 1d window resets at 00:00 UTC, a 5h
    window at every multiple of 5 hours since 1970-01-01T00:00Z, a 30d one every 30 days from then."""
    length = BUDGET_WINDOWS[window]
    return int(now) // length * length


def hour_of(ts: float) -> int:
    """The start of the UTC hour holding `ts` (usage is counted per hour)."""
    return int(ts) // HOUR * HOUR


# Money is integer micro-dollars (USDC has 6 decimals: 1 unit = 1 micro-dollar).
MICRO_PER_USD: Final = 1_000_000


def usd_to_micro(amount: object) -> int:
    """Decimal dollars ("12.5", 12.5, 12) -> integer micro-dollars; refuses more than 6 decimals."""
    try:
        value = Decimal(str(amount))
    except InvalidOperation:
        raise ValueError("amount_usd must be a number") from None
    if not value.is_finite():
        raise ValueError("amount_usd must be a number")
    micro = value * MICRO_PER_USD
    if micro != micro.to_integral_value():
        raise ValueError("amount_usd has more than 6 decimals")
    return int(micro)
