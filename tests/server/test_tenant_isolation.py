"""No tenant can hurt another, through a real server: a plan's limits bind the whole account, refusals are cheap
and counted, a full rate-limit table is a clear 503 that revocation and deletion relieve, bad sampling fields are
400s naming the field, a failure inside a stream ends it at once, and a panic is a generic 500."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from cheapest.store import accounts, open_store
from cheapest.store.secrets import load_pepper
from fixtures_server import ApiAccount, ServerProcess

MODEL = "SmolLM2-135M-Instruct"
MSG = [{"role": "user", "content": "What is the capital of France?"}]
CANARY = "CANARY-4f1e-tenant-text"
CRASH, PANIC = 7, 8  # seeds the fixed engine fails on after its first token (a ValueError, a PanicException)


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _chat(server: ServerProcess, sk: str, client: httpx.Client | None = None, **body: object) -> httpx.Response:
    post = client.post if client is not None else httpx.post
    return post(server.v1 + "/chat/completions", json={"model": MODEL, "messages": MSG, **body}, headers=_h(sk),
                timeout=10)


def _error(r: httpx.Response) -> dict[str, object]:
    body = r.json()
    assert set(body) == {"error"} and CANARY not in r.text, r.text
    return dict(body["error"])


def _store_key(server: ServerProcess, account_id: str, **limits: int) -> tuple[str, str]:
    """An inference key made through the store (not the API, which spends a slot of its own) -> (id, secret)."""
    from cheapest.store import KeyLimits

    store = open_store(server.data_dir)
    try:
        record, secret = accounts.create_key(store, account_id, "sk", "k", load_pepper(server.data_dir),
                                             limits=KeyLimits(**limits))
    finally:
        store.close()
    return record.id, secret


# --- plan limits bind the account ---------------------------------------------------------------------------------
def test_plan_rpm_binds_the_account_across_its_keys(api_account: ApiAccount) -> None:
    server = api_account.server
    keys = [api_account.sk] + [str(server.create_key(api_account.mk, name=f"k{i}")["key"]) for i in range(2)]
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda i: _chat(server, keys[i % 3]).status_code, range(27)))
    # The free plan's 20 requests a minute, for the account as a whole (another may fall in while this runs).
    assert statuses.count(200) in (20, 21) and statuses.count(429) == 27 - statuses.count(200), statuses
    r = _chat(server, keys[2])
    assert r.status_code == 429 and "free plan's limit of 20 requests" in str(_error(r)["message"])
    assert r.headers["x-ratelimit-limit-requests"] == "20" and int(r.headers["retry-after"]) >= 1


def test_a_keys_own_limit_applies_inside_the_plans_and_refusals_charge_nothing(api_account: ApiAccount) -> None:
    server = api_account.server
    tight = str(server.create_key(api_account.mk, name="tight", limits={"rpm": 2})["key"])
    statuses = [_chat(server, tight).status_code for _ in range(5)]
    assert statuses == [200, 200, 429, 429, 429]
    r = _chat(server, tight)
    assert "this key's limit of 2 requests" in str(_error(r)["message"])
    assert r.headers["x-ratelimit-limit-requests"] == "2"
    # All or nothing: the key's refused requests took nothing from the account, which has 18 left.
    assert [_chat(server, api_account.sk).status_code for _ in range(18)] == [200] * 18
    assert _chat(server, api_account.sk).status_code == 429


# --- cheap refusals first -----------------------------------------------------------------------------------------
def test_request_rate_is_checked_before_the_body_and_counts_refusals(api_account: ApiAccount) -> None:
    server = api_account.server
    key = str(server.create_key(api_account.mk, limits={"rpm": 3})["key"])
    garbage = b"{" + CANARY.encode() * 1000
    bad = [httpx.post(server.v1 + "/chat/completions", content=garbage, headers=_h(key), timeout=10)
           for _ in range(2)]
    assert [r.status_code for r in bad] == [400, 400]
    assert _chat(server, key, seed=-1).status_code == 400  # a refused field: counted as well
    # The key's three requests are spent, by refusals: the next is refused before its body is even parsed.
    r = httpx.post(server.v1 + "/chat/completions", content=garbage, headers=_h(key), timeout=10)
    assert r.status_code == 429 and _error(r)["code"] == "rate_limit_exceeded"
    assert _chat(server, key).status_code == 429


# --- sampling fields at the edge ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value"), [
    ("seed", -1), ("seed", 2**64), ("seed", 2**70), ("seed", 1.5), ("temperature", 2.5), ("temperature", -0.1),
    ("top_p", 0), ("top_p", 1.01), ("max_tokens", 0), ("stop", ["a", "b", "c", "d", "e"]), ("stop", "x" * 257),
    ("stop", ["ok", "y" * 257]),
])
def test_bad_sampling_fields_are_400s_naming_the_field(api_account: ApiAccount, field: str, value: object) -> None:
    r = _chat(api_account.server, api_account.sk, **{field: value})
    assert r.status_code == 400, r.text
    err = _error(r)
    assert err["param"] is not None and str(err["param"]).split("[")[0] == field, err
    assert str(value) not in str(err["message"]) or len(str(value)) < 3


def test_edge_values_of_sampling_fields_are_served(api_account: ApiAccount) -> None:
    server = api_account.server
    for fields in ({"seed": 0}, {"seed": 2**64 - 1}, {"temperature": 2.0, "top_p": 1.0}, {"stop": ["z" * 256] * 4}):
        assert _chat(server, api_account.sk, **fields).status_code == 200, fields


@pytest.fixture(scope="module")
def failing_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from fixtures_server import start_server

    s = start_server(tmp_path_factory.mktemp("failing"), extra_env={
        "CHEAPEST_MODEL_OPTION_CRASH_SEED": str(CRASH), "CHEAPEST_MODEL_OPTION_PANIC_SEED": str(PANIC),
        "CHEAPEST_MODEL_OPTION_DELAY": "0.01"})
    _, mk = s.create_account(plan="pro")
    s.keys.append(("sk", str(s.create_key(mk)["key"])))
    yield s
    s.stop()


@pytest.mark.parametrize("seed", [CRASH, PANIC])
def test_a_failure_mid_stream_ends_it_with_an_error_event_at_once(failing_server: ServerProcess, seed: int) -> None:
    sk = failing_server.keys[0][1]
    messages = [{"role": "user", "content": CANARY}]
    started = time.monotonic()
    with httpx.stream("POST", failing_server.v1 + "/chat/completions", headers=_h(sk), timeout=10,
                      json={"model": MODEL, "messages": messages, "stream": True, "seed": seed}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert time.monotonic() - started < 5  # closed at once, not at the client's timeout
    assert events[-1] == "[DONE]" and CANARY not in "".join(events)
    error = json.loads(events[-2])["error"]
    assert (error["type"], error["code"]) == ("server_error", "internal_error")
    assert json.loads(events[1])["choices"][0]["delta"]["content"]  # the first token came through before it


@pytest.mark.parametrize(("seed", "kind"), [(CRASH, "ValueError"), (PANIC, "PanicException")])
def test_a_failure_or_a_rust_panic_is_a_generic_500_logged_by_type(failing_server: ServerProcess, seed: int,
                                                                   kind: str) -> None:
    sk = failing_server.keys[0][1]
    r = httpx.post(failing_server.v1 + "/chat/completions", headers=_h(sk), timeout=10,
                   json={"model": MODEL, "messages": [{"role": "user", "content": CANARY}], "seed": seed})
    assert r.status_code == 500 and _error(r)["code"] == "internal_error"
    assert httpx.get(failing_server.base_url + "/healthz", timeout=5).status_code == 200  # the worker lives on
    deadline = time.monotonic() + 5
    while f"unhandled {kind} on POST /v1/chat/completions" not in failing_server.output():
        assert time.monotonic() < deadline, failing_server.output()[-2000:]
        time.sleep(0.1)
    assert CANARY not in failing_server.output()


# --- the shared rate-limit table --------------------------------------------------------------------------------
@pytest.mark.slow  # a two-worker server
def test_a_full_rate_limit_table_is_a_503_until_a_revocation_or_deletion_frees_slots(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(workers=2, extra_env={"CHEAPEST_RATELIMIT_CAPACITY": "16"})
    owners = [server.create_account() for _ in range(10)]
    # The first account's key has limits of its own: its requests hold 4 slots (the plan's rpm and tpm for the
    # account, the key's own two); every other account's keys share their account's 2.
    own_id, own = _store_key(server, owners[0][0], rpm=5, tpm=1000)
    sks = [own] + [_store_key(server, account_id)[1] for account_id, _ in owners[1:]]

    def fresh(sk: str, **body: object) -> httpx.Response:  # a new connection: either worker may take it
        with httpx.Client() as client:
            return _chat(server, sk, client, **body)

    assert [fresh(sk).status_code for sk in sks[:7]] == [200] * 7  # 4 + 6 x 2 = 16 slots, all live
    for stream in (False, True):
        r = fresh(sks[7], stream=stream)
        assert r.status_code == 503, r.text
        assert _error(r)["code"] == "rate_limiter_full" and int(r.headers["retry-after"]) >= 1
    assert "rate-limit table is full" in server.output()
    # Revoking the key frees its own two slots at once, on every worker.
    assert httpx.delete(f"{server.base_url}/api/keys/{own_id}", headers=_h(owners[0][1]), timeout=10).status_code == 200
    assert fresh(sks[7]).status_code == 200
    assert fresh(sks[8]).status_code == 503
    # Deleting an account frees its slots.
    assert httpx.delete(server.base_url + "/api/account", headers=_h(owners[1][1]), timeout=10).status_code == 200
    assert fresh(sks[8]).status_code == 200
    assert fresh(sks[9]).status_code == 503
    assert "unhandled" not in server.output()


# --- usage report ranges ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("query", [{"from": str(2**70)}, {"to": str(2**70)}, {"from": "-1"},
                                   {"from": "0", "to": str(2**63)}, {"to": "99999-01-01"}])
def test_usage_ranges_out_of_bounds_are_400s(api_account: ApiAccount, query: dict[str, str]) -> None:
    r = httpx.get(api_account.server.base_url + "/api/usage", params=query, headers=_h(api_account.mk), timeout=10)
    assert r.status_code == 400 and _error(r)["param"] in ("from", "to"), r.text


def test_files_the_store_holds_are_owner_only(fixed_server: ServerProcess) -> None:
    data = Path(fixed_server.data_dir)
    paths = [data, data / "store", data / "store" / "data.mdb", data / "store" / "lock.mdb", data / "secrets",
             data / "secrets" / "pepper", data / "ratelimit-v2.bin"]
    for path in paths:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
