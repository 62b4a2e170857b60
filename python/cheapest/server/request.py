"""The transport-neutral request and response objects handlers see (RSGI and ASGI adapt to them)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from cheapest.server.errors import ApiError

if TYPE_CHECKING:
    from cheapest.gateway import Caller
    from cheapest.server.routes import Route

JSON = "application/json"


class Headers(Protocol):
    """Lower-cased header names (Granian's RSGI headers, or the ASGI adapter's)."""

    def get(self, key: str, default: str | None = None) -> str | None: ...
    def __contains__(self, key: str) -> bool: ...


class Request:
    """One request; handlers also note metadata here for the single log line (never content)."""

    __slots__ = ("method", "path", "query", "headers", "started", "_read", "key_id", "model", "prompt_tokens",
                 "completion_tokens", "stream", "disconnected", "watch_disconnect", "caller", "client", "route")

    def __init__(self, method: str, path: str, query: str, headers: Headers,
                 read: Callable[[int], Awaitable[bytes]],
                 watch_disconnect: Callable[[], Awaitable[object]] | None = None, client: str = "") -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.started = time.perf_counter()
        self._read = read
        self.key_id: str | None = None
        self.model: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.stream = False
        self.disconnected = False
        self.watch_disconnect = watch_disconnect
        self.caller: Caller | None = None  # once the route's key is authenticated
        self.client = client  # the peer's address, as the server gives it ("ip:port")
        self.route: Route | None = None  # the route matched (its template labels the request's metrics)

    async def body(self, limit: int) -> bytes:
        declared = self.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    raise _too_large(limit)
            except ValueError:
                raise ApiError(400, "Invalid Content-Length header.") from None
        data = await self._read(limit)  # stops reading past the limit
        if len(data) > limit:
            raise _too_large(limit)
        return data


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"Request body too large; the limit is {limit} bytes.", code="request_too_large")


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class StreamResponse:
    """SSE: `chunks` is driven by the server; closing it early (client gone) runs the handler's cleanup.
    `finish`, when given, runs once the stream is over however it ended, even if it never started (a client
    that left before the first chunk): what must not depend on the generator's own cleanup running."""

    __slots__ = ("status", "headers", "chunks", "finish")

    def __init__(self, status: int, headers: list[tuple[str, str]], chunks: AsyncGenerator[bytes, None],
                 finish: Callable[[], None] | None = None) -> None:
        self.status = status
        self.headers = headers
        self.chunks = chunks
        self.finish = finish


def json_response(body: bytes, headers: list[tuple[str, str]] | None = None, status: int = 200) -> Response:
    h = [("content-type", JSON)]
    if headers:
        h.extend(headers)
    return Response(status, h, body)
