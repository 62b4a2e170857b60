"""Management API on a real server (one worker, fixed engine): keys, usage, plans, billing status, key kinds,
object-level authorization on every route, clear 400s for bad bodies and queries."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from cheapest.store import accounts, open_store
from fixtures_server import ApiAccount, ServerProcess, sdk

MODEL = "SmolLM2-135M-Instruct"
MSG = [{"role": "user", "content": "What is the capital of France?"}]
pytestmark = pytest.mark.usefixtures("sdk_clients")


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _api(server: ServerProcess, method: str, path: str, key: str | None, **kw: object) -> httpx.Response:
    return httpx.request(method, server.base_url + path, headers=_h(key) if key else {}, timeout=10, **kw)  # type: ignore[arg-type]


def _chat(server: ServerProcess, sk: str) -> httpx.Response:
    return httpx.post(server.v1 + "/chat/completions", json={"model": MODEL, "messages": MSG}, headers=_h(sk),
                      timeout=10)


def _wait_usage(server: ServerProcess, mk: str, path: str, requests: int, timeout: float = 5.0) -> dict:
    """Usage is flushed every 0.2 s here; poll until the expected request count shows (or time out)."""
    deadline = time.monotonic() + timeout
    while True:
        body = _api(server, "GET", path, mk).json()
        if sum(t["requests"] for t in body["totals"]) >= requests or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    time.sleep(0.4)  # a generation is metered while it runs: its last tokens may land one flush later
    return _api(server, "GET", path, mk).json()


def test_key_lifecycle_secret_shown_once(api_account: ApiAccount) -> None:
    s, mk = api_account.server, api_account.mk
    created = s.create_key(mk, name="ci", limits={"rpm": 5, "budget_usd": 1.5, "budget_window": "5h"},
                           models=[MODEL], expires_at=int(time.time()) + 3600)
    secret, kid = str(created["key"]), str(created["id"])
    assert secret.startswith("sk_") and created["hint"] == f"sk_…{secret[-4:]}"
    assert created["limits"] == {"rpm": 5, "budget_usd": 1.5, "budget_window": "5h"}
    one = _api(s, "GET", f"/api/keys/{kid}", mk)
    listed = _api(s, "GET", "/api/keys", mk)
    for r in (one, listed):
        assert r.status_code == 200 and secret not in r.text and secret[3:] not in r.text
    assert one.json()["name"] == "ci" and one.json()["models"] == [MODEL]
    ids = [k["id"] for k in listed.json()["data"]]
    assert kid in ids and api_account.key_id in ids
    assert all(k["kind"] == "sk" for k in listed.json()["data"])  # management keys are the operator's
    # The key works, within its own rpm (inside the plan's 20).
    r = _chat(s, secret)
    assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "5"
    # PATCH changes only what it names; null clears; limits are replaced as a whole.
    p = _api(s, "PATCH", f"/api/keys/{kid}", mk, json={"name": "renamed"}).json()
    assert p["name"] == "renamed" and p["limits"]["rpm"] == 5 and p["expires_at"] is not None
    p = _api(s, "PATCH", f"/api/keys/{kid}", mk, json={"expires_at": None, "limits": {"tpm": 100}}).json()
    assert p["expires_at"] is None and p["limits"] == {"tpm": 100} and p["name"] == "renamed"
    assert _chat(s, secret).headers["x-ratelimit-limit-requests"] == "20"  # the plan's rpm again
    p = _api(s, "PATCH", f"/api/keys/{kid}", mk, json={"limits": None, "models": None}).json()
    assert p["limits"] == {} and p["models"] is None
    assert _api(s, "DELETE", f"/api/keys/{kid}", mk).json() == {"id": kid, "deleted": True, "object": "api_key"}
    assert _chat(s, secret).status_code == 401
    assert _api(s, "GET", f"/api/keys/{kid}", mk).status_code == 404
    assert _api(s, "DELETE", f"/api/keys/{kid}", mk).status_code == 404


def test_pagination(api_account: ApiAccount) -> None:
    s, mk = api_account.server, api_account.mk
    made = {api_account.key_id} | {str(s.create_key(mk, name=f"k{i}")["id"]) for i in range(6)}
    seen: list[str] = []
    after = None
    while True:
        q = {"limit": 3} | ({"after": after} if after else {})
        page = _api(s, "GET", "/api/keys", mk, params=q).json()
        seen += [k["id"] for k in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert sorted(seen) == sorted(made) and len(seen) == len(set(seen))


def test_key_kinds_are_not_interchangeable(api_account: ApiAccount) -> None:
    s = api_account.server
    with pytest.raises(openai.PermissionDeniedError, match=r"inference key \(sk_"):
        sdk(s.v1, api_account.mk).models.list()
    r = _api(s, "GET", "/api/keys", api_account.sk)
    assert r.status_code == 403 and "management key (mk_" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "wrong_key_kind"
    for path in ("/api/usage", "/api/billing/status"):
        assert _api(s, "GET", path, api_account.sk).status_code == 403
        assert _api(s, "GET", path, None).status_code == 401


def test_every_route_refuses_another_accounts_objects(api_account: ApiAccount) -> None:
    s = api_account.server
    victim_key, victim_mk = api_account.key_id, api_account.mk
    _, other_mk = s.create_account()
    assert _chat(s, api_account.sk).status_code == 200  # the victim has usage
    # The victim's own management key id is no more reachable than another account's key.
    store = open_store(s.data_dir)
    try:
        victim_mk_id = next(k.id for k in store.list_keys(api_account.account_id) if k.kind == "mk")
    finally:
        store.close()
    for target in (victim_key, victim_mk_id):
        attempts = [
            ("GET", f"/api/keys/{target}", None),
            ("PATCH", f"/api/keys/{target}", {"disabled": True}),
            ("PATCH", f"/api/keys/{target}", {"name": "pwned", "limits": {"rpm": 1}}),
            ("DELETE", f"/api/keys/{target}", None),
            ("GET", f"/api/usage/{target}", None),
        ]
        for method, path, body in attempts:
            r = _api(s, method, path, other_mk, **({"json": body} if body is not None else {}))
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["error"]["code"] == "key_not_found"
            missing = _api(s, method, path.replace(target, "key_0000000000000000"), other_mk,
                           **({"json": body} if body is not None else {}))
            assert missing.status_code == 404 and missing.json() == r.json()  # indistinguishable from unknown
    # Management keys are not changeable through the API by their own account either.
    assert _api(s, "PATCH", f"/api/keys/{victim_mk_id}", victim_mk, json={"disabled": True}).status_code == 404
    listed = _api(s, "GET", "/api/keys", other_mk).json()["data"]
    assert victim_key not in [k["id"] for k in listed]
    usage = _api(s, "GET", "/api/usage", other_mk).json()
    assert usage["data"] == [] and usage["totals"] == []
    status = _api(s, "GET", "/api/billing/status", other_mk).json()
    assert status["keys"] == 0 and status["account_id"] != api_account.account_id
    # Nothing changed for the victim.
    info = _api(s, "GET", f"/api/keys/{victim_key}", victim_mk).json()
    assert info["disabled"] is False and info["name"] == "test" and info["limits"] == {}
    assert _chat(s, api_account.sk).status_code == 200


@pytest.mark.parametrize("method,path,body,param", [
    ("POST", "/api/keys", b"{", None),
    ("POST", "/api/keys", b"", None),
    ("POST", "/api/keys", {"name": ""}, "name"),
    ("POST", "/api/keys", {"nmae": "typo"}, None),
    ("POST", "/api/keys", {"limits": {"rpm": 0}}, "limits.rpm"),
    ("POST", "/api/keys", {"limits": {"rpm": "ten"}}, "limits.rpm"),
    ("POST", "/api/keys", {"limits": {"budget_usd": 5, "budget_window": "2h"}}, "limits.budget_window"),
    ("POST", "/api/keys", {"limits": {"budget_usd": 5}}, "limits.budget_window"),
    ("POST", "/api/keys", {"limits": {"budget_window": "1d"}}, "limits.budget_usd"),
    ("POST", "/api/keys", {"limits": {"budget_usd": -1, "budget_window": "1d"}}, "limits.budget_usd"),
    ("POST", "/api/keys", {"models": []}, "models"),
    ("POST", "/api/keys", {"expires_at": "tomorrow"}, "expires_at"),
    ("PATCH", "/api/keys/{kid}", {"disabled": "yes"}, "disabled"),
    ("PATCH", "/api/keys/{kid}", {"secret": "x"}, None),
    ("PATCH", "/api/keys/{kid}", [1, 2], None),
    ("GET", "/api/keys?limit=abc", None, "limit"),
    ("GET", "/api/keys?limit=1000", None, "limit"),
    ("GET", "/api/usage?group_by=week", None, "group_by"),
    ("GET", "/api/usage?from=yesterday", None, "from"),
    ("GET", "/api/usage?from=2000&to=1000", None, "from"),
    ("GET", "/api/usage?group_by=hour&from=0&to=99999999", None, "from"),
    ("POST", "/api/billing/checkout", {"plan": "free"}, "plan"),
    ("POST", "/api/billing/topup", {"amount_usd": True}, "amount_usd"),
    ("POST", "/api/billing/verify-topup", {"tx_hash": "0x1"}, None),
])
def test_bad_bodies_get_clear_400s_and_change_nothing(api_account: ApiAccount, method, path, body, param) -> None:  # type: ignore[no-untyped-def]
    s, mk = api_account.server, api_account.mk
    before = _api(s, "GET", "/api/keys", mk).json()
    path = path.replace("{kid}", api_account.key_id)
    kw = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    r = _api(s, method, path, mk, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert _api(s, "GET", "/api/keys", mk).json() == before


def test_usage_endpoints_agree_with_requests(api_account: ApiAccount) -> None:
    s, mk = api_account.server, api_account.mk
    second = s.create_key(mk, name="second")
    sent = {api_account.key_id: [0, 0, 0], str(second["id"]): [0, 0, 0]}
    for i in range(7):
        kid, secret = (api_account.key_id, api_account.sk) if i % 3 else (str(second["id"]), str(second["key"]))
        u = _chat(s, secret).json()["usage"]
        t = sent[kid]
        t[0] += 1
        t[1] += u["prompt_tokens"]
        t[2] += u["completion_tokens"]
    body = _wait_usage(s, mk, "/api/usage", 7)
    got = {t["key_id"]: [t["requests"], t["prompt_tokens"], t["completion_tokens"]] for t in body["totals"]}
    assert got == sent and all(t["model"] == MODEL for t in body["totals"])
    hour = int(time.time()) // 3600 * 3600
    hourly = _api(s, "GET", "/api/usage", mk, params={"group_by": "hour", "from": hour - 7200}).json()
    assert {b["start"] for b in hourly["data"]} <= {hour, hour - 3600}  # a request may straddle the hour
    assert sum(b["requests"] for b in hourly["data"]) == 7
    daily = _api(s, "GET", "/api/usage", mk, params={"group_by": "day"}).json()
    assert all(b["start"] % 86400 == 0 for b in daily["data"])
    one = _api(s, "GET", f"/api/usage/{second['id']}", mk).json()
    assert [[t["requests"], t["prompt_tokens"], t["completion_tokens"]] for t in one["totals"]] == [
        sent[str(second["id"])]]
    # A range before any request holds nothing; ISO dates are accepted.
    empty = _api(s, "GET", "/api/usage", mk, params={"from": "2001-01-01", "to": "2001-01-02"}).json()
    assert empty["data"] == [] and empty["from"] == 978307200
    # A revoked key's usage stays readable (it was billed).
    _api(s, "DELETE", f"/api/keys/{second['id']}", mk)
    assert _api(s, "GET", f"/api/usage/{second['id']}", mk).json()["totals"] == one["totals"]


def test_plans_are_public_and_documented(fixed_server: ServerProcess) -> None:
    r = httpx.get(fixed_server.base_url + "/api/plans", timeout=10)
    assert r.status_code == 200
    plans = {p["name"]: p for p in r.json()["data"]}
    assert (plans["standard"]["rpm"], plans["standard"]["tpm"], plans["standard"]["funding"]) == (
        60, 3333, "subscription")
    assert (plans["pro"]["rpm"], plans["pro"]["tpm"], plans["pro"]["price_usd_month"]) == (200, 13333, 20.0)
    assert plans["free"]["default"] is True and plans["free"]["price_usd_month"] == 0
    assert plans["payg"]["funding"] == "credits"
    assert plans["pro"]["budget_windows"] == ["5h", "8h", "1d", "30d"]
    paths = httpx.get(fixed_server.base_url + "/openapi.json", timeout=10).json()["paths"]
    for path, method in [("/api/keys", "post"), ("/api/keys", "get"), ("/api/keys/{key_id}", "get"),
                         ("/api/keys/{key_id}", "patch"), ("/api/keys/{key_id}", "delete"), ("/api/usage", "get"),
                         ("/api/usage/{key_id}", "get"), ("/api/plans", "get"), ("/api/billing/status", "get"),
                         ("/api/billing/checkout", "post"), ("/api/billing/topup", "post"),
                         ("/api/billing/verify-topup", "post"), ("/webhooks/stripe", "post")]:
        assert method in paths[path], (path, method)
    assert "security" not in paths["/api/plans"]["get"]


def test_billing_status_and_unconfigured_payments(api_account: ApiAccount) -> None:
    s, mk = api_account.server, api_account.mk
    st = _api(s, "GET", "/api/billing/status", mk).json()
    assert (st["plan"], st["funding"], st["subscription_status"], st["credit_balance_micro"], st["keys"],
            st["active_keys"]) == ("free", "free", "none", 0, 1, 1)
    # No Stripe/USDC configuration on this server: 503, not a client error.
    assert _api(s, "POST", "/api/billing/checkout", mk, json={"plan": "pro"}).status_code == 503
    assert _api(s, "POST", "/api/billing/topup", mk, json={"amount_usd": 5}).status_code == 503
    assert _api(s, "POST", "/webhooks/stripe", None, content=b"{}").status_code == 503


def _store_change(server: ServerProcess, fn) -> None:  # type: ignore[no-untyped-def]
    """A change made by another process (the operator's CLI, a webhook on another worker)."""
    store = open_store(server.data_dir)
    try:
        fn(store)
    finally:
        store.close()


def test_account_and_subscription_changes_apply_on_the_next_request(api_account: ApiAccount) -> None:
    s, sk, aid = api_account.server, api_account.sk, api_account.account_id
    assert _chat(s, sk).status_code == 200  # cached by the worker now
    _store_change(s, lambda st: accounts.set_status(st, aid, "disabled"))
    r = _chat(s, sk)
    assert r.status_code == 403 and r.json()["error"]["code"] == "account_disabled"
    assert _api(s, "GET", "/api/keys", api_account.mk).status_code == 403
    _store_change(s, lambda st: accounts.set_status(st, aid, "active"))
    assert _chat(s, sk).status_code == 200
    # A subscription plan whose subscription was canceled: inference keys stop (403), management keys work.
    import msgspec

    _store_change(s, lambda st: st.update_account(aid, lambda a: msgspec.structs.replace(
        a, plan="standard", subscription_status="canceled")))
    r = _chat(s, sk)
    assert r.status_code == 403 and r.json()["error"]["code"] == "subscription_inactive"
    assert "canceled" in r.json()["error"]["message"]
    assert _api(s, "GET", "/api/billing/status", api_account.mk).json()["subscription_status"] == "canceled"
    # Active, but the paid period ended long ago and no renewal came: expired.
    _store_change(s, lambda st: st.update_account(aid, lambda a: msgspec.structs.replace(
        a, subscription_status="active", period_end=int(time.time()) - 3 * 86400)))
    r = _chat(s, sk)
    assert r.status_code == 403 and "expired" in r.json()["error"]["message"]
    _store_change(s, lambda st: st.update_account(aid, lambda a: msgspec.structs.replace(
        a, period_end=int(time.time()) + 86400)))
    r = _chat(s, sk)
    assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "60"  # the standard plan's


def test_management_keys_are_created_listed_and_revoked_never_the_last(api_account: ApiAccount) -> None:
    s, mk = api_account.server, api_account.mk
    created = _api(s, "POST", "/api/management-keys", mk, json={"name": "rotation"})
    assert created.status_code == 201, created.text
    second = created.json()
    assert second["kind"] == "mk" and second["key"].startswith("mk_") and second["name"] == "rotation"
    listed = _api(s, "GET", "/api/management-keys", second["key"]).json()  # the new key manages the account
    assert [k["kind"] for k in listed["data"]] == ["mk", "mk"] and second["id"] in {k["id"] for k in listed["data"]}
    assert all("key" not in k and "hash" not in k and k["hint"].startswith("mk_") for k in listed["data"])
    assert second["key"] not in str(listed) and mk not in str(listed)
    first_id = next(k["id"] for k in listed["data"] if k["id"] != second["id"])
    # Inference keys and management keys live on their own routes.
    assert all(k["kind"] == "sk" for k in _api(s, "GET", "/api/keys", mk).json()["data"])
    assert _api(s, "DELETE", f"/api/keys/{first_id}", mk).status_code == 404
    assert _api(s, "DELETE", f"/api/management-keys/{api_account.key_id}", mk).status_code == 404
    assert _api(s, "GET", "/api/management-keys", api_account.sk).status_code == 403
    # Rotate: the new key revokes the old one, which stops at once; the last one cannot go.
    assert _api(s, "DELETE", f"/api/management-keys/{first_id}", second["key"]).status_code == 200
    assert _api(s, "GET", "/api/management-keys", mk).status_code == 401
    last = _api(s, "DELETE", f"/api/management-keys/{second['id']}", second["key"])
    assert last.status_code == 409 and last.json()["error"]["code"] == "last_management_key"
    assert _api(s, "GET", "/api/billing/status", second["key"]).status_code == 200
    # Another account's management keys are unknown ids here.
    _, other_mk = s.create_account()
    other = _api(s, "GET", "/api/management-keys", other_mk).json()["data"][0]["id"]
    assert _api(s, "DELETE", f"/api/management-keys/{other}", second["key"]).status_code == 404


def test_cli_lists_and_rotates_management_keys(api_account: ApiAccount) -> None:
    s = api_account.server
    listed = s.cli("accounts", "keys", api_account.account_id, "--kind", "mk", "--json")
    assert listed.returncode == 0, listed.stderr
    (only,) = json.loads(listed.stdout)
    assert only["kind"] == "mk" and "hash" not in only and api_account.mk not in listed.stdout
    refused = s.cli("accounts", "revoke-key", api_account.account_id, only["id"])
    assert refused.returncode == 1 and "--replace" in refused.stderr
    rotated = s.cli("accounts", "revoke-key", api_account.account_id, only["id"], "--replace", "--json")
    assert rotated.returncode == 0, rotated.stderr
    out = json.loads(rotated.stdout)
    assert out["revoked"] == only["id"] and out["key"].startswith("mk_")
    assert _api(s, "GET", "/api/keys", api_account.mk).status_code == 401  # the leaked key is gone
    assert _api(s, "GET", "/api/keys", out["key"]).status_code == 200
    sk_revoked = s.cli("accounts", "revoke-key", api_account.account_id, api_account.key_id)
    assert sk_revoked.returncode == 0 and _chat(s, api_account.sk).status_code == 401
