"""Payments: Stripe subscriptions and USDC on Base, each credited exactly once through the store's ledger.

checkout.py       create_checkout_session(): Stripe Checkout in subscription mode
stripe_events.py  handle_webhook(): signature checks, then each event applied once in any order
usdc.py           topup_quote() / verify_topup(): on-chain verification with web3
"""


class BillingNotConfigured(RuntimeError):
    """A payment method was asked for but its configuration is missing (a 503, not a client error)."""
