"""Auth, validation, limits and rate limiting: the right status, OpenAI's error shape, never request text."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from fixtures_server import ApiAccount, sdk

pytestmark = pytest.mark.usefixtures("sdk_clients")

MODEL = "SmolLM2-135M-Instruct"
CANARY = "CANARY-91b2-secret-text"
MSG = [{"role": "user", "content": "hi"}]


def _post(acct: ApiAccount, body: bytes | dict[str, object], key: str | None = None,
          path: str = "/v1/chat/completions") -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(acct.server.base_url + path, content=data, timeout=30,
                      headers={"Authorization": f"Bearer {key or acct.sk}", "content-type": "application/json"})


def _error(r: httpx.Response) -> dict[str, object]:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert CANARY not in r.text
    return dict(body["error"])


def test_auth_errors_sdk(api_account: ApiAccount) -> None:
    acct = api_account
    for bad in ("sk_notarealkey", acct.sk[:-1] + ("A" if acct.sk[-1] != "A" else "B"), "sk_" + "a" * 36):
        c = sdk(acct.server.v1, bad)
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
    r = httpx.get(acct.server.v1 + "/models")
    assert r.status_code == 401 and _error(r)["code"] == "invalid_api_key"
    # The management key is the wrong kind for /v1, and the inference key for /api.
    with pytest.raises(openai.PermissionDeniedError, match="sk_"):
        sdk(acct.server.v1, acct.mk).models.list()
    r = httpx.get(acct.server.base_url + "/api/keys", headers={"Authorization": f"Bearer {acct.sk}"})
    assert r.status_code == 403 and "mk_" in str(_error(r)["message"])


def test_disabled_expired_and_revoked_keys(api_account: ApiAccount) -> None:
    acct = api_account
    auth = {"Authorization": f"Bearer {acct.mk}"}
    base = acct.server.base_url
    c = sdk(acct.server.v1, acct.sk)
    assert httpx.patch(f"{base}/api/keys/{acct.key_id}", json={"disabled": True}, headers=auth).status_code == 200
    with pytest.raises(openai.PermissionDeniedError, match="disabled"):
        c.models.list()
    assert httpx.patch(f"{base}/api/keys/{acct.key_id}", json={"disabled": False}, headers=auth).status_code == 200
    c.models.list()
    expired = acct.server.create_key(acct.mk, expires_at=1)
    with pytest.raises(openai.PermissionDeniedError, match="expired"):
        sdk(acct.server.v1, str(expired["key"])).models.list()
    assert httpx.delete(f"{base}/api/keys/{acct.key_id}", headers=auth).json()["deleted"] is True
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_bad_bodies_name_the_field_never_the_value(api_account: ApiAccount) -> None:
    cases = [
        ({"model": MODEL, "messages": [{"role": CANARY, "content": "x"}]}, "messages[0].role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": {"x": CANARY}}]}, "messages[0].content"),
        ({"model": MODEL, "messages": MSG, "max_tokens": CANARY}, "max_tokens"),
        ({"model": MODEL, "messages": MSG, "temperature": 9}, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": CANARY, "text": "x"}]}]},
         "messages[0].content[0].type"),
        ({"model": MODEL}, None),
        ({"model": MODEL, "messages": MSG, "n": 2}, "n"),
    ]
    for body, param in cases:
        r = _post(api_account, body)
        assert r.status_code == 400, (body, r.text)
        err = _error(r)
        assert err["type"] == "invalid_request_error"
        if param is not None:
            assert err["param"] == param and param in str(err["message"])
        assert r.headers["x-ratelimit-limit-requests"]  # still on every /v1 response
    r = _post(api_account, b'{"model": "' + CANARY.encode() + b'", messages: [')
    assert r.status_code == 400 and _error(r)["code"] == "invalid_json"
    with pytest.raises(openai.BadRequestError):
        sdk(api_account.server.v1, api_account.sk).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], n=3)


def test_unknown_model_404_without_echo(api_account: ApiAccount) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        sdk(api_account.server.v1, api_account.sk).chat.completions.create(
            model=CANARY, messages=[{"role": "user", "content": "x"}])
    assert CANARY not in str(info.value) and info.value.code == "model_not_found"


def test_context_overflow_and_body_limit(api_account: ApiAccount) -> None:
    long = " ".join([CANARY] * 9000)  # 9000 tokens for the fixed engine: over its 8192 context
    r = _post(api_account, {"model": MODEL, "messages": [{"role": "user", "content": long}]})
    assert r.status_code == 400 and _error(r)["code"] == "context_length_exceeded"
    r = _post(api_account, {"model": MODEL, "messages": MSG, "max_tokens": 9000})
    assert r.status_code == 400 and _error(r)["param"] == "max_tokens"
    huge = {"model": MODEL, "messages": [{"role": "user", "content": CANARY * 70_000}]}  # > 1 MiB
    r = _post(api_account, huge)
    assert r.status_code == 413 and _error(r)["code"] == "request_too_large"
    # chunked upload without Content-Length is cut at the limit too
    def gen():  # type: ignore[no-untyped-def]
        yield json.dumps(huge).encode()
    r = httpx.post(api_account.server.v1 + "/chat/completions", content=gen(),
                   headers={"Authorization": f"Bearer {api_account.sk}"})
    assert r.status_code == 413


def test_rate_limit_429(api_account: ApiAccount) -> None:
    key = api_account.server.create_key(api_account.mk, limits={"rpm": 2})
    c = sdk(api_account.server.v1, str(key["key"]))
    for _ in range(2):
        c.chat.completions.create(model=MODEL, messages=MSG)
    with pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model=MODEL, messages=MSG)
    h = info.value.response.headers
    assert info.value.code == "rate_limit_exceeded"
    assert int(h["retry-after"]) >= 1 and h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-ratelimit-limit-requests"] == "2"
    # TPM: a prompt alone over the limit is refused outright; the estimate counts max_tokens
    key = api_account.server.create_key(api_account.mk, limits={"tpm": 50})
    c = sdk(api_account.server.v1, str(key["key"]))
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w " * 60}])
    r = c.chat.completions.with_raw_response.create(model=MODEL, messages=MSG, max_tokens=40)
    # charged prompt + 40 at admission, then corrected down to the 6 tokens really generated
    used = r.parse().usage.total_tokens  # type: ignore[union-attr]
    assert int(r.headers["x-ratelimit-remaining-tokens"]) <= 50 - used
    h2 = c.models.with_raw_response.list().headers
    assert int(h2["x-ratelimit-remaining-tokens"]) >= 50 - used - 1


def test_routes_and_openapi(api_account: ApiAccount) -> None:
    base = api_account.server.base_url
    assert httpx.get(base + "/healthz").json()["status"] == "ok"
    ready = httpx.get(base + "/readyz").json()
    assert {k: ready[k] for k in ("status", "model", "provider")} == {"status": "ready", "model": MODEL,
                                                                      "provider": "fixed"}
    assert [(m["id"], m["status"]) for m in ready["models"]] == [(MODEL, "ready")]
    r = httpx.get(base + "/nope")
    assert r.status_code == 404 and _error(r)
    r = httpx.delete(base + "/v1/chat/completions")
    assert r.status_code == 405 and _error(r)
    doc = httpx.get(base + "/openapi.json").json()
    assert doc["openapi"] == "3.1.0"
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model}", "/v1/usage",
            "/api/keys", "/api/keys/{key_id}"} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    assert "messages" in schemas["ChatCompletionRequest"]["required"]
    refs = [m for m in json.dumps(doc).split('"$ref": "')[1:]]
    for ref in refs:  # every reference resolves
        name = ref.split('"')[0].rsplit("/", 1)[1]
        assert name in schemas
    from openapi_spec_validator import validate  # a test dependency: the check always runs

    validate(doc)


def test_management_keys_crud_and_isolation(api_account: ApiAccount) -> None:
    base, auth = api_account.server.base_url, {"Authorization": f"Bearer {api_account.mk}"}
    created = api_account.server.create_key(api_account.mk, name="svc", limits={"rpm": 5, "tpm": 100},
                                            models=[MODEL])
    assert str(created["key"]).startswith("sk_") and created["hint"] == f"sk_…{str(created['key'])[-4:]}"
    listed = httpx.get(base + "/api/keys?limit=100", headers=auth).json()
    assert created["id"] in [k["id"] for k in listed["data"]]
    assert str(created["key"]) not in json.dumps(listed)  # the secret is shown once
    page = httpx.get(base + "/api/keys?limit=1", headers=auth).json()
    assert len(page["data"]) == 1 and page["has_more"] is True
    got = httpx.get(f"{base}/api/keys/{created['id']}", headers=auth).json()
    assert got["limits"] == {"rpm": 5, "tpm": 100} and got["models"] == [MODEL]
    r = httpx.patch(f"{base}/api/keys/{created['id']}", json={"name": "renamed", "limits": {"rpm": 9}}, headers=auth)
    assert r.json()["name"] == "renamed" and r.json()["limits"] == {"rpm": 9}
    # another account sees none of it: 404, not 403
    _, other_mk = api_account.server.create_account()
    other = {"Authorization": f"Bearer {other_mk}"}
    for method in ("GET", "PATCH", "DELETE"):
        r = httpx.request(method, f"{base}/api/keys/{created['id']}", headers=other,
                          json={"name": "x"} if method == "PATCH" else None)
        assert r.status_code == 404, method
    assert created["id"] not in [k["id"] for k in httpx.get(base + "/api/keys", headers=other).json()["data"]]
    r = httpx.post(base + "/api/keys", json={"name": ""}, headers=auth)
    assert r.status_code == 400 and _error(r)["param"] == "name"


def test_cli_accounts_create_json(api_account: ApiAccount) -> None:
    out = api_account.server.cli("accounts", "create", "--email", "cli@example.test", "--json")
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert set(body) == {"account_id", "management_key"} and body["management_key"].startswith("mk_")
    key = api_account.server.create_key(body["management_key"])
    r = sdk(api_account.server.v1, str(key["key"])).chat.completions.create(
        model=MODEL, messages=MSG)
    assert r.choices[0].message.content
    again = api_account.server.cli("accounts", "create", "--email", "CLI@example.test", "--json")
    assert again.returncode == 1 and "exists" in again.stderr
    listed = api_account.server.cli("accounts", "list", "--json")
    assert "cli@example.test" in listed.stdout and "mk_" not in listed.stdout
