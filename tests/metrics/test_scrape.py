"""/metrics through real Granian servers: every worker's counts in one scrape, restarts, a new server's empty start,
who may scrape, the separate port, and label sets that stay bounded whatever clients send."""

from __future__ import annotations

import os
import secrets
import signal
import stat
import time
from pathlib import Path

import httpx
import pytest

from fixtures_server import ServerProcess, free_port, on_every_worker, serve_cli, server_env, worker_pid
from metrics_text import Samples, parse, scrape, scrape_until, value

MODEL = "SmolLM2-135M-Instruct"
CHAT = "/v1/chat/completions"
TOKEN = "metrics-" + "t" * 24


def _chat(base_v1: str, sk: str, client: httpx.Client | None = None, **body: object) -> httpx.Response:
    send = client.post if client is not None else httpx.post
    return send(base_v1 + "/chat/completions", headers={"Authorization": f"Bearer {sk}"}, timeout=30,
                json={"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                      **body})


def _chats(samples: Samples, status: str = "200") -> float:
    return value(samples, "cheapest_requests_total", route=CHAT, model=MODEL, status=status)


@pytest.mark.slow  # a two-worker server
def test_one_scrape_counts_every_worker_exactly(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(workers=2)
    _, mk = server.create_account()
    sk = str(server.create_key(mk)["key"])
    usage = {"n": 0, "prompt": 0, "completion": 0}

    def chat(client: httpx.Client) -> None:
        r = _chat(server.v1, sk, client)
        assert r.status_code == 200, r.text
        usage["n"] += 1
        usage["prompt"] += r.json()["usage"]["prompt_tokens"]
        usage["completion"] += r.json()["usage"]["completion_tokens"]

    pids = on_every_worker(server, chat)  # both workers answered completions
    # Whichever worker answers the scrape, it reads both workers' files.
    for _ in range(4):
        samples = scrape_until(server.base_url, lambda s: _chats(s) >= usage["n"])
        assert _chats(samples) == usage["n"]
        assert value(samples, "cheapest_prompt_tokens_total", model=MODEL) == usage["prompt"]
        assert value(samples, "cheapest_completion_tokens_total", model=MODEL) == usage["completion"]
        assert value(samples, "cheapest_request_duration_seconds_count", route=CHAT, model=MODEL) == usage["n"]
        assert value(samples, "cheapest_workers") == 2
        assert value(samples, "cheapest_worker_starts_total") == 2
        assert value(samples, "cheapest_model_state", model=MODEL, state="ready") == 2
        assert value(samples, "cheapest_model_state", model=MODEL, state="loading") == 0
        assert value(samples, "cheapest_usage_flush_lag_seconds") >= 0
    files = {p.name for p in (server.data_dir / "metrics").glob("counter_*.db")}
    assert {name.split("_")[1].split("-")[0] for name in files} == {str(p) for p in pids}


@pytest.mark.slow  # a two-worker `cheapest serve`, one worker killed
def test_separate_port_and_a_killed_worker_replaced_and_counted(tmp_path: Path) -> None:
    data, port, metrics_port = tmp_path / "data", free_port(), free_port()
    data.mkdir()
    env = server_env(data) | {"CHEAPEST_METRICS_PORT": str(metrics_port), "CHEAPEST_USAGE_FLUSH_INTERVAL": "0.2"}
    server = serve_cli(tmp_path, env, port, "--port", str(port), "--workers", "2", data=data, workers=2)
    try:
        metrics_url = f"http://127.0.0.1:{metrics_port}"
        r = httpx.get(server.base_url + "/metrics")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"  # not on the service's port
        _, mk = server.create_account()
        sk = str(server.create_key(mk)["key"])
        for _ in range(6):
            assert _chat(server.v1, sk).status_code == 200
        samples = scrape_until(metrics_url, lambda s: _chats(s) >= 6 and value(s, "cheapest_workers") == 2)
        assert _chats(samples) == 6 and value(samples, "cheapest_workers") == 2
        with httpx.Client() as c:
            victim = worker_pid(server, c)
        os.kill(victim, signal.SIGKILL)
        samples = scrape_until(metrics_url, lambda s: value(s, "cheapest_worker_restarts_total") >= 1
                               and value(s, "cheapest_workers") == 2, timeout=30)
        assert value(samples, "cheapest_worker_restarts_total") == 1
        assert value(samples, "cheapest_worker_starts_total") == 3
        assert value(samples, "cheapest_workers") == 2
        assert _chats(samples) == 6  # the dead worker's counts stay in the totals
        assert httpx.get(metrics_url + "/other").status_code == 404
    finally:
        server.stop()


def test_a_new_server_starts_from_zero_in_an_owner_only_directory(server_factory) -> None:  # type: ignore[no-untyped-def]
    first = server_factory()
    _, mk = first.create_account()
    sk = str(first.create_key(mk)["key"])
    for _ in range(3):
        assert _chat(first.v1, sk).status_code == 200
    assert _chats(scrape(first.base_url)) == 3
    first.stop()
    again = server_factory(data_dir=first.data_dir)
    samples = scrape(again.base_url)
    assert _chats(samples) == 0 and value(samples, "cheapest_worker_starts_total") == 1
    directory = again.data_dir / "metrics"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = list(directory.iterdir())
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)


def test_scrape_needs_an_allowed_address_or_the_token(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(extra_env={"CHEAPEST_METRICS_ALLOW": "10.0.0.0/8", "CHEAPEST_METRICS_TOKEN": TOKEN})
    _, mk = server.create_account()
    sk = str(server.create_key(mk)["key"])
    url = server.base_url + "/metrics"
    for headers in ({}, {"Authorization": f"Bearer {sk}"}, {"Authorization": f"Bearer {mk}"},
                    {"Authorization": "Bearer " + TOKEN[:-1]}, {"Authorization": TOKEN}):
        r = httpx.get(url, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
        assert r.json()["error"]["code"] == "invalid_metrics_token"
        assert "cheapest_" not in r.text
    r = httpx.get(url, headers={"Authorization": "Bearer " + TOKEN})  # the token, from loopback: not allowed
    assert r.status_code == 403 and r.json()["error"]["code"] == "metrics_forbidden"
    relayed = httpx.get(url, headers={"Authorization": "Bearer " + TOKEN, "X-Forwarded-For": "203.0.113.9"})
    assert relayed.status_code == 200 and "cheapest_requests_total" in relayed.text


def test_loopback_by_default_and_never_through_a_proxy_without_the_token(api_account) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = api_account.server
    assert scrape(server.base_url)  # the shared fixed server: default settings, loopback client
    for relay in ({"X-Forwarded-For": "127.0.0.1"}, {"Forwarded": "for=127.0.0.1"}):
        r = httpx.get(server.base_url + "/metrics", headers=relay)
        assert r.status_code == 403 and r.json()["error"]["code"] == "metrics_forbidden"
    r = httpx.get(server.base_url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")


def test_metrics_off(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(extra_env={"CHEAPEST_METRICS": "0"})
    assert httpx.get(server.base_url + "/metrics").status_code == 404
    assert not (server.data_dir / "metrics").exists()


def test_label_sets_stay_bounded(fixed_server: ServerProcess) -> None:
    server = fixed_server
    _, mk = server.create_account(plan="pro")  # room for every request in its rpm, however requests are charged
    auth = {"Authorization": f"Bearer {server.create_key(mk)['key']}"}

    def bogus(n: int) -> None:
        with httpx.Client(base_url=server.base_url, timeout=10) as c:
            for i in range(n):
                tag = secrets.token_hex(4)
                c.get(f"/v1/bogus-{tag}/{i}", headers=auth)
                c.get(f"/v1/models/model-{tag}", headers=auth)
                c.request(f"M{tag.upper()}", f"/v1/{tag}")
                c.post("/v1/chat/completions", headers=auth, json={"model": f"model-{tag}", "messages": []})
                c.post("/v1/embeddings", headers=auth, json={"model": f"model-{tag}", "input": "x"})
                c.post("/v1/chat/completions", headers={"Authorization": f"Bearer sk_{tag}"}, json={})
                c.get(f"/api/keys/key_{tag}", headers={"Authorization": f"Bearer {mk}"})

    def label_sets() -> set[tuple[str, frozenset[tuple[str, str]]]]:
        r = httpx.get(server.base_url + "/metrics")
        return {(name, labels) for name, labels in parse(r.text) if not name.endswith(("_sum", "_bucket"))}

    label_sets()  # the scrape's own series exist from here on
    bogus(3)
    before = label_sets()
    bogus(40)
    after = label_sets()
    assert after == before, after - before
    routes = {dict(labels).get("route") for _, labels in after} - {None}
    from cheapest.server.routes import ROUTES

    assert routes <= {r.path for r in ROUTES} | {"unmatched", "/_test/process"}
    models = {dict(labels).get("model") for _, labels in after} - {None}
    assert models <= {MODEL, "unknown", "none"}
    methods = {dict(labels).get("method") for _, labels in after} - {None}
    assert methods <= {"GET", "POST", "PATCH", "DELETE", "other"}


def test_asgi_serves_the_same_metrics(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(interface="asgi")
    _, mk = server.create_account()
    sk = str(server.create_key(mk)["key"])
    assert _chat(server.v1, sk).status_code == 200
    assert _chats(scrape(server.base_url)) == 1  # the ASGI client address passes the loopback allow-list
    r = httpx.get(server.base_url + "/metrics", headers={"X-Forwarded-For": "127.0.0.1"})
    assert r.status_code == 403
