"""Plans and billing routes: the plan catalog, billing status, Stripe checkout and webhooks, USDC top-ups.

Each handler parses the request, calls the gateway's payments, and encodes the answer. Stripe's API, the chain
node's JSON-RPC and the ledger's writes block, so those calls run in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import msgspec

from cheapest.api.billing import CheckoutRequest, TopupPending, TopupRequest, VerifyTopupRequest, WebhookAck
from cheapest.gateway.payments import plan_list
from cheapest.server.management import account_of, decode_body
from cheapest.server.request import Request, Response, json_response

if TYPE_CHECKING:
    from cheapest.server.state import WorkerState

_encode = msgspec.json.Encoder().encode
_checkout_decoder = msgspec.json.Decoder(CheckoutRequest)
_topup_decoder = msgspec.json.Decoder(TopupRequest)
_verify_decoder = msgspec.json.Decoder(VerifyTopupRequest)


async def plans(state: WorkerState, req: Request) -> Response:
    """No authentication: the catalog is public. Encoded once per worker (settings never change at run time)."""
    if state.plans is None:
        state.plans = _encode(plan_list(state.settings))
    return json_response(state.plans)


async def status(state: WorkerState, req: Request) -> Response:
    return json_response(_encode(await asyncio.to_thread(state.gateway.payments.status, account_of(req))))


async def checkout(state: WorkerState, req: Request) -> Response:
    body: CheckoutRequest = await decode_body(state, req, _checkout_decoder)
    session = await asyncio.to_thread(state.gateway.payments.checkout, account_of(req), body.plan)
    return json_response(_encode(session))


async def stripe_webhook(state: WorkerState, req: Request) -> Response:
    """No API key: Stripe's signature over the RAW body authenticates it."""
    raw = await req.body(state.settings.serving.max_body_bytes)
    await asyncio.to_thread(state.gateway.payments.webhook, raw, req.headers.get("stripe-signature"))
    return json_response(_encode(WebhookAck()))


async def topup(state: WorkerState, req: Request) -> Response:
    body: TopupRequest = await decode_body(state, req, _topup_decoder)
    payments = state.gateway.payments
    quote = await asyncio.get_running_loop().run_in_executor(
        payments.chain_pool, payments.topup_quote, account_of(req), body.amount_usd, body.method)
    return json_response(_encode(quote))


async def verify_topup(state: WorkerState, req: Request) -> Response:
    """In the chain's own threads: a slow node delays top-ups only, never webhooks or GDPR requests."""
    body: VerifyTopupRequest = await decode_body(state, req, _verify_decoder)
    payments = state.gateway.payments
    await payments.admit_topup_check(account_of(req))
    result = await asyncio.get_running_loop().run_in_executor(
        payments.chain_pool, payments.verify_topup, account_of(req), body.tx_hash, body.signature)
    if isinstance(result, TopupPending):
        return json_response(_encode(result), [("retry-after", str(result.retry_after))], status=202)
    return json_response(_encode(result))
