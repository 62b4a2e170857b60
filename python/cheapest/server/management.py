"""The Management API (mk_ keys): /api/keys and /api/usage. Each handler parses the request, calls the
gateway's key manager or usage reports, and encodes the answer."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import msgspec

from cheapest.api.management import CreateKeyRequest, PatchKeyRequest
from cheapest.gateway.usage import usage_report
from cheapest.server.errors import ApiError, decode_error
from cheapest.server.request import Request, Response, json_response
from cheapest.store import AccountRecord

if TYPE_CHECKING:
    from cheapest.server.state import WorkerState

_encode = msgspec.json.Encoder().encode
_create_decoder = msgspec.json.Decoder(CreateKeyRequest)
_patch_decoder = msgspec.json.Decoder(PatchKeyRequest)


def account_of(req: Request) -> AccountRecord:
    """The account behind the request's (already authenticated) management key."""
    assert req.caller is not None
    return req.caller.account


async def decode_body(state: WorkerState, req: Request, decoder: msgspec.json.Decoder[Any]) -> Any:
    body = await req.body(state.settings.serving.max_body_bytes)
    if not body.strip():
        raise ApiError(400, "This route needs a JSON body.", code="invalid_json")
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise decode_error(exc) from None


def _int_param(q: dict[str, list[str]], name: str, default: int) -> int:
    try:
        return int(q.get(name, [str(default)])[0])
    except ValueError:
        raise ApiError(400, f"`{name}` must be an integer.", param=name, code="invalid_value") from None


def _time_param(q: dict[str, list[str]], name: str) -> int | None:
    """Unix seconds or an ISO 8601 date/time (UTC when it names no zone)."""
    raw = q.get(name, [None])[0]
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(raw)
    except ValueError:
        raise ApiError(400, f"`{name}` must be unix seconds or an ISO 8601 date/time.", param=name,
                       code="invalid_value") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp())


# --- /api/keys ----------------------------------------------------------------------------------------------
async def create_key(state: WorkerState, req: Request) -> Response:
    body: CreateKeyRequest = await decode_body(state, req, _create_decoder)
    return json_response(_encode(state.gateway.keys.create(account_of(req), body)), status=201)


async def list_keys(state: WorkerState, req: Request) -> Response:
    q = parse_qs(req.query)
    page = state.gateway.keys.page(account_of(req), _int_param(q, "limit", 20), q.get("after", [None])[0])
    return json_response(_encode(page))


async def get_key(state: WorkerState, req: Request, key_id: str) -> Response:
    return json_response(_encode(state.gateway.keys.get(account_of(req), key_id)))


async def patch_key(state: WorkerState, req: Request, key_id: str) -> Response:
    body: PatchKeyRequest = await decode_body(state, req, _patch_decoder)
    return json_response(_encode(state.gateway.keys.patch(account_of(req), key_id, body)))


async def delete_key(state: WorkerState, req: Request, key_id: str) -> Response:
    return json_response(_encode(state.gateway.keys.revoke(account_of(req), key_id)))


# --- /api/usage ---------------------------------------------------------------------------------------------
def _report(state: WorkerState, req: Request, key_ids: list[str]) -> Response:
    q = parse_qs(req.query)
    report = usage_report(state.store, key_ids, _time_param(q, "from"), _time_param(q, "to"),
                          q.get("group_by", ["day"])[0], int(time.time()))
    return json_response(_encode(report))


async def usage(state: WorkerState, req: Request) -> Response:
    return _report(state, req, state.gateway.keys.history(account_of(req)))


async def key_usage(state: WorkerState, req: Request, key_id: str) -> Response:
    return _report(state, req, state.gateway.keys.history(account_of(req), key_id))
