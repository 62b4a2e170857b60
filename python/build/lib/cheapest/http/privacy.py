"""/api/account: the GDPR routes (management key) - export everything kept, or delete the account.

Both touch LMDB for longer than a key lookup (an export reads every usage row), so they run off the event loop.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time

import msgspec

from cheapest.api.privacy import AccountDeleted
from cheapest.http.auth import forget, management_account
from cheapest.http.errors import ApiError, not_found
from cheapest.http.request import Request, Response, json_response
from cheapest.http.state import WorkerState
from cheapest.privacy.deletion import PROMISED_WITHIN, delete_account
from cheapest.privacy.export import export_account
from cheapest.store import AccountRecord

_encode = msgspec.json.Encoder().encode


async def export(state: WorkerState, req: Request) -> Response:
    account = management_account(state, req)
    doc = await asyncio.to_thread(export_account, state.store, account, time.time())
    return json_response(_encode(doc), [("content-disposition", 'attachment; filename="account-export.json"'),
                                        ("cache-control", "no-store")])


async def delete(state: WorkerState, req: Request) -> Response:
    account = management_account(state, req)

    def work() -> AccountRecord | None:
        keys = state.store.list_keys(account.id, limit=1_000_000)
        deleted = delete_account(state.store, account.id, time.time())
        for key in keys:  # this worker at once; the others through the store's change epoch
            forget(key.hash)
        return deleted

    deleted = await asyncio.to_thread(work)
    if deleted is None or deleted.deleted_at is None:
        raise ApiError(404, "No such account.", code="account_not_found")
    return json_response(_encode(AccountDeleted(deleted.id, deleted.deleted_at,
                                                deleted.deleted_at + PROMISED_WITHIN)))


async def process_check(state: WorkerState, req: Request) -> Response:
    """Test backend only (model_backend = "fixed"): this worker's core-dump settings, as the kernel reports
    them to the process itself (prctl(PR_GET_DUMPABLE) is not visible from outside to a root test runner)."""
    if state.settings.model_backend != "fixed":
        raise not_found()
    from cheapest.privacy.hardening import PR_GET_DUMPABLE, _libc

    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    body = {"pid": os.getpid(), "rlimit_core": [soft, hard], "dumpable": _libc().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)}
    return json_response(_encode(body))
