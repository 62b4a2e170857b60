"""The OpenAPI 3.1 document, generated from the request/response Structs (built once, served as bytes)."""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec

from cheapest.api import billing, chat, completions, management, models, privacy
from cheapest.api.common import ErrorResponse


class Operation(NamedTuple):
    method: str
    path: str
    summary: str
    request: type | None
    response: type | None
    auth: str | None  # "sk" | "mk" | None
    streams: bool = False


OPERATIONS = [
    Operation("post", "/v1/chat/completions", "Create a chat completion (SSE when stream=true)",
              chat.ChatCompletionRequest, chat.ChatCompletion, "sk", True),
    Operation("post", "/v1/completions", "Create a text completion (SSE when stream=true)",
              completions.CompletionRequest, completions.Completion, "sk", True),
    Operation("get", "/v1/models", "List models", None, models.ModelList, "sk"),
    Operation("get", "/v1/models/{model}", "Retrieve a model", None, models.Model, "sk"),
    Operation("get", "/v1/usage", "The calling key's limits and usage", None, models.KeyUsage, "sk"),
    Operation("post", "/api/keys", "Create an inference key (its secret is shown once)",
              management.CreateKeyRequest, management.CreatedKey, "mk"),
    Operation("get", "/api/keys", "List the account's keys (paginated with limit/after)",
              None, management.KeyList, "mk"),
    Operation("get", "/api/keys/{key_id}", "Retrieve a key's metadata", None, management.KeyInfo, "mk"),
    Operation("patch", "/api/keys/{key_id}", "Change a key's name, limits, expiry or disabled flag",
              management.PatchKeyRequest, management.KeyInfo, "mk"),
    Operation("delete", "/api/keys/{key_id}", "Revoke a key", None, management.Deleted, "mk"),
    Operation("get", "/api/usage", "Usage per key and model (query: from, to, group_by=hour|day)",
              None, management.UsageReport, "mk"),
    Operation("get", "/api/usage/{key_id}", "One key's usage per model (query: from, to, group_by)",
              None, management.UsageReport, "mk"),
    Operation("get", "/api/plans", "The plan catalog: limits, prices, budget windows (no auth)",
              None, billing.PlanList, None),
    Operation("get", "/api/billing/status", "Plan, subscription status, period end, credit balance, keys",
              None, billing.BillingStatus, "mk"),
    Operation("post", "/api/billing/checkout", "A Stripe Checkout session (subscription) for a plan",
              billing.CheckoutRequest, billing.CheckoutResponse, "mk"),
    Operation("post", "/api/billing/topup", "Quote a USDC-on-Base top-up: address, token, amount, claim message",
              billing.TopupRequest, billing.TopupQuote, "mk"),
    Operation("post", "/api/billing/verify-topup", "Credit a confirmed USDC transfer once (202 while confirming)",
              billing.VerifyTopupRequest, billing.TopupCredited, "mk"),
    Operation("post", "/webhooks/stripe", "Stripe events (signed raw body; Stripe-Signature header)",
              None, billing.WebhookAck, None),
    Operation("get", "/api/account/export", "GDPR export: account, keys' metadata, subscription, payments, usage",
              None, privacy.AccountExport, "mk"),
    Operation("delete", "/api/account", "Delete the account: keys stop at once, data purged within 30 days",
              None, privacy.AccountDeleted, "mk"),
    Operation("get", "/healthz", "Liveness", None, models.Health, None),
    Operation("get", "/readyz", "Readiness: the model is loaded", None, models.Health, None),
]

_REF = "#/components/schemas/{name}"


def build_openapi(extra: list[Operation] | None = None) -> dict[str, Any]:
    ops = OPERATIONS + (extra or [])
    types = sorted({t for op in ops for t in (op.request, op.response) if t is not None} | {ErrorResponse},
                   key=lambda t: t.__name__)
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    refs = {t: s for t, s in zip(types, schemas)}
    error = {"description": "Error (OpenAI error shape)",
             "content": {"application/json": {"schema": refs[ErrorResponse]}}}
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        entry: dict[str, Any] = {"summary": op.summary, "operationId": f"{op.method}_{op.path}"}
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in (seg[1:-1] for seg in op.path.split("/") if seg.startswith("{"))
        ]
        if params:
            entry["parameters"] = params
        if op.request is not None:
            entry["requestBody"] = {"required": True, "content": {"application/json": {"schema": refs[op.request]}}}
        content: dict[str, Any] = {"application/json": {"schema": refs[op.response]}} if op.response else {}
        if op.streams:
            content["text/event-stream"] = {"schema": {"type": "string", "description": "SSE chunks, then [DONE]"}}
        entry["responses"] = {"200": {"description": "OK", "content": content}, "default": error}
        if op.auth:
            entry["security"] = [{"inferenceKey" if op.auth == "sk" else "managementKey": []}]
        paths.setdefault(op.path, {})[op.method] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "cheapest", "version": "0.1.0",
                 "description": "Privacy-first, OpenAI-compatible inference for open-source models."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "inferenceKey": {"type": "http", "scheme": "bearer", "description": "sk_ key: /v1/*"},
                "managementKey": {"type": "http", "scheme": "bearer", "description": "mk_ key: /api/*"},
            },
        },
    }
