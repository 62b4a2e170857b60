"""Plans and billing: GET /api/plans (no auth), GET /api/billing/status, Stripe checkout and webhooks,
USDC top-ups. Money is integer micro-dollars (`*_micro`); `*_usd` fields are the same amount for reading."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from cheapest.billing.usdc import TopupCredited, TopupQuote
from cheapest.vocabulary import BUDGET_WINDOWS, BudgetWindow, Funding

__all__ = [
    "BillingStatus", "CheckoutRequest", "CheckoutResponse", "PlanInfo", "PlanList", "TopupCredited", "TopupPending",
    "TopupQuote", "TopupRequest", "VerifyTopupRequest", "WebhookAck",
]


class PlanInfo(msgspec.Struct, frozen=True):
    """Limits apply to the account, across all its keys (a key's own limits apply inside them); `max_keys`: the
    live keys it may hold; `funding`: free (no charge), subscription (monthly, Stripe), credits (each request's
    cost debits the account's balance; an empty balance gets 402)."""

    name: str
    rpm: int
    tpm: int
    price_usd_month: float
    funding: Funding
    default: bool
    budget_usd: float | None = None
    budget_window: BudgetWindow | None = None
    max_keys: int = 1000
    # the windows a key's own budget may use
    budget_windows: list[str] = msgspec.field(default_factory=lambda: list(BUDGET_WINDOWS))


class ModelPrice(msgspec.Struct, frozen=True):
    model: str
    prompt_usd_per_mtok: float
    completion_usd_per_mtok: float


class PlanList(msgspec.Struct, frozen=True):
    data: list[PlanInfo]
    prices: list[ModelPrice] = []
    object: Literal["list"] = "list"


class BillingStatus(msgspec.Struct, frozen=True):
    account_id: str
    plan: str
    funding: Funding
    subscription_status: str  # none (no subscription) / active / past_due / expired / canceled / ...
    credit_balance_micro: int
    credit_balance_usd: float
    keys: int  # inference keys (sk_) the account holds
    active_keys: int  # ... of which neither disabled nor expired
    period_end: int | None = None
    object: Literal["billing_status"] = "billing_status"


class CheckoutRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    plan: Annotated[str, Meta(min_length=1, max_length=100)]


class CheckoutResponse(msgspec.Struct, frozen=True):
    id: str
    url: str
    object: Literal["checkout.session"] = "checkout.session"


class TopupRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`amount_usd`: a number or a decimal string, at most 6 decimals (USDC's precision)."""

    amount_usd: Decimal
    method: Literal["usdc", "card"] = "usdc"


class VerifyTopupRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`signature`: EIP-191 personal_sign, by the sending wallet, of the quote's claim_message with {tx_hash}
    replaced by this hash (0x + 64 hex, lower case)."""

    tx_hash: Annotated[str, Meta(max_length=200)]
    signature: Annotated[str, Meta(max_length=300)]


class TopupPending(msgspec.Struct, frozen=True):
    """202: seen, not confirmed enough yet; nothing credited. Call again after `retry_after` seconds."""

    tx_hash: str
    confirmations: int
    required: int
    retry_after: int
    status: Literal["pending"] = "pending"
    object: Literal["topup"] = "topup"


class WebhookAck(msgspec.Struct, frozen=True):
    received: bool = True


_ = (TopupCredited, TopupQuote)  # re-exported response types of the billing routes
