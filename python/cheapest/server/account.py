"""/api/account: the GDPR routes (management key) - export everything kept, or delete the account.

Both touch the store for longer than a key lookup (an export reads every usage row), so they run off the event
loop.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import msgspec

from cheapest.privacy.export import export_account
from cheapest.server.management import account_of
from cheapest.server.request import Request, Response, json_response

if TYPE_CHECKING:
    from cheapest.server.state import WorkerState

_encode = msgspec.json.Encoder().encode


async def export(state: WorkerState, req: Request) -> Response:
    doc = await asyncio.to_thread(export_account, state.store, account_of(req), time.time())
    return json_response(_encode(doc), [("content-disposition", 'attachment; filename="account-export.json"'),
                                        ("cache-control", "no-store")])


async def delete(state: WorkerState, req: Request) -> Response:
    deleted = await asyncio.to_thread(state.gateway.delete_account, account_of(req), time.time())
    return json_response(_encode(deleted))
