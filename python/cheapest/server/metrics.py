"""GET /metrics: the host's Prometheus metrics, for operators (never behind an `sk_` key; see metrics/exposition.py
for who may scrape). Answered 404 when metrics are off or served on their own port."""

from __future__ import annotations

import asyncio
from functools import lru_cache
from typing import TYPE_CHECKING

from cheapest.metrics import metrics
from cheapest.metrics.exposition import ScrapeAccess, render
from cheapest.server.errors import ApiError, not_found
from cheapest.server.request import Request, Response

if TYPE_CHECKING:
    from cheapest.server.state import WorkerState


@lru_cache(maxsize=4)
def _access(allow: tuple[str, ...], token: str) -> ScrapeAccess:
    return ScrapeAccess(allow, token)


def _scrape(accept: str | None) -> tuple[bytes, str] | None:
    directory = metrics.collect()
    return None if directory is None else render(directory, accept)


async def scrape(state: WorkerState, req: Request) -> Response:
    serving = state.settings.serving
    if not serving.metrics or serving.metrics_port:
        raise not_found()
    headers = req.headers
    denied = _access(tuple(serving.metrics_allow), serving.metrics_token).denied(
        req.client, headers.get("authorization"), "forwarded" in headers or "x-forwarded-for" in headers)
    if denied is not None:
        raise ApiError(denied.status, denied.message, "permission_error" if denied.status == 403 else
                       "invalid_request_error", code=denied.code,
                       headers=[("www-authenticate", "Bearer")] if denied.status == 401 else None)
    scraped = await asyncio.to_thread(_scrape, headers.get("accept"))  # file reads: off the event loop
    if scraped is None:
        raise not_found()
    body, content_type = scraped
    return Response(200, [("content-type", content_type), ("cache-control", "no-store")], body)
