"""Liveness, readiness and the OpenAPI document."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qs

import msgspec

from cheapest.api.models import Health, ModelHealth
from cheapest.server.openapi import build_openapi
from cheapest.server.request import Request, Response, json_response

if TYPE_CHECKING:
    from cheapest.server.state import WorkerState

_encode = msgspec.json.Encoder().encode


async def healthz(state: WorkerState, req: Request) -> Response:
    return json_response(_encode(Health("ok")))


async def readyz(state: WorkerState, req: Request) -> Response:
    """200 once every model is ready (`?model=ID`: once that one is); the body lists each model's state."""
    models = state.models
    wanted = parse_qs(req.query).get("model") if req.query else None
    slots = models.slots
    if wanted:
        slot = models.find(wanted[0])
        if slot is None:
            return json_response(_encode(Health("unknown", models=[])), status=404)
        slots = [slot]
    states = [ModelHealth(
        slot.engine.model_id if slot.engine is not None else slot.name, slot.state,
        getattr(slot.engine, "provider", None), getattr(slot.engine, "context_length", None), slot.resident_bytes,
        slot.load_seconds) for slot in slots]
    status = "ready" if all(s.status == "ready" for s in states) else \
        "failed" if any(s.status == "failed" for s in states) else "loading"
    first = states[0] if states else None
    body = Health(status, first.id if first else None, first.provider if first else None, states)
    return json_response(_encode(body), status=200 if status == "ready" else 503)


async def openapi(state: WorkerState, req: Request) -> Response:
    if state.openapi is None:
        from cheapest.server.routes import ROUTES  # the table imports this module

        state.openapi = _encode(build_openapi([r for r in ROUTES if r.documented]))
    return json_response(state.openapi)
