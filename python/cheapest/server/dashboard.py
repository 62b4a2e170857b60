"""The account owners' dashboard: its static assets (cheapest/dashboard) under `/dashboard`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cheapest import dashboard
from cheapest.server.request import Request, Response

if TYPE_CHECKING:
    from cheapest.server.state import WorkerState


async def asset(state: WorkerState, req: Request, name: str = dashboard.INDEX) -> Response:
    return Response(*dashboard.serve_asset(name, req.headers.get("if-none-match")))
