"""ASGI face of the same app (`granian --interface asgi cheapest.server:app`): adapts scope/receive/send to
the transport-neutral Request/Response the handlers use. RSGI is the faster default; see http/app.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from cheapest.http.request import ClientGone, Request, Response, StreamResponse

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class _Headers:
    """Lower-cased header lookup over ASGI's list of byte pairs."""

    __slots__ = ("_d",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._d = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}

    def get(self, key: str, default: Any = None) -> Any:
        return self._d.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self._d


def _encode_headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


async def serve_asgi(app: Any, scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                app._open(asyncio.get_running_loop())
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                if app.state is not None:
                    app.state.close(None)
                    app.state = None
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    gone = asyncio.Event()

    async def read(limit: int) -> bytes:
        buf = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                gone.set()
                raise ClientGone
            buf += msg.get("body", b"")
            if len(buf) > limit or not msg.get("more_body"):
                return bytes(buf)

    async def watch() -> None:
        while not gone.is_set():
            if (await receive())["type"] == "http.disconnect":
                gone.set()

    req = Request(scope["method"], scope["path"], scope.get("query_string", b"").decode("latin-1"),
                  _Headers(scope["headers"]), read, watch)
    try:
        resp = await app.handle(req)
    except ClientGone:
        app._log(req, 499)
        return
    await send({"type": "http.response.start", "status": resp.status, "headers": _encode_headers(resp.headers)})
    if isinstance(resp, Response):
        await send({"type": "http.response.body", "body": resp.body})
        app._log(req, resp.status)
        return
    assert isinstance(resp, StreamResponse)
    status = resp.status

    async def send_all() -> None:
        async for chunk in resp.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    work = asyncio.ensure_future(send_all())
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait((work, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done():
        work.cancel()
    try:
        await work
    except (asyncio.CancelledError, OSError, RuntimeError):
        status = 499
    finally:
        await resp.chunks.aclose()
    app._log(req, status)
