"""The dashboard's files as the service serves them: content types, ETags, the security headers, names outside the
asset set refused; and the files themselves: no inline code or style, nothing from another origin, no HTML strings
into the DOM, shipped in the service's wheel."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from html.parser import HTMLParser
from importlib.resources import files
from pathlib import Path

import httpx
import pytest

from cheapest import dashboard
from fixtures_server import ServerProcess

REPO = Path(__file__).resolve().parents[2]
STATIC = files("cheapest.dashboard").joinpath("static")
TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8",
         "svg": "image/svg+xml"}


def _csp(headers: dict[str, str]) -> dict[str, str]:
    directives = (p.strip() for p in headers["content-security-policy"].split(";"))
    return {d.split()[0]: d.partition(" ")[2] for d in directives}


def _check_security_headers(headers: dict[str, str]) -> None:
    csp = _csp(headers)
    assert csp["default-src"] == "'none'"
    for directive in ("script-src", "style-src", "img-src", "connect-src"):
        assert csp[directive] == "'self'", directive  # no 'unsafe-inline', no other origin
    assert csp["frame-ancestors"] == "'none'" and csp["form-action"] == "'none'" and csp["base-uri"] == "'none'"
    assert csp["require-trusted-types-for"] == "'script'"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-frame-options"] == "DENY"


def test_every_asset_is_served_with_its_type_etag_and_security_headers() -> None:
    names = dashboard.asset_names()
    assert {"index.html", "app.js", "api.js", "chart.js", "usage.js", "style.css", "icon.svg"} <= set(names)
    for name in names:
        status, header_list, body = dashboard.serve_asset(name)
        headers = dict(header_list)
        assert status == 200 and body == STATIC.joinpath(name).read_bytes()
        assert headers["content-type"] == TYPES[name.rsplit(".", 1)[1]]
        assert headers["cache-control"] == "no-cache" and re.fullmatch(r'"[0-9a-f]{32}"', headers["etag"])
        _check_security_headers(headers)


def test_a_matching_etag_gets_304_without_a_body() -> None:
    etag = dict(dashboard.serve_asset("app.js")[1])["etag"]
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        status, headers, body = dashboard.serve_asset("app.js", header)
        assert (status, body) == (304, b"") and dict(headers)["etag"] == etag
        _check_security_headers(dict(headers))
    assert dashboard.serve_asset("app.js", '"other"')[0] == 200
    assert dashboard.serve_asset("style.css", etag)[0] == 200  # another file's tag


@pytest.mark.parametrize("name", ["", "missing.js", "../__init__.py", "..", "static", "__init__.py", "INDEX.HTML",
                                  "index.html/", ".hidden.js", "app.js\x00", "app.py", "static/app.js"])
def test_names_outside_the_asset_set_are_404_in_the_error_shape(name: str) -> None:
    status, headers, body = dashboard.serve_asset(name)
    assert status == 404 and dict(headers)["content-type"] == "application/json"
    assert body == b'{"error":{"message":"No such dashboard file.","type":"invalid_request_error","param":null,' \
                   b'"code":"not_found"}}'
    _check_security_headers(dict(headers))


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline: list[str] = []
        self._tag = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._tag = tag

    def handle_data(self, data: str) -> None:
        if self._tag in ("script", "style") and data.strip():
            self.inline.append(self._tag)


def test_the_page_has_no_inline_code_or_style_and_loads_only_its_own_files() -> None:
    page = _Page()
    page.feed(STATIC.joinpath("index.html").read_text())
    assert not page.inline, "inline <script>/<style> would need 'unsafe-inline'"
    names = set(dashboard.asset_names())
    for tag, attrs in page.tags:
        assert tag != "style" and "style" not in attrs, tag
        assert not [a for a in attrs if a.startswith("on")], f"inline handler on <{tag}>"
        for attr in ("src", "href"):
            url = attrs.get(attr)
            if url is None or url.startswith("#"):
                continue
            assert url.startswith("/dashboard/") and url.removeprefix("/dashboard/") in names, url
        if tag == "script":
            assert attrs.get("src") and attrs.get("type") == "module"


def test_scripts_build_the_dom_without_html_strings_and_call_this_origin_only() -> None:
    for name in dashboard.asset_names():
        if not name.endswith(".js"):
            continue
        code = STATIC.joinpath(name).read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                     "setAttribute(\"style\"", "localStorage", "document.cookie"):
            assert sink not in code, f"{name} uses {sink}"
        # Every URL the scripts name is a path on this origin (the SVG namespace is a name, not a request).
        for url in re.findall(r"""["'`]((?:https?:)?//[^"'`]*)""", code):
            assert url == "http://www.w3.org/2000/svg", f"{name} names {url}"
        for imported in re.findall(r'from "\./([^"]+)"', code):
            assert imported in dashboard.asset_names(), imported


@pytest.mark.slow
def test_the_service_wheel_ships_the_assets(tmp_path: Path) -> None:
    """dist/ holds the wheel after `make wheels` (a step of `make test`); otherwise it is built here, from a copy of
    the sources so the build leaves nothing in the checkout."""
    wheels = sorted((REPO / "dist").glob("cheapest-*-py3-none-any.whl"))
    if not wheels:
        src = tmp_path / "src"
        shutil.copytree(REPO / "python" / "cheapest", src / "cheapest", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / "python" / "pyproject.toml", src)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path),
                        str(src)], check=True)
        wheels = sorted(tmp_path.glob("cheapest-*-py3-none-any.whl"))
    with zipfile.ZipFile(wheels[-1]) as zf:
        shipped = {n.removeprefix("cheapest/dashboard/static/") for n in zf.namelist()
                   if n.startswith("cheapest/dashboard/static/")}
    assert shipped == set(dashboard.asset_names())


def test_routes_on_a_real_server(fixed_server: ServerProcess) -> None:
    base = fixed_server.base_url
    with httpx.Client(timeout=10) as c:
        for path in ("/dashboard", "/dashboard/", "/dashboard/index.html"):
            r = c.get(base + path)
            assert r.status_code == 200 and r.headers["content-type"] == TYPES["html"], path
            assert r.content == STATIC.joinpath("index.html").read_bytes()
            _check_security_headers(dict(r.headers))
        r = c.get(base + "/dashboard/app.js")
        assert r.status_code == 200 and r.headers["content-type"] == TYPES["js"]
        again = c.get(base + "/dashboard/app.js", headers={"if-none-match": r.headers["etag"]})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == r.headers["etag"]
        missing = c.get(base + "/dashboard/nope.js")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert c.get(base + "/dashboard/static/app.js").status_code == 404
        assert c.post(base + "/dashboard").status_code == 405
