"""The Management API (mk_ keys): /api/keys, /api/usage, /api/plans.

Object-level authorization: every lookup is by (account, id); another account's key or usage answers 404,
exactly like an id that does not exist, so ids cannot be probed. Management keys (mk_) are the operator's
business (`cheapest accounts`), so this API lists and changes inference keys (sk_) only.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs

import msgspec
from msgspec import UNSET

from cheapest.api.billing import ModelPrice, PlanInfo, PlanList
from cheapest.api.management import (
    CreatedKey, CreateKeyRequest, Deleted, KeyInfo, KeyLimitsBody, KeyList, PatchKeyRequest, UsageBucket,
    UsageReport, UsageTotal,
)
from cheapest.config import Settings
from cheapest.http.auth import forget, management_account
from cheapest.http.errors import ApiError, decode_error
from cheapest.http.request import Request, Response, json_response
from cheapest.http.state import WorkerState
from cheapest.store import AccountRecord, KeyLimits, KeyRecord
from cheapest.store import accounts

_encode = msgspec.json.Encoder().encode
_create_decoder = msgspec.json.Decoder(CreateKeyRequest)
_patch_decoder = msgspec.json.Decoder(PatchKeyRequest)
HOUR, DAY = 3600, 86_400
MAX_RANGE_S = {"hour": 31 * DAY, "day": 400 * DAY}


async def decode_body(state: WorkerState, req: Request, decoder: msgspec.json.Decoder) -> Any:
    body = await req.body(state.settings.max_body_bytes)
    if not body.strip():
        raise ApiError(400, "This route needs a JSON body.", code="invalid_json")
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise decode_error(exc) from None


def _key_not_found() -> ApiError:
    return ApiError(404, "No such key.", param="key_id", code="key_not_found")


def _check_limits(settings: Settings, account: AccountRecord, body: KeyLimitsBody | None) -> KeyLimits:
    if body is None:
        return KeyLimits()
    if body.budget_usd is not None and body.budget_window is None \
            and settings.plan(account.plan).budget_window is None:
        raise ApiError(400, "`limits.budget_window` (5h, 8h, 1d or 30d) is required with `limits.budget_usd`.",
                       param="limits.budget_window", code="invalid_value")
    if body.budget_window is not None and body.budget_usd is None:
        raise ApiError(400, "`limits.budget_usd` is required with `limits.budget_window`.",
                       param="limits.budget_usd", code="invalid_value")
    return msgspec.convert(msgspec.to_builtins(body), KeyLimits)


def _limits_body(limits: KeyLimits) -> KeyLimitsBody:
    return msgspec.convert(msgspec.to_builtins(limits), KeyLimitsBody)


def key_info(key: KeyRecord) -> KeyInfo:
    return KeyInfo(id=key.id, name=key.name, hint=key.hint, kind=key.kind, created_at=key.created_at,
                   disabled=key.disabled, limits=_limits_body(key.limits), expires_at=key.expires_at,
                   models=list(key.models) if key.models is not None else None)


def _owned_key(state: WorkerState, account: AccountRecord, key_id: str) -> KeyRecord:
    key = state.store.get_key(key_id)
    if key is None or key.account_id != account.id or key.kind != "sk":
        raise _key_not_found()
    return key


# --- /api/keys ----------------------------------------------------------------------------------------------
async def create_key(state: WorkerState, req: Request) -> Response:
    account = management_account(state, req)
    body: CreateKeyRequest = await decode_body(state, req, _create_decoder)
    limits = _check_limits(state.settings, account, body.limits)
    record, secret = accounts.create_key(
        state.store, account.id, "sk", body.name, state.pepper, limits=limits,
        expires_at=body.expires_at, models=tuple(body.models) if body.models is not None else None,
    )
    out = CreatedKey(key=secret, id=record.id, name=record.name, hint=record.hint, kind="sk",
                     created_at=record.created_at, limits=_limits_body(record.limits), expires_at=record.expires_at,
                     models=body.models)
    return json_response(_encode(out), status=201)


async def list_keys(state: WorkerState, req: Request) -> Response:
    account = management_account(state, req)
    q = parse_qs(req.query)
    try:
        limit = int(q.get("limit", ["20"])[0])
    except ValueError:
        raise ApiError(400, "`limit` must be an integer.", param="limit", code="invalid_value") from None
    if not 1 <= limit <= 100:
        raise ApiError(400, "`limit` must be between 1 and 100.", param="limit", code="invalid_value")
    after = q.get("after", [None])[0]
    keys = state.store.list_keys(account.id, after=after, limit=limit + 1, kind="sk")
    page = keys[:limit]
    return json_response(_encode(KeyList([key_info(k) for k in page], has_more=len(keys) > limit,
                                         last_id=page[-1].id if page else None)))


async def get_key(state: WorkerState, req: Request, key_id: str) -> Response:
    account = management_account(state, req)
    return json_response(_encode(key_info(_owned_key(state, account, key_id))))


class _NotOwned(Exception):
    pass


async def patch_key(state: WorkerState, req: Request, key_id: str) -> Response:
    account = management_account(state, req)
    body: PatchKeyRequest = await decode_body(state, req, _patch_decoder)
    changes: dict[str, object] = {}
    if body.name is not UNSET:
        changes["name"] = body.name
    if body.disabled is not UNSET:
        changes["disabled"] = body.disabled
    if body.limits is not UNSET:
        changes["limits"] = _check_limits(state.settings, account, body.limits)
    if body.expires_at is not UNSET:
            changes["expires_at"] = body.expires_at
    if body.models is not UNSET:
        changes["models"] = tuple(body.models) if body.models is not None else None

    def change(key: KeyRecord) -> KeyRecord:
        if key.kind != "sk":
            raise _NotOwned
        return msgspec.structs.replace(key, **changes)

    try:
        # One write transaction: concurrent PATCHes of different fields on different workers both land.
        key = state.store.update_key(key_id, account.id, change)
    except _NotOwned:
        key = None
    if key is None:
        raise _key_not_found()
    forget(key.hash)
    return json_response(_encode(key_info(key)))


async def delete_key(state: WorkerState, req: Request, key_id: str) -> Response:
    account = management_account(state, req)
    key = _owned_key(state, account, key_id)
    state.store.delete_key(key.id)
    forget(key.hash)
    return json_response(_encode(Deleted(key.id)))


# --- /api/usage -----------------------------------------------------------------------------------------------
def _time_param(q: dict[str, list[str]], name: str, default: int) -> int:
    raw = q.get(name, [None])[0]
    if raw is None or raw == "":
        return default
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


def _usage_report(state: WorkerState, req: Request, key_ids: list[str]) -> UsageReport:
    q = parse_qs(req.query)
    group_by = q.get("group_by", ["day"])[0]
    if group_by not in ("hour", "day"):
        raise ApiError(400, "`group_by` must be `hour` or `day`.", param="group_by", code="invalid_value")
    now = int(time.time())
    to = _time_param(q, "to", now + HOUR)
    start = _time_param(q, "from", to - 30 * DAY)
    if start < 0 or to <= start:
        raise ApiError(400, "`from` must be before `to` (and not negative).", param="from", code="invalid_value")
    if to - start > MAX_RANGE_S[group_by]:
        raise ApiError(400, f"The range is too long for group_by={group_by}; at most "
                       f"{MAX_RANGE_S[group_by] // DAY} days.", param="from", code="invalid_value")
    start = start // HOUR * HOUR
    to = -(-to // HOUR) * HOUR
    step = HOUR if group_by == "hour" else DAY
    buckets: dict[tuple[str, str, int], list[int]] = {}
    totals: dict[tuple[str, str], list[int]] = {}
    for row in state.store.usage(key_ids, start, to):
        c = row.counter
        for acc in (buckets.setdefault((row.key_id, row.model, row.hour // step * step), [0, 0, 0, 0]),
                    totals.setdefault((row.key_id, row.model), [0, 0, 0, 0])):
            acc[0] += c.requests
            acc[1] += c.prompt_tokens
            acc[2] += c.completion_tokens
            acc[3] += c.cost_micro
    return UsageReport(
        from_=start, to=to, group_by=group_by,  # type: ignore[arg-type]
        data=[UsageBucket(k, m, t, v[0], v[1], v[2], v[3], v[3] / 1e6) for (k, m, t), v in sorted(buckets.items())],
        totals=[UsageTotal(k, m, v[0], v[1], v[2], v[3], v[3] / 1e6) for (k, m), v in sorted(totals.items())],
    )


async def usage(state: WorkerState, req: Request) -> Response:
    account = management_account(state, req)
    return json_response(_encode(_usage_report(state, req, state.store.key_history(account.id))))


async def key_usage(state: WorkerState, req: Request, key_id: str) -> Response:
    account = management_account(state, req)
    if key_id not in state.store.key_history(account.id):  # revoked keys' usage stays readable
        raise _key_not_found()
    return json_response(_encode(_usage_report(state, req, [key_id])))


# --- /api/plans -----------------------------------------------------------------------------------------------
_PLANS: bytes | None = None


def plan_list(settings: Settings) -> PlanList:
    return PlanList(
        data=[PlanInfo(name=name, rpm=p.rpm, tpm=p.tpm, price_usd_month=p.price_usd_month,
                       funding=p.funded_by, default=name == settings.default_plan,
                       budget_usd=p.budget_usd, budget_window=p.budget_window)
              for name, p in sorted(settings.plans.items(), key=lambda kv: (kv[1].price_usd_month, kv[0]))],
        prices=[ModelPrice(m, p.prompt_usd_per_mtok, p.completion_usd_per_mtok)
                for m, p in sorted(settings.prices.items())],
    )


async def plans(state: WorkerState, req: Request) -> Response:
    """No authentication: the catalog is public. Built once per worker (settings never change at run time)."""
    global _PLANS
    if _PLANS is None:
        _PLANS = _encode(plan_list(state.settings))
    return json_response(_PLANS)
