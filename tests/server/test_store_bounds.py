"""The store is bounded per account and safe when full, through a real server: a live-key cap per plan, a full
store is a 507 that loses nothing already written, and counting an account's keys happens in the store, off the
event loop."""

from __future__ import annotations

import threading
import time
from functools import partial
from pathlib import Path

import httpx
import lmdb
import pytest

from cheapest.store import accounts, open_store
from cheapest.store.records import KeyRecord
from cheapest.store.secrets import load_pepper
from fixtures_server import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
MSG = [{"role": "user", "content": "hi"}]
SMALL_STORE = 256 * 1024  # bytes: a handful of big keys fill it


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _new_key(server: ServerProcess, mk: str, **body: object) -> httpx.Response:
    return httpx.post(server.base_url + "/api/keys", json={"name": "k", **body}, headers=_h(mk), timeout=10)


def _all_keys(server: ServerProcess, mk: str, path: str = "/api/keys") -> list[dict]:
    out, after = [], None
    while True:
        params = {"limit": 100, **({"after": after} if after else {})}
        page = httpx.get(server.base_url + path, params=params, headers=_h(mk), timeout=10).json()
        out += page["data"]
        if not page["has_more"]:
            return out
        after = page["last_id"]


def test_live_keys_are_capped_by_the_plan(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "cheapest.toml"
    config.write_text("[plans.tiny]\nrpm = 5\ntpm = 5000\nmax_keys = 3\n")
    server = server_factory(extra_env={"CHEAPEST_CONFIG": str(config)})
    _, mk = server.create_account(plan="tiny")  # it holds one key already: its management key
    made = [_new_key(server, mk) for _ in range(3)]
    assert [r.status_code for r in made] == [201, 201, 409]
    assert made[2].json()["error"]["code"] == "key_limit_reached" and "3" in made[2].json()["error"]["message"]
    assert httpx.post(server.base_url + "/api/management-keys", json={}, headers=_h(mk), timeout=10).status_code == 409
    plans = {p["name"]: p for p in httpx.get(server.base_url + "/api/plans", timeout=10).json()["data"]}
    assert plans["tiny"]["max_keys"] == 3 and plans["free"]["max_keys"] == 1000
    assert httpx.delete(f"{server.base_url}/api/keys/{made[0].json()['id']}", headers=_h(mk),
                        timeout=10).status_code == 200
    assert _new_key(server, mk).status_code == 201  # room again


@pytest.mark.parametrize(("field", "value"), [("name", "n" * 201), ("models", ["m"] * 17), ("models", ["m" * 129])])
def test_key_fields_are_bounded(server_factory, field: str, value: object) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
    _, mk = server.create_account()
    r = _new_key(server, mk, **{field: value})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith(field), r.text


def test_a_full_store_is_a_507_that_loses_nothing(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(extra_env={"CHEAPEST_LMDB_MAP_SIZE": str(SMALL_STORE)})
    store = open_store(server.data_dir, map_size=SMALL_STORE)
    try:
        account, mk = accounts.create_account(store, "full@example.test", "pro", load_pepper(server.data_dir))
    finally:
        store.close()
    sk = None
    statuses: list[int] = []
    big = {"name": "n" * 200, "models": [MODEL] + [f"{i:0>128}" for i in range(15)]}
    while not statuses or statuses[-1] == 201:
        r = _new_key(server, mk, **big)
        statuses.append(r.status_code)
        sk = sk or r.json().get("key")
        assert len(statuses) < 500, "the store never filled"
    assert statuses[-1] == 507 and set(statuses) == {201, 507}, statuses
    err = r.json()["error"]
    assert (err["code"], err["type"]) == ("insufficient_storage", "server_error")
    made = statuses.count(201)
    for _ in range(2):  # still full: refused again, and nothing half-written
        assert _new_key(server, mk, **big).status_code == 507
        assert len(_all_keys(server, mk)) == made
    assert len(_all_keys(server, mk, "/api/management-keys")) == 1
    # Everything written before still works: the keys authenticate, answers are served (their usage waits in
    # the worker's meter, retried every flush), reads answer.
    r = httpx.post(server.v1 + "/chat/completions", json={"model": MODEL, "messages": MSG}, headers=_h(sk),
                   timeout=10)
    assert r.status_code == 200, r.text
    status = httpx.get(server.base_url + "/api/billing/status", headers=_h(mk), timeout=10)
    assert status.status_code == 200 and status.json()["keys"] == made
    time.sleep(1)
    assert "unhandled" not in server.output() and "the store is full" in server.output()


@pytest.mark.slow  # 40,000 keys
def test_counting_many_keys_happens_in_the_store_off_the_event_loop(server_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
    account_id, mk = server.create_account()
    # Written here without an fsync per key (a test shortcut; the server's store syncs every commit).
    monkeypatch.setattr("cheapest.store.lmdb.store.lmdb.open", partial(lmdb.open, sync=False))
    store = open_store(server.data_dir)
    try:
        for i in range(40_000):
            store.create_key(KeyRecord(id=f"key_bulk{i:06d}", account_id=account_id, kind="sk",
                                       hash=i.to_bytes(32, "big"), hint="sk_…bulk", name="bulk", created_at=0,
                                       disabled=i % 4 == 0))
        store.env.sync(True)
    finally:
        store.close()
    worst = 0.0
    done = threading.Event()

    def probe() -> None:  # /healthz on the same (only) worker while the status is worked out
        nonlocal worst
        with httpx.Client(timeout=10) as client:
            while not done.is_set():
                started = time.monotonic()
                assert client.get(server.base_url + "/healthz").status_code == 200
                worst = max(worst, time.monotonic() - started)

    thread = threading.Thread(target=probe)
    thread.start()
    try:
        timings = []
        for _ in range(3):
            started = time.monotonic()
            status = httpx.get(server.base_url + "/api/billing/status", headers=_h(mk), timeout=30).json()
            timings.append(time.monotonic() - started)
            assert (status["keys"], status["active_keys"]) == (40_000, 30_000)
    finally:
        done.set()
        thread.join()
    print(f"\nbilling status over 40,000 keys: {min(timings) * 1000:.0f} ms; slowest /healthz meanwhile "
          f"{worst * 1000:.0f} ms")
    assert worst < min(timings) / 2 or worst < 0.05, (worst, timings)
