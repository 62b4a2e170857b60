"""Billing configuration: Stripe and USDC on Base, read once at start.

Environment variables (all optional; a payment method whose secrets are
missing is simply unavailable, see `BillingNotConfigured`):

  CHEAPEST_STRIPE_SECRET_KEY       Stripe secret key (sk_live_... / sk_test_...).
  CHEAPEST_STRIPE_WEBHOOK_SECRET   the webhook endpoint's signing secret (whsec_...).
  CHEAPEST_STRIPE_PRICE_<PLAN>     Stripe price id for plan <plan> (lower-cased),
                                   e.g. CHEAPEST_STRIPE_PRICE_STANDARD=price_123.
  CHEAPEST_STRIPE_API_BASE         Stripe API base URL (default https://api.stripe.com;
                                   tests point it at a loopback server).
  CHEAPEST_STRIPE_SUCCESS_URL      where Checkout returns after payment
  CHEAPEST_STRIPE_CANCEL_URL       ... and after cancelling (both default under
                                   CHEAPEST_PUBLIC_URL, default http://127.0.0.1:8000).
  CHEAPEST_BASE_RPC_URL            Base JSON-RPC endpoint (default https://mainnet.base.org).
  CHEAPEST_USDC_CONTRACT           USDC token contract (default: USDC on Base).
  CHEAPEST_USDC_RECEIVER           address that receives top-ups (no default).
  CHEAPEST_CHAIN_ID                expected chain id (default 8453, Base mainnet).
  CHEAPEST_USDC_CONFIRMATIONS      blocks on top of the transfer's, inclusive (default 12).
  CHEAPEST_USDC_MIN_TOPUP_USD      smallest top-up quoted (default 1).
  CHEAPEST_USDC_MAX_TOPUP_USD      largest top-up quoted (default 10000).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation

import msgspec

__all__ = ["BASE_USDC", "BillingNotConfigured", "BillingSettings"]

BASE_USDC = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
_PRICE_PREFIX = "CHEAPEST_STRIPE_PRICE_"


class BillingNotConfigured(RuntimeError):
    """A payment method was asked for but its configuration is missing (a 503, not a client error)."""


class BillingSettings(msgspec.Struct, frozen=True, kw_only=True):
    stripe_secret_key: str | None = None
    stripe_webhook_secret: str | None = None
    stripe_prices: dict[str, str] = {}
    stripe_api_base: str = "https://api.stripe.com"
    stripe_success_url: str = "http://127.0.0.1:8000/billing/success?session_id={CHECKOUT_SESSION_ID}"
    stripe_cancel_url: str = "http://127.0.0.1:8000/billing/cancel"
    # Stripe allows old timestamps up to this many seconds (SDK check); we also refuse ones this far ahead.
    stripe_tolerance_s: int = 300
    base_rpc_url: str = "https://mainnet.base.org"
    usdc_contract: str = BASE_USDC
    usdc_receiver: str | None = None
    chain_id: int = 8453
    usdc_confirmations: int = 12
    usdc_min_topup_micro: int = 1_000_000
    usdc_max_topup_micro: int = 10_000_000_000
    block_time_s: float = 2.0  # Base produces a block every 2 s; sizes Retry-After while confirming

    def __post_init__(self) -> None:
        from eth_utils import is_address, to_checksum_address

        for name in ("usdc_contract", "usdc_receiver"):
            value = getattr(self, name)
            if value is None:
                continue
            if not is_address(value):
                raise ValueError(f"{name} is not an EVM address")
            # Frozen Struct: normalise once here so comparisons later are plain string equality.
            msgspec.structs.force_setattr(self, name, to_checksum_address(value))
        if self.usdc_confirmations < 1:
            raise ValueError("usdc_confirmations must be at least 1")
        if not 0 < self.usdc_min_topup_micro <= self.usdc_max_topup_micro:
            raise ValueError("top-up bounds must satisfy 0 < min <= max")

    @property
    def plan_for_price(self) -> dict[str, str]:
        return {price: plan for plan, price in self.stripe_prices.items()}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> BillingSettings:
        env = os.environ if environ is None else environ
        public = env.get("CHEAPEST_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")
        prices = {k[len(_PRICE_PREFIX):].lower(): v for k, v in env.items() if k.startswith(_PRICE_PREFIX) and v}
        kwargs: dict[str, object] = {
            "stripe_secret_key": env.get("CHEAPEST_STRIPE_SECRET_KEY") or None,
            "stripe_webhook_secret": env.get("CHEAPEST_STRIPE_WEBHOOK_SECRET") or None,
            "stripe_prices": prices,
            "stripe_api_base": env.get("CHEAPEST_STRIPE_API_BASE", "https://api.stripe.com").rstrip("/"),
            "stripe_success_url": env.get(
                "CHEAPEST_STRIPE_SUCCESS_URL", public + "/billing/success?session_id={CHECKOUT_SESSION_ID}"
            ),
            "stripe_cancel_url": env.get("CHEAPEST_STRIPE_CANCEL_URL", public + "/billing/cancel"),
            "base_rpc_url": env.get("CHEAPEST_BASE_RPC_URL", "https://mainnet.base.org"),
            "usdc_contract": env.get("CHEAPEST_USDC_CONTRACT", BASE_USDC),
            "usdc_receiver": env.get("CHEAPEST_USDC_RECEIVER") or None,
            "chain_id": _int(env, "CHEAPEST_CHAIN_ID", 8453),
            "usdc_confirmations": _int(env, "CHEAPEST_USDC_CONFIRMATIONS", 12),
            "usdc_min_topup_micro": _usd(env, "CHEAPEST_USDC_MIN_TOPUP_USD", 1_000_000),
            "usdc_max_topup_micro": _usd(env, "CHEAPEST_USDC_MAX_TOPUP_USD", 10_000_000_000),
        }
        try:
            return cls(**kwargs)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"billing configuration: {exc}") from None


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer") from None


def usd_to_micro(amount: object) -> int:
    """Decimal dollars ("12.5", 12.5, 12) -> integer micro-dollars; refuses more than 6 decimals."""
    try:
        value = Decimal(str(amount))
    except InvalidOperation:
        raise ValueError("amount_usd must be a number") from None
    if not value.is_finite():
        raise ValueError("amount_usd must be a number")
    micro = value * 1_000_000
    if micro != micro.to_integral_value():
        raise ValueError("amount_usd has more than 6 decimals")
    return int(micro)


def _usd(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return usd_to_micro(raw)
    except ValueError:
        raise ValueError(f"{name} must be a dollar amount") from None
