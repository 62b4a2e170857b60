"""Serving the metrics: who may scrape, the text a scrape gets, and `cheapest serve`'s own metrics port.

Never behind an `sk_` key, and never to just anyone: a scrape is answered when the client's address is in
`metrics_allow` (default: loopback only) and, if `metrics_token` is set, it sends `Authorization: Bearer <token>`.
A request relayed by a proxy (`Forwarded` / `X-Forwarded-For`) comes from the proxy's address, so it is admitted
by the token alone, never by the address: a reverse proxy on this host cannot expose /metrics by accident.

The text is the whole host's: prometheus-client's `MultiProcessCollector` merges every worker's files (counters and
histograms summed, live gauges summed or maxed over the workers running), in the format the scraper asks for
(Prometheus text or OpenMetrics, by its Accept header).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from cheapest.metrics.files import prepare, process_ident

if TYPE_CHECKING:
    from cheapest.config import Settings

log = logging.getLogger("cheapest.metrics")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Denied(NamedTuple):
    """Why a scrape is refused: the HTTP status, a message, OpenAI's error code."""

    status: int
    message: str
    code: str


NOT_ALLOWED = Denied(403, "Metrics are not served to this address.", "metrics_forbidden")
NO_TOKEN = Denied(401, "Metrics need this server's metrics token as a bearer token.", "invalid_metrics_token")


class ScrapeAccess:
    """The scrape policy built once from the `metrics_allow` and `metrics_token` settings."""

    def __init__(self, allow: Iterable[str], token: str = "") -> None:
        self._networks: tuple[Network, ...] = tuple(ipaddress.ip_network(a, strict=False) for a in allow)
        self._token = ("Bearer " + token).encode() if token else None

    def denied(self, client: str, authorization: str | None, forwarded: bool) -> Denied | None:
        """None when this client may scrape. `client`: its address (a port after it is ignored)."""
        if self._token is not None:
            given = (authorization or "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, self._token):
                return NO_TOKEN
        if forwarded and self._token is not None:
            return None  # relayed: the address is the proxy's; the token spoke for the client
        address = _address(client)
        if forwarded or address is None or not any(address in net for net in self._networks):
            return NOT_ALLOWED
        return None


def _address(client: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address from "1.2.3.4", "1.2.3.4:5678", "::1", "[::1]:5678"; IPv4-mapped IPv6 as IPv4."""
    host = client
    if client.startswith("["):
        host = client[1:client.find("]")]
    elif client.count(":") == 1:
        host = client.partition(":")[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def render(directory: Path, accept: str | None) -> tuple[bytes, str]:
    """Every worker's series from `directory`, encoded as the Accept header asks; (body, content type)."""
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=str(directory))
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        return None  # no per-scrape lines: Granian's access log is the one access log


def serve_port(port: int, directory: Path, access: ScrapeAccess) -> Callable[[], None]:
    """`cheapest serve`'s metrics port: 127.0.0.1:`port`, in a thread of the server's own process (which serves
    no requests and holds no request data). Returns a function that stops it. Dead workers are reaped (and
    counted) by the workers: their replacement does it as it starts."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("content-type", "text/plain")])
            return [b"Not found; metrics are on /metrics.\n"]
        denied = access.denied(environ.get("REMOTE_ADDR", ""), environ.get("HTTP_AUTHORIZATION"),
                               "HTTP_FORWARDED" in environ or "HTTP_X_FORWARDED_FOR" in environ)
        if denied is not None:
            start_response(f"{denied.status} {'Unauthorized' if denied.status == 401 else 'Forbidden'}",
                           [("content-type", "text/plain")])
            return [denied.message.encode() + b"\n"]
        body, content_type = render(directory, environ.get("HTTP_ACCEPT"))
        start_response("200 OK", [("content-type", content_type)])
        return [body]

    server = make_server("127.0.0.1", port, app, server_class=_ThreadingServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="cheapest-metrics-port", daemon=True)
    thread.start()
    log.info("metrics on http://127.0.0.1:%d/metrics", port)

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return stop


def open_for_server(settings: Settings) -> Callable[[], None] | None:
    """`cheapest serve`, before its workers start: the metrics directory made ready (emptied) for this server, and
    the metrics port opened when `metrics_port` is set. Returns what closes that port."""
    serving = settings.serving
    if not serving.metrics:
        return None
    prepare(settings.metrics_path, process_ident())  # its workers' parent: they find the directory theirs
    if not serving.metrics_port:
        return None
    return serve_port(serving.metrics_port, settings.metrics_path,
                      ScrapeAccess(serving.metrics_allow, serving.metrics_token))
