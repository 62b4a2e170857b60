"""Accounts on a real two-worker server: key changes while traffic flows (no lost updates, seen by every worker
at once), usage agreeing exactly with the requests made, budget windows and credit balances running out."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from cheapest.store import open_store
from fixtures_server import ServerProcess, start_server

MODEL = "SmolLM2-135M-Instruct"
MSG = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT_USD_PER_MTOK, COMPLETION_USD_PER_MTOK = 100.0, 200.0  # 100 / 200 micro-dollars per token

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("accounts-workers")
    config = tmp / "cheapest.toml"
    config.write_text(f'[prices."{MODEL}"]\nprompt_usd_per_mtok = {PROMPT_USD_PER_MTOK}\n'
                      f'completion_usd_per_mtok = {COMPLETION_USD_PER_MTOK}\n'
                      '[plans.bulk]\nrpm = 1000000\ntpm = 1000000000\n')
    s = start_server(tmp, workers=2, extra_env={"CHEAPEST_CONFIG": str(config)})
    yield s
    s.stop()


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _chat(server: ServerProcess, sk: str) -> httpx.Response:
    # A new connection per call: the kernel spreads them over both workers.
    return httpx.post(server.v1 + "/chat/completions", json={"model": MODEL, "messages": MSG}, headers=_h(sk),
                      timeout=10)


def _cost(usage: dict) -> int:
    return int(usage["prompt_tokens"] * PROMPT_USD_PER_MTOK + usage["completion_tokens"] * COMPLETION_USD_PER_MTOK)


def _flushed(server: ServerProcess) -> None:
    time.sleep(0.6)  # both workers flush usage every 0.2 s


def test_both_workers_take_traffic(server: ServerProcess) -> None:
    pids = {httpx.get(server.base_url + "/_test/process", timeout=5).json()["pid"] for _ in range(40)}
    assert len(pids) == 2  # the tests below do exercise two workers


def test_revoke_disable_relimit_seen_by_every_worker_while_traffic_flows(server: ServerProcess) -> None:
    _, mk = server.create_account(plan="bulk")  # no rate limit in the way of the traffic
    revoke, disable, relimit = (server.create_key(mk, name=n) for n in ("revoke", "disable", "relimit"))
    log: list[tuple[str, float, int, str, float]] = []  # key name, sent at, status, rpm limit header, answered at
    stop = threading.Event()

    def traffic(name: str, secret: str) -> None:
        while not stop.is_set():
            sent = time.monotonic()
            r = _chat(server, secret)
            log.append((name, sent, r.status_code, r.headers.get("x-ratelimit-limit-requests", ""), time.monotonic()))

    threads = [threading.Thread(target=traffic, args=(n, str(k["key"])))
               for n, k in (("revoke", revoke), ("disable", disable), ("relimit", relimit)) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        api = httpx.Client(base_url=server.base_url, headers=_h(mk), timeout=10)
        t_changing = time.monotonic()
        assert api.delete(f"/api/keys/{revoke['id']}").status_code == 200
        t_revoked = time.monotonic()
        assert api.patch(f"/api/keys/{disable['id']}", json={"disabled": True}).status_code == 200
        t_disabled = time.monotonic()
        assert api.patch(f"/api/keys/{relimit['id']}", json={"limits": {"rpm": 7}}).status_code == 200
        t_relimited = time.monotonic()
        api.close()
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join()

    def after(name: str, t0: float) -> list[tuple[str, float, int, str, float]]:
        return [x for x in log if x[0] == name and x[1] > t0]

    before = [x for x in log if x[4] < t_changing]  # answered before the first change was sent
    assert len(before) >= 10 and all(x[2] == 200 and x[3] == "1000000" for x in before), [x for x in before if x[2] != 200]
    # The epoch makes every change visible on the NEXT request of every worker (the issue asks for 1 s): not
    # one request sent after a change returned got the old answer, on either worker.
    assert len(after("revoke", t_revoked)) >= 5 and {x[2] for x in after("revoke", t_revoked)} == {401}
    assert len(after("disable", t_disabled)) >= 5 and {x[2] for x in after("disable", t_disabled)} == {403}
    relimited = after("relimit", t_relimited)
    assert len(relimited) >= 5 and {x[3] for x in relimited} == {"7"}
    assert [x[2] for x in relimited].count(200) <= 7 and 429 in {x[2] for x in relimited}


def test_concurrent_patches_and_creates_lose_nothing(server: ServerProcess) -> None:
    _, mk = server.create_account()
    key = server.create_key(mk)
    kid = key["id"]
    n = 25

    def patch(field: str, i: int) -> int:
        body = {"name": f"name-{i}"} if field == "name" else {"limits": {"rpm": i + 1}}
        return httpx.patch(f"{server.base_url}/api/keys/{kid}", json=body, headers=_h(mk), timeout=10).status_code

    def series(field: str) -> list[int]:
        return [patch(field, i) for i in range(n)]  # in order, each on a fresh connection (either worker)

    def creates(_: int) -> list[str]:
        return [str(server.create_key(mk, name="bulk")["id"]) for _ in range(10)]

    with ThreadPoolExecutor(4) as pool:
        names, limits = pool.submit(series, "name"), pool.submit(series, "limits")
        made = [pool.submit(creates, i) for i in range(2)]
        assert names.result() == [200] * n and limits.result() == [200] * n
        created = {k for f in made for k in f.result()}
    info = httpx.get(f"{server.base_url}/api/keys/{kid}", headers=_h(mk), timeout=10).json()
    # Each field holds its own series' last write: neither PATCH stream overwrote the other's field.
    assert info["name"] == f"name-{n - 1}" and info["limits"] == {"rpm": n}
    listed = httpx.get(f"{server.base_url}/api/keys", params={"limit": 100}, headers=_h(mk), timeout=10).json()
    assert {k["id"] for k in listed["data"]} == created | {kid} and len(created) == 20


def test_usage_agrees_exactly_across_workers(server: ServerProcess) -> None:
    _, mk = server.create_account(plan="pro")  # 200 rpm for the account: its two keys share them
    keys = [server.create_key(mk, name=f"k{i}") for i in range(2)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: (i % 2, _chat(server, str(keys[i % 2]["key"]))), range(30)))
    expected: dict[str, list[int]] = {}
    for i, r in results:
        assert r.status_code == 200
        u = r.json()["usage"]
        t = expected.setdefault(str(keys[i]["id"]), [0, 0, 0, 0])
        t[0] += 1
        t[1] += u["prompt_tokens"]
        t[2] += u["completion_tokens"]
        t[3] += _cost(u)
    _flushed(server)
    body = httpx.get(f"{server.base_url}/api/usage", headers=_h(mk), timeout=10).json()
    got = {t["key_id"]: [t["requests"], t["prompt_tokens"], t["completion_tokens"], t["cost_micro"]]
           for t in body["totals"]}
    assert got == expected
    for k in keys:
        one = httpx.get(f"{server.base_url}/api/usage/{k['id']}", headers=_h(mk), timeout=10).json()
        assert [t["cost_micro"] for t in one["totals"]] == [expected[str(k["id"])][3]]
        assert one["totals"][0]["cost_usd"] == pytest.approx(expected[str(k["id"])][3] / 1e6)


def test_budget_window_runs_out(server: ServerProcess) -> None:
    _, mk = server.create_account()
    probe = _chat(server, str(server.create_key(mk, name="probe")["key"]))
    per_request = _cost(probe.json()["usage"])
    cap_micro = per_request * 5 + per_request // 2  # room for 5.5 requests
    key = server.create_key(mk, limits={"budget_usd": cap_micro / 1e6, "budget_window": "1d"})
    ok, refused = 0, None
    for _ in range(40):
        r = _chat(server, str(key["key"]))
        if r.status_code == 200:
            ok += 1
            continue
        refused = r
        break
    assert refused is not None and refused.status_code == 429, "the budget never ran out"
    err = refused.json()["error"]
    assert err["code"] == "budget_exceeded" and "1d" in err["message"] and "resets at" in err["message"]
    day_end = (int(time.time()) // 86400 + 1) * 86400
    assert refused.headers["x-budget-reset"] == str(day_end)
    assert 0 < int(refused.headers["retry-after"]) <= 86400
    # Spend is checked before each request: 6 fit (the 6th crosses the cap); other workers' unflushed usage
    # (at most one 0.2 s flush interval) may let a few more through, never fewer.
    assert 6 <= ok <= 12
    _flushed(server)
    for _ in range(6):  # once flushed, every worker refuses
        assert _chat(server, str(key["key"])).status_code == 429
    usage = httpx.get(f"{server.base_url}/api/usage/{key['id']}", headers=_h(mk), timeout=10).json()
    assert usage["totals"][0]["requests"] == ok  # refused requests never ran and are not billed
    # Another key of the same account has its own budget; raising this key's budget lets it through again.
    r = httpx.patch(f"{server.base_url}/api/keys/{key['id']}", headers=_h(mk), timeout=10,
                    json={"limits": {"budget_usd": 1000, "budget_window": "1d"}})
    assert r.status_code == 200 and _chat(server, str(key["key"])).status_code == 200


def test_credits_run_out_then_top_up(server: ServerProcess) -> None:
    account_id, mk = server.create_account(plan="payg")
    key = server.create_key(mk)
    sk = str(key["key"])
    r = _chat(server, sk)
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_quota"  # no credit yet
    grant = server.cli("accounts", "grant-credit", account_id, "--usd", "0.02", "--ref", "welcome", "--json")
    assert grant.returncode == 0, grant.stderr
    spent, ok = 0, 0
    for _ in range(200):
        r = _chat(server, sk)
        if r.status_code != 200:
            break
        ok += 1
        spent += _cost(r.json()["usage"])
    assert r.status_code == 402 and "credit balance" in r.json()["error"]["message"]
    assert ok > 0 and spent >= 20_000
    _flushed(server)
    status = httpx.get(f"{server.base_url}/api/billing/status", headers=_h(mk), timeout=10).json()
    # One owner of the balance (the ledger), debited by exactly each request's cost.
    assert status["credit_balance_micro"] == 20_000 - spent <= 0
    assert status["funding"] == "credits"
    usage = httpx.get(f"{server.base_url}/api/usage", headers=_h(mk), timeout=10).json()
    assert usage["totals"][0]["requests"] == ok and usage["totals"][0]["cost_micro"] == spent
    # The same grant reference again changes nothing; a new one brings the key back.
    again = server.cli("accounts", "grant-credit", account_id, "--usd", "0.02", "--ref", "welcome", "--json")
    assert '"applied": false' in again.stdout
    assert _chat(server, sk).status_code == 402
    server.cli("accounts", "grant-credit", account_id, "--usd", "1", "--ref", "topup-2")
    assert _chat(server, sk).status_code == 200
    store = open_store(server.data_dir)
    try:
        assert [e.ref for e in store.ledger.journal(account_id)] == ["grant:welcome", "grant:topup-2"]
    finally:
        store.close()
