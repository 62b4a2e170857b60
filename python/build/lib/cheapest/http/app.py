"""The Granian RSGI application: routing, error mapping, streaming, one log line per request.

Per-worker state (LMDB, rate-limit table, pepper, engine) is opened in `__rsgi_init__`, which Granian calls in
each worker process after it starts - never at import, so a master process holds no LMDB handle across fork.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from cheapest.api.models import Health
from cheapest.api.openapi import build_openapi
from cheapest.config import Settings, get_settings
from cheapest.http import billing, inference, management, privacy, ratelimit
from cheapest.http.accesslog import write_request_log
from cheapest.http.errors import ApiError, internal_error, method_not_allowed, not_found
from cheapest.http.request import JSON, ClientGone, Request, Response, StreamResponse, json_response
from cheapest.http.state import WorkerState

log = logging.getLogger("cheapest.http")
_encode = msgspec.json.Encoder().encode

Handler = Callable[..., Awaitable[Response | StreamResponse]]


async def healthz(state: WorkerState, req: Request) -> Response:
    return json_response(_encode(Health("ok")))


async def readyz(state: WorkerState, req: Request) -> Response:
    engine = state.engine
    if engine is None:
        return json_response(_encode(Health("failed" if state.engine_failed else "loading")), status=503)
    return json_response(_encode(Health("ready", engine.model_id, engine.provider)))


_OPENAPI: bytes | None = None


async def openapi(state: WorkerState, req: Request) -> Response:
    global _OPENAPI
    if _OPENAPI is None:
        _OPENAPI = _encode(build_openapi())
    return json_response(_OPENAPI)


# Exact routes, then routes with one trailing path parameter.
ROUTES: dict[str, dict[str, Handler]] = {
    "/v1/chat/completions": {"POST": inference.chat_completions},
    "/v1/completions": {"POST": inference.completions},
    "/v1/models": {"GET": inference.list_models},
    "/v1/usage": {"GET": inference.key_usage},
    "/api/keys": {"POST": management.create_key, "GET": management.list_keys},
    "/api/usage": {"GET": management.usage},
    "/api/plans": {"GET": management.plans},
    "/api/billing/status": {"GET": billing.status},
    "/api/billing/checkout": {"POST": billing.checkout},
    "/api/billing/topup": {"POST": billing.topup},
    "/api/billing/verify-topup": {"POST": billing.verify_topup},
    "/webhooks/stripe": {"POST": billing.stripe_webhook},
    "/api/account": {"DELETE": privacy.delete},
    "/api/account/export": {"GET": privacy.export},
    "/_test/process": {"GET": privacy.process_check},  # answers only with the fixed (test) backend
    "/healthz": {"GET": healthz},
    "/readyz": {"GET": readyz},
    "/openapi.json": {"GET": openapi},
}
PARAM_ROUTES: dict[str, dict[str, Handler]] = {
    "/v1/models/": {"GET": inference.get_model},
    "/api/keys/": {"GET": management.get_key, "PATCH": management.patch_key, "DELETE": management.delete_key},
    "/api/usage/": {"GET": management.key_usage},
}


def route(method: str, path: str) -> tuple[Handler, tuple[str, ...]]:
    methods = ROUTES.get(path)
    args: tuple[str, ...] = ()
    if methods is None:
        prefix, _, tail = path.rpartition("/")
        methods = PARAM_ROUTES.get(prefix + "/") if tail else None
        if methods is None:
            raise not_found()
        args = (tail,)
    handler = methods.get(method)
    if handler is None:
        raise method_not_allowed()
    return handler, args


def _error_response(state: WorkerState | None, req: Request, err: ApiError) -> Response:
    headers = [("content-type", JSON), *err.headers]
    if state is not None and req.rate_limits is not None and not any(h[0] == "x-ratelimit-limit-requests"
                                                                       for h in err.headers):
        headers.extend(ratelimit.peek(state.limiter, req.key_id or "", req.rate_limits))
    return Response(err.status, headers, err.body())


class App:
    """One app object; Granian calls `__rsgi__` per request and the init/del hooks per worker."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self.state: WorkerState | None = None

    # --- worker lifecycle ---------------------------------------------------------------------------------
    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._open(loop)

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.state is not None:
            self.state.close(loop)
            self.state = None

    def _open(self, loop: asyncio.AbstractEventLoop | None) -> WorkerState:
        if self.state is None:
            self.state = WorkerState(self._settings or get_settings())
            self.state.load_engine(loop)
        return self.state

    # --- requests -----------------------------------------------------------------------------------------
    async def handle(self, req: Request) -> Response | StreamResponse:
        state = self.state
        try:
            if state is None:
                state = self._open(asyncio.get_running_loop())
            handler, args = route(req.method, req.path)
            return await handler(state, req, *args)
        except ApiError as err:
            return _error_response(state, req, err)
        except ClientGone:
            raise
        except Exception as exc:
            # Only the type: exception messages may carry request text.
            log.error("unhandled %s on %s %s", type(exc).__name__, req.method, req.path)
            return _error_response(state, req, internal_error())

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        if scope.proto != "http":
            return
        req = Request(scope.method, scope.path, scope.query_string, scope.headers, _rsgi_reader(proto, scope.headers),
                      proto.client_disconnect)
        try:
            resp = await self.handle(req)
        except ClientGone:
            self._log(req, 499)
            return
        if type(resp) is Response:
            proto.response_bytes(resp.status, resp.headers, resp.body)
            self._log(req, resp.status)
            return
        assert isinstance(resp, StreamResponse)
        transport = proto.response_stream(resp.status, resp.headers)
        status = await _pump(resp, transport, proto)
        self._log(req, status)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """ASGI, for servers and tools that speak only that."""
        from cheapest.http.asgi import serve_asgi

        await serve_asgi(self, scope, receive, send)

    def _log(self, req: Request, status: int) -> None:
        state = self.state
        if state is not None and state.settings.request_log:
            write_request_log(req.started, req.key_id, req.model, status, req.prompt_tokens,
                              req.completion_tokens, req.stream)


async def _pump(resp: StreamResponse, transport: Any, proto: Any) -> int:
    """Send SSE chunks until done; a client that goes away stops generation at once (and it is metered)."""
    chunks = resp.chunks

    async def send_all() -> None:
        async for chunk in chunks:
            await transport.send_bytes(chunk)

    work = asyncio.ensure_future(send_all())
    watcher = asyncio.ensure_future(proto.client_disconnect())
    try:
        await asyncio.wait((work, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    gone = not work.done()
    if gone:
        work.cancel()
    try:
        await work
    except asyncio.CancelledError:
        gone = True
    except Exception as exc:  # RSGIProtocolClosed: the client is gone
        gone = True
        if type(exc).__name__ != "RSGIProtocolClosed":
            log.error("stream failed: %s", type(exc).__name__)
    finally:
        await chunks.aclose()
    return 499 if gone else resp.status


def _rsgi_reader(proto: Any, headers: Any) -> Callable[[int], Awaitable[bytes]]:
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


app = App()
