"""The account owner's dashboard: a static page (HTML, CSS, ES modules, no build step) that signs in with a
management key and drives only the public Management API, so anything it shows or does a script can too.

The assets ship as package data (`static/`); `serve_asset` turns an asset name into a complete response
(status, headers, body): the right content type, an ETag for cheap revalidation, and the security headers that
keep the page to this origin - a Content-Security-Policy allowing scripts, styles, images and fetches from here
only (no inline code, no framing, no form posts, Trusted Types on), no referrer, no MIME sniffing.
"""

from __future__ import annotations

import hashlib
import re
from functools import cache
from importlib.resources import files

import msgspec

from cheapest.api.common import ErrorDetail, ErrorResponse

__all__ = ["CONTENT_SECURITY_POLICY", "INDEX", "serve_asset"]

INDEX = "index.html"
"""What `/dashboard` itself serves."""

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",  # the forms are handled by the script; without it they go nowhere, key included
    "frame-ancestors 'none'",
    "require-trusted-types-for 'script'",  # no HTML strings into the DOM, ever
    "trusted-types 'none'",
))

SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
    ("permissions-policy", "camera=(), microphone=(), geolocation=(), payment=(), usb=()"),
)

# Asset names are not content-hashed, so browsers revalidate every time (a 304 costs one small round trip).
_CACHE_CONTROL = ("cache-control", "no-cache")
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_NAME = re.compile(r"[a-z0-9][a-z0-9-]*\.(?:html|js|css|svg)")

Asset = tuple[bytes, str, str]  # body, content type, ETag


@cache
def _assets() -> dict[str, Asset]:
    """Every file of `static/`, read once per process."""
    out: dict[str, Asset] = {}
    for entry in files(__package__).joinpath("static").iterdir():
        name = entry.name
        if not _NAME.fullmatch(name):
            continue
        body = entry.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        out[name] = (body, _CONTENT_TYPES[name[name.rindex("."):]], etag)
    return out


def asset_names() -> list[str]:
    return sorted(_assets())


def _etag_matches(if_none_match: str, etag: str) -> bool:
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


_NOT_FOUND = msgspec.json.encode(ErrorResponse(ErrorDetail("No such dashboard file.", "invalid_request_error",
                                                           None, "not_found")))


def serve_asset(name: str, if_none_match: str | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
    """`name` is the last path segment after /dashboard/ (`INDEX` for /dashboard itself); `if_none_match` the
    request's If-None-Match header. Returns (status, headers, body): 200, 304 (not modified) or 404."""
    asset = _assets().get(name) if _NAME.fullmatch(name) else None
    if asset is None:
        return 404, [("content-type", "application/json"), ("cache-control", "no-store"), *SECURITY_HEADERS], \
            _NOT_FOUND
    body, content_type, etag = asset
    headers = [("etag", etag), _CACHE_CONTROL, *SECURITY_HEADERS]
    if if_none_match is not None and _etag_matches(if_none_match, etag):
        return 304, headers, b""
    return 200, [("content-type", content_type), *headers], body
