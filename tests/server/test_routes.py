"""The server's parts without a socket: one route table for the router and the OpenAPI document, refusals
mapped to statuses and headers, the one helper that stops work when the client goes away, engine backends."""

from __future__ import annotations

import re

import asyncio
from typing import get_args

import msgspec
import pytest
from openapi_spec_validator import validate

import fixed_engine
from cheapest.config import EngineSettings
from cheapest.gateway.errors import Refusal, RefusalKind
from cheapest.server.cancellation import ClientGone, until_disconnected
from cheapest.server.errors import STATUS, ApiError, refused
from cheapest.server.openapi import build_openapi
from cheapest.server.routes import ROUTES, Route, Router
from cheapest.server.state import engine_factory, load_onnx_engine


def test_the_router_serves_exactly_the_table() -> None:
    router = Router()
    for route in ROUTES:
        path = re.sub(r"\{\w+\}$", "p1", route.path)
        found, args = router.match(route.method, path)
        assert found is route and args == (("p1",) if path != route.path else ())
    for method, path, status in (("GET", "/nope", 404), ("GET", "/v1/models/a/b", 404),
                                 ("DELETE", "/v1/chat/completions", 405), ("POST", "/api/keys/key_1", 405)):
        with pytest.raises(ApiError) as err:
            router.match(method, path)
        assert err.value.status == status


def test_routes_added_to_one_router_stay_there() -> None:
    async def handler(state: object, req: object) -> None: ...

    mine, other = Router(), Router()
    mine.add(Route("GET", "/_plugin", handler, "a plugin's route"))  # type: ignore[arg-type]
    assert mine.match("GET", "/_plugin")[0].path == "/_plugin"
    with pytest.raises(ApiError):
        other.match("GET", "/_plugin")


def test_the_openapi_document_is_the_table_and_valid() -> None:
    doc = build_openapi([r for r in ROUTES if r.documented])
    validate(doc)
    documented = {(r.method.lower(), r.path) for r in ROUTES if r.documented}
    assert {(m, p) for p, ops in doc["paths"].items() for m in ops} == documented
    assert "/openapi.json" not in doc["paths"]
    keys = {(r.method.lower(), r.path): (r.auth, r.api) for r in ROUTES}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            scheme = {"sk": [{"inferenceKey": []}], "mk": [{"managementKey": []}], None: None}
            auth, api = keys[(method, path)]
            want = scheme[auth] + [{"anthropicKey": []}] if api == "anthropic" else scheme[auth]  # type: ignore[operator]
            assert op.get("security") == want


def test_every_refusal_has_a_status_and_its_retry_headers() -> None:
    assert set(STATUS) == set(get_args(RefusalKind))
    budget = refused(Refusal("rate_limited", "spent", code="budget_exceeded", retry_after=2.5, reset_at=86_400))
    assert budget.status == 429 and budget.headers == [("retry-after", "3"), ("x-budget-reset", "86400")]
    lapsed = refused(Refusal("forbidden", "lapsed", code="subscription_inactive"))
    assert (lapsed.status, lapsed.type, lapsed.headers) == (403, "permission_error", [])


def test_until_disconnected_returns_the_work_or_stops_it() -> None:
    cleaned: list[str] = []

    async def work(delay: float) -> str:
        try:
            await asyncio.sleep(delay)
            return "done"
        finally:
            cleaned.append("work")

    async def never() -> None:
        await asyncio.Event().wait()

    async def soon() -> None:
        await asyncio.sleep(0.01)

    async def run() -> None:
        assert await until_disconnected(work(0), None) == "done"
        assert await until_disconnected(work(0.01), never) == "done"
        with pytest.raises(ClientGone):
            await until_disconnected(work(10), soon)
        assert cleaned == ["work", "work", "work"]  # the stopped work's cleanup ran before ClientGone
        outer = asyncio.ensure_future(until_disconnected(work(10), never))
        await asyncio.sleep(0.01)
        outer.cancel()  # the request itself is cancelled: the work goes with it
        with pytest.raises(asyncio.CancelledError):
            await outer
        await asyncio.sleep(0)
        assert cleaned == ["work"] * 4

    asyncio.run(run())


def test_engine_backends_are_factories_named_by_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """"onnx" loads the model directory with the configured threads, spin and huge-page weights; "module:callable"
    is imported."""
    import cheapest.engine.onnx_engine as onnx  # loads ONNX Runtime: only here

    seen: list[tuple[object, ...]] = []
    monkeypatch.setattr(onnx, "load_engine", lambda model_dir, threads, spin_us, chat_templates, shared_arena,
                        huge_pages: seen.append((model_dir, threads, spin_us, chat_templates, shared_arena, huge_pages)))
    settings = EngineSettings(model_dir="/m", model_threads=3, model_spin_us=0, chat_templates={"m": "{{ 1 }}"})
    assert engine_factory(settings) is load_onnx_engine
    load_onnx_engine(settings, lambda route: None)
    load_onnx_engine(msgspec.structs.replace(settings, models=["/m", "/n"], model_huge_pages=False), lambda route: None)
    assert seen == [("/m", 3, 0, {"m": "{{ 1 }}"}, False, True), ("/m", 3, 0, {"m": "{{ 1 }}"}, True, False)]
    assert engine_factory(EngineSettings(model_backend="fixed_engine:load")) is fixed_engine.load
