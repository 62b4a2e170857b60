"""Payments: Stripe subscriptions and USDC on Base, each credited exactly once.

settings.py       BillingSettings (CHEAPEST_STRIPE_*, CHEAPEST_USDC_*, ...), from_env()
ledger.py         PaymentLedger: LMDB sub-databases, once-only records, balances, subscription state
checkout.py       create_checkout_session(): Stripe Checkout in subscription mode
stripe_events.py  handle_webhook(): signature checks, then each event applied once in any order
usdc.py           topup_quote() / verify_topup(): on-chain verification with web3

Integration notes for the HTTP routes: /work/notes/billing_integration.md.
"""
