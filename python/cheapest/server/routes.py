"""The route table: every route once - method, path, handler, request and response types, the key it needs -
feeding both the router and `/openapi.json`.

A handler is `async handler(state, request, *path_params)`; when a route names a key kind, the app has
authenticated the request's key (`request.caller`) before the handler runs. Engine plugins may add routes of
their own to a worker's router (`Router.add`); those are left out of the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Literal, NamedTuple

from cheapest.api import anthropic, billing, chat, completions, embeddings, management, models, privacy
from cheapest.server import account, completions as generation, dashboard, health, management as manage, messages, \
    payments
from cheapest.server import embeddings as embedding, metrics
from cheapest.server.errors import method_not_allowed, not_found
from cheapest.vocabulary import KeyKind

if TYPE_CHECKING:
    from cheapest.server.request import Request, Response, StreamResponse

Handler = Callable[..., Awaitable["Response | StreamResponse"]]


class Route(NamedTuple):
    method: str
    path: str  # one trailing `{param}` at most: "/v1/models/{model}"
    handler: Handler
    summary: str
    request: type | None = None  # the JSON body's type
    response: type | None = None  # the 200 body's type
    auth: KeyKind | None = None  # the key the route needs: "sk" (/v1), "mk" (/api), None (public)
    streams: bool = False  # answers SSE when the request asks for a stream
    documented: bool = True  # in /openapi.json
    api: Literal["openai", "anthropic"] = "openai"  # error shape; anthropic routes also take the key in x-api-key


ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/chat/completions", generation.chat_completions,
          "Create a chat completion (SSE when stream=true)", chat.ChatCompletionRequest, chat.ChatCompletion,
          "sk", streams=True),
    Route("POST", "/v1/completions", generation.completions, "Create a text completion (SSE when stream=true)",
          completions.CompletionRequest, completions.Completion, "sk", streams=True),
    Route("POST", "/v1/messages", messages.messages,
          "Create a message: Anthropic's Messages API (SSE events when stream=true)", anthropic.MessagesRequest,
          anthropic.Message, "sk", streams=True, api="anthropic"),
    Route("POST", "/v1/messages/count_tokens", messages.count_tokens,
          "Count a message's input tokens: Anthropic's Messages API", anthropic.CountTokensRequest,
          anthropic.TokenCount, "sk", api="anthropic"),
    Route("POST", "/v1/embeddings", embedding.embeddings, "Create embeddings (float or base64 vectors)",
          embeddings.EmbeddingRequest, embeddings.EmbeddingList, "sk"),
    Route("GET", "/v1/models", generation.list_models, "List models", None, models.ModelList, "sk"),
    Route("GET", "/v1/models/{model}", generation.get_model, "Retrieve a model", None, models.Model, "sk"),
    Route("GET", "/v1/usage", generation.key_usage, "The calling key's limits and usage", None, models.KeyUsage,
          "sk"),
    Route("POST", "/api/keys", manage.create_key, "Create an inference key (its secret is shown once)",
          management.CreateKeyRequest, management.CreatedKey, "mk"),
    Route("GET", "/api/keys", manage.list_keys, "List the account's keys (paginated with limit/after)", None,
          management.KeyList, "mk"),
    Route("GET", "/api/keys/{key_id}", manage.get_key, "Retrieve a key's metadata", None, management.KeyInfo,
          "mk"),
    Route("PATCH", "/api/keys/{key_id}", manage.patch_key, "Change a key's name, limits, expiry or disabled flag",
          management.PatchKeyRequest, management.KeyInfo, "mk"),
    Route("DELETE", "/api/keys/{key_id}", manage.delete_key, "Revoke a key", None, management.Deleted, "mk"),
    Route("POST", "/api/management-keys", manage.create_management_key,
          "Create another management key, e.g. to rotate one (its secret is shown once)",
          management.CreateManagementKeyRequest, management.CreatedKey, "mk"),
    Route("GET", "/api/management-keys", manage.list_management_keys,
          "List the account's management keys (metadata only; paginated with limit/after)", None,
          management.KeyList, "mk"),
    Route("DELETE", "/api/management-keys/{key_id}", manage.delete_management_key,
          "Revoke a management key (never the account's last one)", None, management.Deleted, "mk"),
    Route("GET", "/api/usage", manage.usage, "Usage per key and model (query: from, to, group_by=hour|day)", None,
          management.UsageReport, "mk"),
    Route("GET", "/api/usage/{key_id}", manage.key_usage, "One key's usage per model (query: from, to, group_by)",
          None, management.UsageReport, "mk"),
    Route("GET", "/api/plans", payments.plans, "The plan catalog: limits, prices, budget windows (no auth)", None,
          billing.PlanList),
    Route("GET", "/api/billing/status", payments.status,
          "Plan, subscription status, period end, credit balance, keys", None, billing.BillingStatus, "mk"),
    Route("POST", "/api/billing/checkout", payments.checkout, "A Stripe Checkout session (subscription) for a plan",
          billing.CheckoutRequest, billing.CheckoutResponse, "mk"),
    Route("POST", "/api/billing/topup", payments.topup,
          "Quote a USDC-on-Base top-up: address, token, amount, claim message", billing.TopupRequest,
          billing.TopupQuote, "mk"),
    Route("POST", "/api/billing/verify-topup", payments.verify_topup,
          "Credit a confirmed USDC transfer once (202 while confirming)", billing.VerifyTopupRequest,
          billing.TopupCredited, "mk"),
    Route("POST", "/webhooks/stripe", payments.stripe_webhook,
          "Stripe events (signed raw body; Stripe-Signature header)", None, billing.WebhookAck),
    Route("GET", "/api/account/export", account.export,
          "GDPR export: account, keys' metadata, subscription, payments, usage", None, privacy.AccountExport, "mk"),
    Route("DELETE", "/api/account", account.delete,
          "Delete the account: keys stop at once, data purged within 30 days", None, privacy.AccountDeleted, "mk"),
    Route("GET", "/healthz", health.healthz, "Liveness", None, models.Health),
    Route("GET", "/readyz", health.readyz, "Readiness: every model is loaded (?model=ID: that one); each model's state",
          None, models.Health),
    Route("GET", "/openapi.json", health.openapi, "This document", documented=False),
    Route("GET", "/metrics", metrics.scrape, "Prometheus metrics for operators (allow-list or metrics token)",
          documented=False),
    Route("GET", "/dashboard", dashboard.asset, "The account owners' dashboard (a web page)", documented=False),
    Route("GET", "/dashboard/", dashboard.asset, "The account owners' dashboard (a web page)", documented=False),
    Route("GET", "/dashboard/{asset}", dashboard.asset, "The dashboard's scripts, styles and icon",
          documented=False),
)


class Router:
    """Exact paths first, then paths with one trailing parameter (`/v1/models/` + id): two dict lookups."""

    def __init__(self, routes: Iterable[Route] = ROUTES) -> None:
        self.routes: list[Route] = []
        self._exact: dict[str, dict[str, Route]] = {}
        self._prefixed: dict[str, dict[str, Route]] = {}
        for r in routes:
            self.add(r)

    def add(self, route: Route) -> None:
        if route.path.endswith("}"):
            prefix = route.path[: route.path.rindex("{")]
            self._prefixed.setdefault(prefix, {})[route.method] = route
        else:
            self._exact.setdefault(route.path, {})[route.method] = route
        self.routes.append(route)

    def match(self, method: str, path: str) -> tuple[Route, tuple[str, ...]]:
        methods = self._exact.get(path)
        args: tuple[str, ...] = ()
        if methods is None:
            prefix, _, tail = path.rpartition("/")
            methods = self._prefixed.get(prefix + "/") if tail else None
            if methods is None:
                raise not_found()
            args = (tail,)
        route = methods.get(method)
        if route is None:
            raise method_not_allowed()
        return route, args
