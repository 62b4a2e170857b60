"""Canaries: unique strings sent through every route and path of a real two-worker server, then searched for in
every file of the data directory (LMDB included), everything the workers wrote to stdout/stderr, and the
temporary directories. Prompts and completions must be found nowhere. The same test runs on the many-hosts
backend too, and then also searches PostgreSQL's data directory (WAL included) and Redis's append-only files.

The fixed test backend answers with a completion canary (CHEAPEST_MODEL_OPTION_TEXT), so completions are proven
unstored too; the tiny real ONNX model covers the real tokenizer/engine path.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import httpx
import pytest

from fixtures_hosts import SHARED_PEPPER
from fixtures_server import ServerProcess, sdk
from metrics_text import assert_metadata_only, parse, value

pytestmark = pytest.mark.usefixtures("sdk_clients")

MODEL = "SmolLM2-135M-Instruct"
FAIL_SEED = 4242
REQUEST_LOG_FIELDS = {"ts", "key_id", "model", "status", "prompt_tokens", "completion_tokens", "latency_ms", "stream"}
GENERIC_500 = "The model failed while generating."


class Canaries:
    """Unique strings per path; `needles()` adds forms a leak could take (UTF-16, the bare random part)."""

    def __init__(self) -> None:
        self.made: dict[str, str] = {}

    def __call__(self, path: str) -> str:
        c = f"CANARY{secrets.token_hex(6)}{path.replace('-', '')}"
        self.made[path] = c
        return c

    def needles(self, extra: Iterable[str] = ()) -> list[bytes]:
        out: list[bytes] = []
        for c in [*self.made.values(), *extra]:
            out += [c.encode(), c.encode("utf-16-le")]
            out.append(c[6:18].encode())  # the random part alone: catches escaped or re-encoded copies
        return out


def scan(roots: Iterable[Path], needles: list[bytes], newer_than: float = 0.0,
         skip: Iterable[Path] = ()) -> list[tuple[str, bytes]]:
    hits: list[tuple[str, bytes]] = []
    skipped = {str(p) for p in skip}
    for root in roots:
        for dirpath, dirs, files in os.walk(root, onerror=lambda e: None):
            dirs[:] = [d for d in dirs if os.path.join(dirpath, d) not in skipped]
            for name in files:
                p = Path(dirpath) / name
                try:
                    st = p.lstat()
                    if not p.is_file() or p.is_symlink() or st.st_mtime < newer_than or st.st_size > 256 << 20:
                        continue
                    data = p.read_bytes()
                except OSError:
                    continue
                hits += [(str(p), n) for n in needles if n in data]
    return hits


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _chat(content: str, **kw: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}


def _no_text(r: httpx.Response, *canaries: str) -> None:
    for c in canaries:
        assert c not in r.text, r.text


@pytest.fixture(params=["lmdb", "postgres"])
def canary_server(request: pytest.FixtureRequest, server_factory: Callable[..., ServerProcess],
                  tmp_path: Path) -> Iterator[tuple[ServerProcess, Path, str, list[Path]]]:
    """Two workers, the fixed backend answering with a completion canary, slow enough to disconnect from; on
    LMDB, or on PostgreSQL and Redis (whose directories are then searched too)."""
    completion = f"COMPLETION{secrets.token_hex(6)} flows back"
    server_tmp = tmp_path / "server-tmp"
    server_tmp.mkdir()
    config = tmp_path / "cheapest.toml"
    config.write_text(f'[prices."{MODEL}"]\nprompt_usd_per_mtok = 1000.0\ncompletion_usd_per_mtok = 1000.0\n')
    env = {
        "CHEAPEST_MODEL_OPTION_TEXT": completion, "CHEAPEST_MODEL_OPTION_TOKENS": "300", "CHEAPEST_MODEL_OPTION_DELAY": "0.01",
        "CHEAPEST_MODEL_OPTION_FAIL_SEED": str(FAIL_SEED), "CHEAPEST_CONFIG": str(config), "TMPDIR": str(server_tmp),
    }
    backend_dirs: list[Path] = []
    if request.param == "postgres":
        pg, redis = request.getfixturevalue("postgres_server"), request.getfixturevalue("redis_server")
        redis.flush()
        env |= {"CHEAPEST_STORE_URL": pg.database(), "CHEAPEST_LIMITER_URL": redis.url,
                "CHEAPEST_KEY_PEPPER": SHARED_PEPPER}
        backend_dirs = [pg.root, redis.root]
    server = server_factory(workers=2, extra_env=env)
    yield server, server_tmp, completion, backend_dirs
    if backend_dirs:
        server.stop()
        pg.drop(env["CHEAPEST_STORE_URL"])


def _sse_text(r: httpx.Response) -> str:
    return "".join(
        (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
        for line in r.text.splitlines() if line.startswith("data: {") and '"choices"' in line)


def test_canaries_leave_no_trace(canary_server: tuple[ServerProcess, Path, str, list[Path]]) -> None:
    server, server_tmp, completion, backend_dirs = canary_server
    started = time.time() - 1
    cn = Canaries()
    base, v1 = server.base_url, server.v1
    account_id, mk = server.create_account(plan="pro")  # room for every request below: refusals count too
    sk = str(server.create_key(mk)["key"])
    word = completion.split()[0]

    # success: chat and text completions, JSON and SSE, via the SDK and raw HTTP
    c = sdk(v1, sk)
    r1 = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": cn("sdk-chat")}],
                                   max_tokens=4)
    assert word in (r1.choices[0].message.content or "")
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": cn("sdk-system")},
                                                                   {"role": "user", "content": cn("sdk-stream")}],
                                            max_tokens=4, stream=True, stream_options={"include_usage": True}))
    assert word in "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    r2 = c.completions.create(model=MODEL, prompt=cn("sdk-legacy"), max_tokens=4)
    assert word in r2.choices[0].text
    r = httpx.post(v1 + "/completions", json={"model": MODEL, "prompt": cn("raw-legacy-stream"), "max_tokens": 4,
                                              "stream": True, "stop": [cn("stop-string")]}, headers=_auth(sk))
    assert r.status_code == 200 and word in r.text
    r = httpx.post(v1 + "/chat/completions", json=_chat(cn("multi-part"), user=cn("user-field")) | {
        "messages": [{"role": "user", "content": [{"type": "text", "text": cn("content-part")}]}]}, headers=_auth(sk))
    assert r.status_code == 200, r.text

    # structured outputs, tools, tool calls and results, logprobs and n: schemas, arguments and results are
    # request content too
    schema = {"type": "object", "properties": {cn("schema-key"): {"type": "string", "description": cn("schema-desc")},
                                               "v": {"enum": [cn("schema-enum")]}}, "required": ["v"]}
    r = httpx.post(v1 + "/chat/completions", headers=_auth(sk), json=_chat(cn("structured"), response_format={
        "type": "json_schema", "json_schema": {"name": "canary", "schema": schema, "strict": True}}, n=2, logprobs=True))
    assert r.status_code == 200, r.text
    bad = {"type": "object", "properties": {cn("bad-schema-key"): {"type": "string"}}, "if": {"const": cn("bad-if")}}
    r = httpx.post(v1 + "/chat/completions", headers=_auth(sk), json=_chat(cn("bad-structured"), response_format={
        "type": "json_schema", "json_schema": {"name": "bad", "schema": bad}}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    _no_text(r, *cn.made.values())
    tools = [{"type": "function", "function": {"name": "lookup", "description": cn("tool-desc"), "parameters": {
        "type": "object", "properties": {cn("tool-param"): {"type": "string"}}}}}]
    history = [{"role": "user", "content": cn("tool-ask")},
               {"role": "assistant", "tool_calls": [{"id": cn("call-id"), "type": "function", "function": {
                   "name": "lookup", "arguments": json.dumps({"q": cn("tool-arguments")})}}]},
               {"role": "tool", "tool_call_id": cn("call-id-2"), "content": cn("tool-result")}]
    for stream in (False, True):
        r = httpx.post(v1 + "/chat/completions", headers=_auth(sk), json={
            "model": MODEL, "messages": history, "tools": tools, "tool_choice": "auto", "max_tokens": 4,
            "stream": stream})
        assert r.status_code == 200, r.text
    r = httpx.post(v1 + "/chat/completions", headers=_auth(sk), json={
        "model": MODEL, "messages": history, "tools": tools, "tool_choice": {"type": "function", "function": {
            "name": cn("unknown-function")}}})
    assert r.status_code == 400
    _no_text(r, *cn.made.values())
    # Anthropic's Messages API: create, stream, count_tokens, a refused block, tool_use and tool_result blocks
    turns = [{"role": "user", "content": cn("anthropic-ask")},
             {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "lookup",
                                                "input": {"q": cn("anthropic-tool-input")}}]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                           "content": cn("anthropic-tool-result")}]}]
    message = {"model": MODEL, "max_tokens": 4, "system": cn("anthropic-system"), "messages": turns,
               "tools": [{"name": "lookup", "description": cn("anthropic-tool-desc"),
                          "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}]}
    for body in (message, message | {"stream": True}):
        r = httpx.post(v1 + "/messages", headers={"x-api-key": sk}, json=body)
        assert r.status_code == 200, r.text
    r = httpx.post(v1 + "/messages/count_tokens", headers={"x-api-key": sk},
                   json={k: v for k, v in message.items() if k != "max_tokens"})
    assert r.status_code == 200 and r.json()["input_tokens"] > 0
    r = httpx.post(v1 + "/messages", headers={"x-api-key": sk}, json=message | {"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "data": cn("anthropic-image")}}]}]})
    assert r.status_code == 400 and r.json()["type"] == "error"
    _no_text(r, *cn.made.values())

    # client disconnect mid-stream (SSE) and before a slow non-streamed answer
    with httpx.stream("POST", v1 + "/chat/completions", headers=_auth(sk), timeout=10,
                      json={"model": MODEL, "messages": [{"role": "user", "content": cn("disconnect-stream")}],
                            "stream": True}) as s:
        got = []
        for line in s.iter_lines():
            got.append(line)
            if len(got) >= 6:
                break
    assert any(word in line for line in got)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(v1 + "/chat/completions", json=_chat(cn("disconnect-json"), max_tokens=300), headers=_auth(sk),
                   timeout=httpx.Timeout(10, read=0.3))

    # malformed JSON, wrong types, unknown model, oversize bodies (declared and chunked)
    for body in (b'{"model": "x", "messages": [{"role": "user", "content": "' + cn("malformed").encode(),
                 b'{"model": ' + cn("not-json").encode() + b"}", cn("bare-text").encode()):
        r = httpx.post(v1 + "/chat/completions", content=body, headers=_auth(sk) | {"content-type": "application/json"})
        assert r.status_code == 400
        _no_text(r, *cn.made.values())
    wrong = [
        {"model": MODEL, "messages": [{"role": cn("role"), "content": "x"}]},
        {"model": MODEL, "messages": [{"role": "user", "content": {"x": cn("content-dict")}}]},
        {"model": MODEL, "messages": cn("messages-string")},
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": cn("max-tokens")},
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": cn("temperature")},
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": {"a": cn("stop-dict")}},
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": cn("part-type"), "text": "x"}]}]},
        {"model": MODEL, "messages": [{"role": "user", "content": cn("extra-n")}], "n": 9},
        {"model": MODEL, "prompt": {"p": cn("prompt-dict")}},
    ]
    for body in wrong:
        r = httpx.post(v1 + ("/completions" if "prompt" in body else "/chat/completions"), json=body,
                       headers=_auth(sk))
        assert r.status_code == 400, (body, r.text)
        _no_text(r, *cn.made.values())
    r = httpx.post(v1 + "/chat/completions", json=_chat(cn("prompt-unknown-model")) | {"model": cn("model-name")},
                   headers=_auth(sk))
    assert r.status_code == 404
    _no_text(r, *cn.made.values())
    big = cn("oversize") + " "
    r = httpx.post(v1 + "/chat/completions", json=_chat(big * ((1 << 20) // len(big) + 10)), headers=_auth(sk))
    assert r.status_code == 413
    chunked = (cn("oversize-chunked").encode() + b" " for _ in range(60_000))  # no content-length
    r = httpx.post(v1 + "/chat/completions", content=chunked, headers=_auth(sk))
    assert r.status_code == 413

    # bad, wrong-kind and revoked keys; a canary posing as a key
    r = httpx.post(v1 + "/chat/completions", json=_chat(cn("bad-key")), headers=_auth("sk_" + cn("as-key")))
    assert r.status_code == 401
    r = httpx.post(v1 + "/chat/completions", json=_chat(cn("no-scheme")), headers={"Authorization": cn("header")})
    assert r.status_code == 401
    r = httpx.post(v1 + "/chat/completions", json=_chat(cn("wrong-kind")), headers=_auth(mk))
    assert r.status_code == 403
    revoked = server.create_key(mk)
    assert httpx.delete(f"{base}/api/keys/{revoked['id']}", headers=_auth(mk)).status_code == 200
    r = httpx.post(v1 + "/chat/completions", json=_chat(cn("revoked")), headers=_auth(str(revoked["key"])))
    assert r.status_code == 401

    # rate limits: requests per minute, and a prompt over the key's tokens per minute
    limited = str(server.create_key(mk, limits={"rpm": 1})["key"])
    statuses = [httpx.post(v1 + "/chat/completions", json=_chat(cn(f"rpm-{i}")), headers=_auth(limited)).status_code
                for i in range(3)]
    assert statuses[0] == 200 and 429 in statuses[1:]
    small = str(server.create_key(mk, limits={"tpm": 20})["key"])
    r = httpx.post(v1 + "/chat/completions", json=_chat(" ".join([cn("tpm")] * 40)), headers=_auth(small))
    assert r.status_code == 429
    _no_text(r, *cn.made.values())

    # budget spent (429) and an empty credit balance (402): refused before inference
    budgeted = str(server.create_key(mk, limits={"budget_usd": 0.000001, "budget_window": "1d"})["key"])
    assert httpx.post(v1 + "/chat/completions", json=_chat(cn("budget-first")),
                      headers=_auth(budgeted)).status_code == 200
    deadline = time.monotonic() + 10
    while True:  # usage reaches the store within a flush interval (0.2 s), on whichever worker
        r = httpx.post(v1 + "/chat/completions", json=_chat(cn("budget-refused")), headers=_auth(budgeted))
        if r.status_code == 429 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"
    _, payg_mk = server.create_account(plan="payg")
    payg = str(server.create_key(payg_mk)["key"])
    r = httpx.post(v1 + "/chat/completions", json=_chat(cn("no-credit")), headers=_auth(payg))
    assert r.status_code == 402

    # context overflow: the prompt alone, and prompt + max_tokens
    r = httpx.post(v1 + "/completions", json={"model": MODEL, "prompt": " ".join([cn("ctx")] * 8300)},
                   headers=_auth(sk))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(v1 + "/completions", json={"model": MODEL, "prompt": cn("ctx-max"), "max_tokens": 9000},
                   headers=_auth(sk))
    assert r.status_code == 400

    # an engine failure mid-generation: a generic 500, or a generic SSE error event
    r = httpx.post(v1 + "/chat/completions", json=_chat(cn("engine-fail"), seed=FAIL_SEED), headers=_auth(sk))
    assert r.status_code == 500 and r.json()["error"]["message"] == GENERIC_500
    _no_text(r, *cn.made.values(), completion)
    r = httpx.post(v1 + "/chat/completions", json=_chat(cn("engine-fail-stream"), seed=FAIL_SEED, stream=True),
                   headers=_auth(sk))
    assert r.status_code == 200 and GENERIC_500 in r.text and r.text.rstrip().endswith("data: [DONE]")

    # management routes and unknown routes with canaries in bodies, paths and query strings
    r = httpx.post(base + "/api/keys", content=b'{"name": "' + cn("mgmt-malformed").encode(), headers=_auth(mk))
    assert r.status_code == 400
    r = httpx.patch(f"{base}/api/keys/{cn('key-id')}", json={"name": 1}, headers=_auth(mk))
    assert r.status_code in (400, 404)
    r = httpx.get(f"{v1}/{cn('path')}?q={cn('query')}", headers=_auth(sk))
    assert r.status_code == 404
    r = httpx.get(f"{v1}/models/{cn('model-path')}", headers=_auth(sk))
    assert r.status_code == 404
    _no_text(r, *cn.made.values())
    r = httpx.get(base + "/api/account/export", headers=_auth(mk))  # the account sees metadata, never content
    assert r.status_code == 200 and r.json()["usage"]
    _no_text(r, *cn.made.values(), completion.split()[0])

    time.sleep(0.5)  # the last usage flush (0.2 s) and request-log lines
    samples = _metrics_hold_metadata_only(server, needles=cn.needles([completion.split()[0]]), ids=[account_id])
    for kind in ("rpm", "tpm", "budget", "credits"):  # the refusals above, counted by kind only
        assert value(samples, "cheapest_refusals_total", kind=kind) >= 1, kind
    assert value(samples, "cheapest_requests_total", route="/v1/chat/completions", status="499") >= 1
    assert server.stop() == 0
    lines = server.request_log()
    assert len(lines) >= 40
    for line in lines:  # request metadata only
        assert set(line) == REQUEST_LOG_FIELDS and line["model"] in (None, MODEL), line
    assert {line["status"] for line in lines} >= {200, 400, 401, 402, 403, 404, 413, 429, 499, 500}
    files = [p for p in server.data_dir.rglob("*") if p.is_file()]
    if backend_dirs:  # PostgreSQL's files (WAL included) and Redis's append-only files are searched, and hold
        # what was stored: the account id in the database, a key's rate-limit state in Redis
        assert scan(backend_dirs[:1], [account_id.encode()]) and scan(backend_dirs[1:], [b"cheapest:rl:rpm:"])
        assert any("pg_wal" in str(p) for p in backend_dirs[0].rglob("*"))
        assert any("appendonly" in p.name for p in backend_dirs[1].rglob("*"))
    else:
        assert any(p.name == "data.mdb" for p in files)  # LMDB is among what is searched
    roots = [server.data_dir, server.stdout_path, server.stderr_path, server_tmp]
    needles = cn.needles([completion.split()[0]])
    # The search can see a leak: one planted in a nested file, UTF-16 encoded, is found.
    planted = server_tmp / "nested" / "planted.bin"
    planted.parent.mkdir()
    planted.write_bytes(b"\0" + cn.made["engine-fail"].encode("utf-16-le"))
    assert [h[0] for h in scan(roots, needles)] == [str(planted)]
    planted.unlink()
    assert scan([*roots, *backend_dirs], needles) == []
    assert scan([Path(tempfile.gettempdir())], needles, newer_than=started, skip=backend_dirs) == []


@pytest.mark.slow
def test_canaries_through_the_real_model(server_factory: Callable[..., ServerProcess], tiny_model_dir: Path,
                                         tiny_encoder_dir: Path, tmp_path: Path) -> None:
    started = time.time() - 1
    server_tmp = tmp_path / "server-tmp"
    server_tmp.mkdir()
    server = server_factory(workers=2, backend="onnx", extra_env={
        "CHEAPEST_MODELS": f"{tiny_model_dir},{tiny_encoder_dir}", "CHEAPEST_MODEL_THREADS": "1",
        "TMPDIR": str(server_tmp)})
    _, mk = server.create_account()
    sk = str(server.create_key(mk)["key"])
    cn = Canaries()
    models = httpx.get(server.v1 + "/models", headers=_auth(sk)).json()["data"]
    model, ctx = next((m["id"], m["context_length"]) for m in models if m["id"] == tiny_model_dir.name)
    embedder = tiny_encoder_dir.name
    # Embedding inputs: served (float and base64), too long (refused by index), to the wrong route, malformed.
    for fmt in ("float", "base64"):
        r = httpx.post(server.v1 + "/embeddings", headers=_auth(sk), timeout=60,
                       json={"model": embedder, "input": [cn(f"embed-{fmt}"), cn("embed-second")],
                             "encoding_format": fmt, "user": cn("embed-user")})
        assert r.status_code == 200, r.text
    for body in ({"model": embedder, "input": ["ok", " ".join([cn("embed-long")] * 40)]},
                 {"model": model, "input": cn("embed-chat-model")},
                 {"model": embedder, "input": [cn("embed-mixed"), [1, 2]]},
                 {"model": cn("embed-model-name"), "input": cn("embed-unknown-model")}):
        r = httpx.post(server.v1 + "/embeddings", headers=_auth(sk), json=body, timeout=60)
        assert r.status_code in (400, 404), r.text
    r = httpx.post(server.v1 + "/chat/completions", headers=_auth(sk), timeout=60,
                   json={"model": embedder, "messages": [{"role": "user", "content": cn("chat-to-embedder")}]})
    assert r.status_code == 400
    completions: list[str] = []
    body = {"model": model, "messages": [{"role": "user", "content": cn("real-chat")}], "max_tokens": 16,
            "temperature": 0}
    r = httpx.post(server.v1 + "/chat/completions", json=body, headers=_auth(sk), timeout=60)
    assert r.status_code == 200, r.text
    completions.append(r.json()["choices"][0]["message"]["content"])
    body["messages"] = [{"role": "user", "content": cn("real-stream")}]
    r = httpx.post(server.v1 + "/chat/completions", json=body | {"stream": True}, headers=_auth(sk), timeout=60)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    completions.append(_sse_text(r))
    r = httpx.post(server.v1 + "/completions", json={"model": model, "prompt": cn("real-legacy"), "max_tokens": 16,
                                                     "temperature": 0.8, "seed": 3},
                   headers=_auth(sk), timeout=60)
    assert r.status_code == 200
    completions.append(r.json()["choices"][0]["text"])
    schema = {"type": "object", "properties": {"k": {"enum": [cn("real-schema-enum")]}}, "required": ["k"]}
    r = httpx.post(server.v1 + "/chat/completions", headers=_auth(sk), timeout=60, json=body | {
        "messages": [{"role": "user", "content": cn("real-structured")}], "max_tokens": 40,
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}})
    assert r.status_code == 200 and cn.made["real-schema-enum"] in r.json()["choices"][0]["message"]["content"]
    r = httpx.post(server.v1 + "/chat/completions", headers=_auth(sk), timeout=60, json=body | {
        "messages": [{"role": "user", "content": cn("real-logprobs")}], "logprobs": True, "top_logprobs": 3, "n": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    r = httpx.post(server.v1 + "/completions", json={"model": model, "prompt": " ".join([cn("real-ctx")] * ctx)},
                   headers=_auth(sk), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    with httpx.stream("POST", server.v1 + "/completions", headers=_auth(sk), timeout=60,
                      json={"model": model, "prompt": cn("real-disconnect"), "max_tokens": 200, "stream": True}) as s:
        next(s.iter_lines())
    time.sleep(0.5)
    samples = _metrics_hold_metadata_only(server, cn.needles() + [t.encode() for t in completions if len(t) >= 16])
    assert value(samples, "cheapest_time_to_first_token_seconds_count", model=model) >= 3  # the scheduler's
    assert value(samples, "cheapest_inter_token_latency_seconds_count", model=model) >= 1
    assert value(samples, "cheapest_batch_size_count", model=embedder) >= 1  # the embedding engine's runs
    assert server.stop() == 0
    for line in server.request_log():
        assert set(line) == REQUEST_LOG_FIELDS and line["model"] in (None, model, embedder)
    # A random tiny model's output is searched for when it is distinctive enough not to match by chance.
    distinctive = [t for t in completions if len(t.strip()) >= 16 and len(set(t)) >= 8]
    needles = cn.needles() + [t.encode() for t in distinctive]
    roots = [server.data_dir, server.stdout_path, server.stderr_path, server_tmp]
    assert scan(roots, needles) == []
    assert scan([Path(tempfile.gettempdir())], needles, newer_than=started) == []


def _metrics_hold_metadata_only(server: ServerProcess, needles: list[bytes],
                                ids: Iterable[str] = ()) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """/metrics after the canary traffic: no canary, no key or account id (any id of the store's format), no email,
    no secret; every model label a served model or a placeholder. Returns the samples."""
    r = httpx.get(server.base_url + "/metrics")  # both workers' series, whichever answers
    assert r.status_code == 200
    assert_metadata_only(r.text, [*needles, *ids])
    with pytest.raises(AssertionError):  # the check sees a leak: a planted canary, or an id of the store's format
        assert_metadata_only(r.text.replace("none", needles[0].decode(errors="replace")), needles)
    with pytest.raises(AssertionError):
        assert_metadata_only(r.text + 'x{key="key_0123456789abcdef"} 1\n', [])
    samples = parse(r.text)
    served = {str(m["id"]) for m in httpx.get(server.base_url + "/readyz").json()["models"]}
    assert {dict(labels).get("model") for _, labels in samples} <= served | {None, "unknown", "none"}
    return samples
