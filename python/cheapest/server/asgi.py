"""ASGI face of the same app (`granian --interface asgi cheapest.server:app`): adapts scope/receive/send to the
transport-neutral Request/Response the handlers use. RSGI is the faster default (application.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from cheapest.server.application import send_stream
from cheapest.server.cancellation import ClientGone
from cheapest.server.request import Response, Request, StreamResponse

if TYPE_CHECKING:
    from cheapest.server.application import App

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class _Headers:
    """Lower-cased header lookup over ASGI's list of byte pairs."""

    __slots__ = ("_d",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._d = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}

    def get(self, key: str, default: str | None = None) -> str | None:
        return self._d.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self._d


def _encode_headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


async def _lifespan(app: App, receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            app.open(asyncio.get_running_loop())
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            app.close(None)
            await send({"type": "lifespan.shutdown.complete"})
            return


async def serve_asgi(app: App, scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(app, receive, send)
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

    client = scope.get("client")
    req = Request(scope["method"], scope["path"], scope.get("query_string", b"").decode("latin-1"),
                  _Headers(scope["headers"]), read, watch, client[0] if client else "")
    try:
        resp = await app.handle(req)
    except ClientGone:
        app.log(req, 499)
        return
    await send({"type": "http.response.start", "status": resp.status, "headers": _encode_headers(resp.headers)})
    if isinstance(resp, Response):
        await send({"type": "http.response.body", "body": resp.body})
        app.log(req, resp.status)
        return
    assert isinstance(resp, StreamResponse)

    async def chunk(data: bytes) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})

    status = await send_stream(resp, chunk, watch, (OSError, RuntimeError))
    if status != 499:
        await send({"type": "http.response.body", "body": b""})
    app.log(req, status)
