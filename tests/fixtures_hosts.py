"""Many hosts: `cheapest serve` processes (each with its own data directory and workers) sharing one PostgreSQL
database and one Redis, as hosts behind a load balancer would. Tests talk to each host directly (no proxy).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from backends import PostgresServer, RedisServer
from fixtures_server import ServerProcess, free_port, serve_cli, server_env

# Every host must hash keys with the same pepper (see README "Deployment: many hosts").
SHARED_PEPPER = "a-pepper-every-host-shares-0123456789"
MODEL = "SmolLM2-135M-Instruct"


def host_env(data: Path, store_url: str, limiter_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = server_env(data)
    env.update({"CHEAPEST_STORE_URL": store_url, "CHEAPEST_LIMITER_URL": limiter_url,
                "CHEAPEST_KEY_PEPPER": SHARED_PEPPER, "CHEAPEST_USAGE_FLUSH_INTERVAL": "0.2"})
    env.update(extra or {})
    return env


def start_host(tmp: Path, store_url: str, limiter_url: str, workers: int = 2,
               extra: dict[str, str] | None = None) -> ServerProcess:
    data = tmp / "data"
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = host_env(data, store_url, limiter_url, extra)
    return serve_cli(tmp, env, port, "--port", str(port), "--workers", str(workers), data=data, workers=workers)


HostFactory = Callable[..., ServerProcess]


@pytest.fixture
def host_factory(tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer,
                 redis_server: RedisServer) -> Iterator[HostFactory]:
    """Starts hosts on ONE fresh database and the session's Redis (emptied); every host stopped after. Their
    configuration adds a plan `load` without practical limits, for tests that keep hosts busy."""
    redis_server.flush()
    url = postgres_server.database()
    config = tmp_path_factory.mktemp("hosts-config") / "cheapest.toml"
    config.write_text("[plans.load]\nrpm = 1000000000\ntpm = 1000000000\n")
    started: list[ServerProcess] = []

    def make(workers: int = 2, extra: dict[str, str] | None = None) -> ServerProcess:
        env = {"CHEAPEST_CONFIG": str(config), **(extra or {})}
        started.append(start_host(tmp_path_factory.mktemp("host"), url, redis_server.url, workers, env))
        return started[-1]

    yield make
    for host in started:
        host.stop()
    postgres_server.drop(url)


def chat(host: ServerProcess, sk: str, client: httpx.Client | None = None) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    headers = {"Authorization": f"Bearer {sk}"}
    if client is not None:
        return client.post(host.v1 + "/chat/completions", json=body, headers=headers)
    return httpx.post(host.v1 + "/chat/completions", json=body, headers=headers, timeout=30)


def usage_requests(host: ServerProcess, mk: str) -> int:
    r = httpx.get(host.base_url + "/api/usage", params={"from": int(time.time()) - 2 * 86400},
                  headers={"Authorization": f"Bearer {mk}"}, timeout=30)
    assert r.status_code == 200, r.text
    return sum(int(b["requests"]) for b in r.json()["data"])
