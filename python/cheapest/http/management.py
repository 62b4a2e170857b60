"""/api/keys: the Management API (mk_ keys). Object-level authorization: another account's key is a 404."""

from __future__ import annotations

from urllib.parse import parse_qs

import msgspec

from cheapest.api.management import (
    CreatedKey, CreateKeyRequest, Deleted, KeyInfo, KeyLimitsBody, KeyList, PatchKeyRequest,
)
from cheapest.http.auth import authenticate, forget
from cheapest.http.errors import ApiError, decode_error
from cheapest.http.request import Request, Response, json_response
from cheapest.http.state import WorkerState
from cheapest.store import AccountRecord, KeyLimits, KeyRecord
from cheapest.store import accounts

_encode = msgspec.json.Encoder().encode
_create_decoder = msgspec.json.Decoder(CreateKeyRequest)
_patch_decoder = msgspec.json.Decoder(PatchKeyRequest)


def _auth(state: WorkerState, req: Request) -> AccountRecord:
    key, account = authenticate(state.store, state.pepper, req.headers.get("authorization"), "mk")
    req.key_id = key.id
    return account


async def _decode(state: WorkerState, req: Request, decoder: msgspec.json.Decoder):  # type: ignore[type-arg]
    body = await req.body(state.settings.max_body_bytes)
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise decode_error(exc) from None


def _limits(body: KeyLimitsBody | None) -> KeyLimits:
    return KeyLimits() if body is None else msgspec.convert(msgspec.to_builtins(body), KeyLimits)


def _limits_body(limits: KeyLimits) -> KeyLimitsBody:
    return msgspec.convert(msgspec.to_builtins(limits), KeyLimitsBody)


def key_info(key: KeyRecord) -> KeyInfo:
    return KeyInfo(id=key.id, name=key.name, hint=key.hint, kind=key.kind, created_at=key.created_at,
                   disabled=key.disabled, limits=_limits_body(key.limits), expires_at=key.expires_at,
                   models=list(key.models) if key.models is not None else None)


def _owned_key(state: WorkerState, account: AccountRecord, key_id: str) -> KeyRecord:
    key = state.store.get_key(key_id)
    if key is None or key.account_id != account.id:
        raise ApiError(404, "No such key.", param="key_id", code="key_not_found")
    return key


async def create_key(state: WorkerState, req: Request) -> Response:
    account = _auth(state, req)
    body: CreateKeyRequest = await _decode(state, req, _create_decoder)
    record, secret = accounts.create_key(
        state.store, account.id, "sk", body.name, state.pepper, limits=_limits(body.limits),
        expires_at=body.expires_at, models=tuple(body.models) if body.models is not None else None,
    )
    out = CreatedKey(key=secret, id=record.id, name=record.name, hint=record.hint, kind="sk",
                     created_at=record.created_at, limits=_limits_body(record.limits), expires_at=record.expires_at,
                     models=body.models)
    return json_response(_encode(out), status=201)


async def list_keys(state: WorkerState, req: Request) -> Response:
    account = _auth(state, req)
    q = parse_qs(req.query)
    try:
        limit = max(1, min(100, int(q.get("limit", ["20"])[0])))
    except ValueError:
        raise ApiError(400, "`limit` must be an integer.", param="limit", code="invalid_value") from None
    after = q.get("after", [None])[0]
    keys = state.store.list_keys(account.id, after=after, limit=limit + 1)
    page = keys[:limit]
    return json_response(_encode(KeyList([key_info(k) for k in page], has_more=len(keys) > limit,
                                         last_id=page[-1].id if page else None)))


async def get_key(state: WorkerState, req: Request, key_id: str) -> Response:
    account = _auth(state, req)
    return json_response(_encode(key_info(_owned_key(state, account, key_id))))


async def patch_key(state: WorkerState, req: Request, key_id: str) -> Response:
    account = _auth(state, req)
    body: PatchKeyRequest = await _decode(state, req, _patch_decoder)
    key = _owned_key(state, account, key_id)
    changes: dict[str, object] = {}
    if body.name is not None:
        changes["name"] = body.name
    if body.disabled is not None:
        changes["disabled"] = body.disabled
    if body.limits is not None:
        changes["limits"] = _limits(body.limits)
    if body.expires_at is not None:
        changes["expires_at"] = body.expires_at
    key = msgspec.structs.replace(key, **changes)
    state.store.put_key(key)
    forget(key.hash)
    return json_response(_encode(key_info(key)))


async def delete_key(state: WorkerState, req: Request, key_id: str) -> Response:
    account = _auth(state, req)
    key = _owned_key(state, account, key_id)
    state.store.delete_key(key.id)
    forget(key.hash)
    return json_response(_encode(Deleted(key.id)))
