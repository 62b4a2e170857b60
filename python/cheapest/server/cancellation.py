"""Run this, but stop if the client goes away: one helper for every place the server waits on work that a
disconnect makes pointless (streaming SSE chunks, generating a whole answer), on RSGI and ASGI alike."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before the response was complete; nothing more is sent."""


async def until_disconnected(work: Coroutine[Any, Any, T],
                             disconnected: Callable[[], Awaitable[object]] | None) -> T:
    """`await work`, unless `disconnected()` completes first: then `work` is cancelled (its cleanup, such as
    metering the tokens generated so far, runs before this returns) and ClientGone is raised. Without a watcher
    (`None`: nothing to watch, or work that never waits) this is just `await work`."""
    if disconnected is None:
        return await work
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request itself is being cancelled: take the work down with it
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone
    return task.result()
