"""The Management API (mk_ keys): /api/keys, /api/management-keys and /api/usage. Each handler parses the
request, calls the gateway's key manager or usage reports, and encodes the answer. Key changes are store writes
(an fsync each) and reports read many rows: they run in a thread, never on the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import msgspec

from cheapest.api.management import CreatedKey, CreateKeyRequest, CreateManagementKeyRequest, PatchKeyRequest
from cheapest.gateway.usage import usage_report
from cheapest.server.errors import ApiError, decode_error
from cheapest.server.request import Request, Response, json_response
from cheapest.store import AccountRecord
from cheapest.vocabulary import KeyKind

if TYPE_CHECKING:
    from cheapest.server.state import WorkerState

_encode = msgspec.json.Encoder().encode
_create_decoder = msgspec.json.Decoder(CreateKeyRequest)
_patch_decoder = msgspec.json.Decoder(PatchKeyRequest)
_create_mk_decoder = msgspec.json.Decoder(CreateManagementKeyRequest)
# Unix seconds the API takes: from 1970 to the end of year 9999 (what ISO 8601 dates can name).
MAX_TIME = 253_402_300_799


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


def _after_param(q: dict[str, list[str]]) -> str | None:
    after = q.get("after", [None])[0]
    if after is not None and len(after) > 64:
        raise ApiError(400, "`after` must be a key id.", param="after", code="invalid_value")
    return after


def _time_param(q: dict[str, list[str]], name: str) -> int | None:
    """Unix seconds or an ISO 8601 date/time (UTC when it names no zone)."""
    raw = q.get(name, [None])[0]
    if raw is None or raw == "":
        return None
    invalid = ApiError(400, f"`{name}` must be unix seconds (0 to {MAX_TIME}) or an ISO 8601 date/time.",
                       param=name, code="invalid_value")
    try:
        value = int(raw)
    except ValueError:
        try:
            dt = datetime.fromisoformat(raw)
        except ValueError:
            raise invalid from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        value = int(dt.timestamp())
    if not 0 <= value <= MAX_TIME:
        raise invalid
    return value


# --- /api/keys and /api/management-keys ----------------------------------------------------------------------
async def create_key(state: WorkerState, req: Request) -> Response:
    return await _create(state, req, _create_decoder, state.gateway.keys.create)


async def list_keys(state: WorkerState, req: Request) -> Response:
    return await _list(state, req, "sk")


async def get_key(state: WorkerState, req: Request, key_id: str) -> Response:
    return json_response(_encode(state.gateway.keys.get(account_of(req), key_id)))


async def patch_key(state: WorkerState, req: Request, key_id: str) -> Response:
    body: PatchKeyRequest = await decode_body(state, req, _patch_decoder)
    return json_response(_encode(await asyncio.to_thread(state.gateway.keys.patch, account_of(req), key_id, body)))


async def delete_key(state: WorkerState, req: Request, key_id: str) -> Response:
    return json_response(_encode(await asyncio.to_thread(state.gateway.keys.revoke, account_of(req), key_id)))


async def create_management_key(state: WorkerState, req: Request) -> Response:
    return await _create(state, req, _create_mk_decoder, state.gateway.keys.create_management)


async def list_management_keys(state: WorkerState, req: Request) -> Response:
    return await _list(state, req, "mk")


async def delete_management_key(state: WorkerState, req: Request, key_id: str) -> Response:
    deleted = await asyncio.to_thread(state.gateway.keys.revoke, account_of(req), key_id, "mk")
    return json_response(_encode(deleted))


async def _create(state: WorkerState, req: Request, decoder: msgspec.json.Decoder[Any],
                  create: Callable[[AccountRecord, Any], Awaitable[CreatedKey]]) -> Response:
    body = await decode_body(state, req, decoder)
    return json_response(_encode(await create(account_of(req), body)), status=201)


async def _list(state: WorkerState, req: Request, kind: KeyKind) -> Response:
    q = parse_qs(req.query)
    page = await asyncio.to_thread(state.gateway.keys.page, account_of(req), _int_param(q, "limit", 20),
                                   _after_param(q), kind)
    return json_response(_encode(page))


# --- /api/usage ---------------------------------------------------------------------------------------------
async def _report(state: WorkerState, req: Request, key_id: str | None = None) -> Response:
    q = parse_qs(req.query)
    start, to, group_by = _time_param(q, "from"), _time_param(q, "to"), q.get("group_by", ["day"])[0]
    account = account_of(req)

    def report() -> bytes:
        ids = state.gateway.keys.history(account, key_id)
        return _encode(usage_report(state.store, ids, start, to, group_by, int(time.time())))

    return json_response(await asyncio.to_thread(report))


async def usage(state: WorkerState, req: Request) -> Response:
    return await _report(state, req)


async def key_usage(state: WorkerState, req: Request, key_id: str) -> Response:
    return await _report(state, req, key_id)
