"""Liveness, readiness and the OpenAPI document."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from cheapest.api.models import Health
from cheapest.server.openapi import build_openapi
from cheapest.server.request import Request, Response, json_response

if TYPE_CHECKING:
    from cheapest.server.state import WorkerState

_encode = msgspec.json.Encoder().encode


async def healthz(state: WorkerState, req: Request) -> Response:
    return json_response(_encode(Health("ok")))


async def readyz(state: WorkerState, req: Request) -> Response:
    engine = state.engine
    if engine is None:
        return json_response(_encode(Health("failed" if state.engine_failed else "loading")), status=503)
    return json_response(_encode(Health("ready", engine.model_id, engine.provider)))


async def openapi(state: WorkerState, req: Request) -> Response:
    if state.openapi is None:
        from cheapest.server.routes import ROUTES  # the table imports this module

        state.openapi = _encode(build_openapi([r for r in ROUTES if r.documented]))
    return json_response(state.openapi)
