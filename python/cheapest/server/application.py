"""The application Granian runs: per-worker lifecycle, dispatch through the route table, error mapping, the
RSGI entry point (ASGI in asgi.py), one log line per request.

Per-worker state (store, rate-limit table, gateway, engine) is opened in `__rsgi_init__` (or ASGI's lifespan
startup), which Granian calls in each worker process after it starts - never at import, so a master process
holds no store handle across fork.

Whatever escapes a handler becomes an answer, never a dropped connection: a refusal its 4xx, a full store a
507, anything else a generic 500 - a Rust panic too (pyo3's PanicException is a BaseException, not an
Exception) - logged by its type alone, since an exception's message may quote the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from granian.rsgi import HTTPProtocol, ProtocolClosed, Scope

from cheapest.config import Settings
from cheapest.gateway import Refusal
from cheapest.metrics import metrics
from cheapest.server.cancellation import ClientGone, until_disconnected
from cheapest.server.errors import ApiError, internal_error, rate_headers, refused, store_full, store_unavailable
from cheapest.server.messages import anthropic_error
from cheapest.server.request import JSON, Headers, Request, Response, StreamResponse
from cheapest.server.routes import Route, Router
from cheapest.server.state import WorkerState
from cheapest.store import StoreFull, StoreUnavailable

log = logging.getLogger("cheapest.server")
# What a failed request may not swallow: cancellation and the process being told to stop.
CONTROL_FLOW = (asyncio.CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit)


class App:
    """One app object; Granian calls `__rsgi__` per request and the init/del hooks per worker."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.router = Router()
        self.state: WorkerState | None = None

    # --- worker lifecycle ---------------------------------------------------------------------------------
    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.open(loop)

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.close(loop)

    def open(self, loop: asyncio.AbstractEventLoop | None) -> WorkerState:
        if self.state is None:
            self.state = WorkerState(self.settings, self._add_route)
            self.state.load_engine(loop)
        return self.state

    def close(self, loop: asyncio.AbstractEventLoop | None) -> None:
        if self.state is not None:
            self.state.close(loop)
            self.state = None

    def _add_route(self, route: Route) -> None:
        """A route an engine plugin adds to this worker (kept out of the OpenAPI document); once, however many
        models the plugin loads."""
        if not any(r.method == route.method and r.path == route.path for r in self.router.routes):
            self.router.add(route._replace(documented=False))

    # --- requests -----------------------------------------------------------------------------------------
    async def handle(self, req: Request) -> Response | StreamResponse:
        state = self.state
        route: Route | None = None
        try:
            if state is None:
                state = self.open(asyncio.get_running_loop())
            route, args = self.router.match(req.method, req.path)
            req.route = route
            if route.auth is not None:
                authorization = req.headers.get("authorization")
                if authorization is None and route.api == "anthropic" and (key := req.headers.get("x-api-key")):
                    authorization = "Bearer " + key
                caller = req.caller = state.gateway.authenticate(authorization, route.auth)
                req.key_id = caller.key.id
            return await route.handler(state, req, *args)
        except Refusal as refusal:
            metrics.refused(refusal)
            return await self._error_response(state, req, refused(refusal), route)
        except ApiError as err:
            return await self._error_response(state, req, err, route)
        except StoreUnavailable:
            metrics.error("store")
            return await self._error_response(state, req, store_unavailable(), route)
        except StoreFull:
            metrics.error("store")
            log.error("the store is full: a write was refused (grow the store: lmdb_map_size, or PostgreSQL's disk)")
            return await self._error_response(state, req, store_full(), route)
        except (ClientGone, *CONTROL_FLOW):
            raise
        except BaseException as exc:
            # Only the type: exception messages (a panic's too) may carry request text.
            log.error("unhandled %s on %s %s", type(exc).__name__, req.method, req.path)
            metrics.failed(exc)
            return await self._error_response(state, req, internal_error(), route)

    @staticmethod
    async def _error_response(state: WorkerState | None, req: Request, err: ApiError,
                              route: Route | None = None) -> Response:
        """The error in its API's shape (OpenAI's, or Anthropic's on its routes); an inference key's answer carries
        its rate-limit state, as always."""
        headers = [("content-type", JSON), *err.headers]
        caller = req.caller
        if state is not None and caller is not None and caller.key.kind == "sk" \
                and not any(h[0] == "x-ratelimit-limit-requests" for h in err.headers):
            headers.extend(rate_headers(await state.gateway.rate_state(caller)))
        body = anthropic_error(err) if route is not None and route.api == "anthropic" else err.body()
        return Response(err.status, headers, body)

    async def __rsgi__(self, scope: Scope, proto: HTTPProtocol) -> None:
        if scope.proto != "http":
            return
        headers = scope.headers
        req = Request(scope.method, scope.path, scope.query_string, headers, _rsgi_reader(proto, headers),
                      proto.client_disconnect, scope.client)
        try:
            resp = await self.handle(req)
        except ClientGone:
            self.log(req, 499)
            return
        if type(resp) is Response:
            proto.response_bytes(resp.status, resp.headers, resp.body)
            self.log(req, resp.status)
            return
        assert isinstance(resp, StreamResponse)
        transport = proto.response_stream(resp.status, resp.headers)
        status = await send_stream(resp, transport.send_bytes, proto.client_disconnect, (ProtocolClosed,))
        self.log(req, status)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """ASGI, for servers and tools that speak only that."""
        from cheapest.server.asgi import serve_asgi

        await serve_asgi(self, scope, receive, send)

    def log(self, req: Request, status: int) -> None:
        """The request's log line and metrics, once it is answered."""
        metrics.request(req.method, req.route, req.model, status, time.perf_counter() - req.started,
                        req.prompt_tokens, req.completion_tokens)
        state = self.state
        if state is not None and self.settings.serving.request_log:
            state.request_log.write(req.started, req.key_id, req.model, status, req.prompt_tokens,
                                    req.completion_tokens, req.stream)


async def send_stream(resp: StreamResponse, send: Callable[[bytes], Awaitable[None]],
                      disconnected: Callable[[], Awaitable[object]],
                      closed: tuple[type[BaseException], ...]) -> int:
    """Send SSE chunks until done; a client that goes away stops generation at once (and it is metered).
    `closed`: what `send` raises once the client is gone. Returns the status to log: the response's, or 499
    when the client left first."""
    chunks: AsyncGenerator[bytes, None] = resp.chunks

    async def send_all() -> None:
        async for chunk in chunks:
            await send(chunk)

    try:
        await until_disconnected(send_all(), disconnected)
        return resp.status
    except (ClientGone, asyncio.CancelledError):
        return 499
    except closed:
        return 499
    except Exception as exc:  # the client is gone all the same; only the type is logged
        log.error("stream failed: %s", type(exc).__name__)
        return 499
    finally:
        try:
            await chunks.aclose()
        finally:
            if resp.finish is not None:
                resp.finish()


def _rsgi_reader(proto: HTTPProtocol, headers: Headers) -> Callable[[int], Awaitable[bytes]]:
    async def read(limit: int) -> bytes:
        if "content-length" in headers:  # already checked against the limit by Request.body
            return await proto()
        buf = bytearray()
        async for chunk in proto:
            buf += chunk
            if len(buf) > limit:
                break
        return bytes(buf)

    return read


def load_app(settings: Settings, target: str = "cheapest.server:app") -> App:
    """Granian's target loader for `cheapest serve`: the worker's app, from settings read once by the CLI."""
    return App(settings)
