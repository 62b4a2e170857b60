"""The official `openai` SDK against a real Granian server (fixed engine): results, streaming, SDK errors."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from cheapest.config import DEFAULT_PRICES

from fixed_engine import FixedEngine
from fixtures_server import ApiAccount, sdk

pytestmark = pytest.mark.usefixtures("sdk_clients")

MODEL = "SmolLM2-135M-Instruct"
ANSWER = "The capital of France is Paris."
QUESTION = "What is the capital of France?"


def _client(acct: ApiAccount, key: str | None = None) -> openai.OpenAI:
    return sdk(acct.server.v1, key or acct.sk)


def _prompt_tokens(messages: list[tuple[str, str]]) -> int:
    e = FixedEngine(MODEL, ANSWER)
    return len(e.encode(e.render_chat(messages)))


def test_chat_sync(api_account: ApiAccount) -> None:
    raw = _client(api_account).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}])
    r = raw.parse()
    assert r.choices[0].message.content == ANSWER
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "stop"
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    p = _prompt_tokens([("system", "Be brief."), ("user", QUESTION)])
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (p, 6, p + 6)
    h = raw.headers
    assert h["x-ratelimit-limit-requests"] == "20" and h["x-ratelimit-remaining-requests"] == "19"
    assert int(h["x-ratelimit-remaining-tokens"]) < int(h["x-ratelimit-limit-tokens"])
    assert h["x-ratelimit-reset-requests"].endswith("s")


def test_content_parts_and_options(api_account: ApiAccount) -> None:
    r = _client(api_account).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "What is"},
                                                            {"type": "text", "text": " it?"}]}],
        max_completion_tokens=3, temperature=0.0, top_p=0.5, seed=7, user="u1",
        extra_body={"unknown_field": {"ignored": True}})
    assert r.choices[0].message.content == "The capital of" and r.choices[0].finish_reason == "length"
    r = _client(api_account).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "q"}],
                                                     stop=["France", "zzz"])
    assert r.choices[0].message.content == "The capital of " and r.choices[0].finish_reason == "stop"


def test_chat_async(api_account: ApiAccount) -> None:
    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=api_account.server.v1, api_key=api_account.sk,
                                      max_retries=0) as client:
            rs = await asyncio.gather(*[
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}])
                for _ in range(5)])
            return [r.choices[0].message.content or "" for r in rs]

    assert asyncio.run(main()) == [ANSWER] * 5


def test_chat_stream_with_usage(api_account: ApiAccount) -> None:
    stream = _client(api_account).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == _prompt_tokens([("user", QUESTION)])
    assert len({c.id for c in chunks}) == 1


def test_stream_async_without_usage(api_account: ApiAccount) -> None:
    async def main() -> list[openai.types.chat.ChatCompletionChunk]:
        async with openai.AsyncOpenAI(base_url=api_account.server.v1, api_key=api_account.sk,
                                      max_retries=0) as client:
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": QUESTION}], stream=True)
            return [c async for c in stream]

    chunks = asyncio.run(main())
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ANSWER


def test_text_completions(api_account: ApiAccount) -> None:
    c = _client(api_account)
    r = c.completions.create(model=MODEL, prompt="Tell me", max_tokens=2)
    assert r.choices[0].text == "The capital" and r.choices[0].finish_reason == "length"
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (2, 2)
    parts = [ch.choices[0].text for ch in c.completions.create(model=MODEL, prompt="x", stream=True) if ch.choices]
    assert "".join(parts) == ANSWER


def test_models(api_account: ApiAccount) -> None:
    c = _client(api_account)
    assert [m.id for m in c.models.list()] == [MODEL]
    assert c.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("no-such-model")


def test_usage_endpoint_counts_requests(api_account: ApiAccount) -> None:
    c = _client(api_account)
    for _ in range(3):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}])
    expected_prompt = 3 * _prompt_tokens([("user", QUESTION)])
    for _ in range(50):  # the worker flushes every 0.2 s in the test server
        body = httpx.get(api_account.server.v1 + "/usage", headers={"Authorization": f"Bearer {api_account.sk}"}
                         ).json()
        if body["usage"] and body["usage"][0]["requests"] == 3:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert body["key_id"] == api_account.key_id and body["plan"] == "free"
    assert body["limits"] == {"rpm": 20, "tpm": 20000}
    # Each request is priced on its own at the default model's list price, rounded up to a micro-dollar.
    cost = 3 * DEFAULT_PRICES[MODEL].cost_micro(expected_prompt // 3, 6)
    assert cost > 0
    assert body["usage"] == [{"model": MODEL, "requests": 3, "prompt_tokens": expected_prompt,
                              "completion_tokens": 18, "cost_usd": cost / 1e6, "cost_micro": cost}]


def test_request_log_lines_are_metadata_only(api_account: ApiAccount) -> None:
    canary = "CANARY-7f3a-log"
    _client(api_account).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": canary}])
    deadline = time.monotonic() + 5  # the worker writes the line after the response has left
    while not (lines := [x for x in api_account.server.request_log() if x["key_id"] == api_account.key_id]):
        assert time.monotonic() < deadline, "no request line for this key"
        time.sleep(0.05)
    assert set(lines[-1]) == {"ts", "key_id", "model", "status", "prompt_tokens", "completion_tokens",
                              "latency_ms", "stream"}
    assert lines[-1]["status"] == 200 and lines[-1]["model"] == MODEL and lines[-1]["completion_tokens"] == 6
    assert canary not in api_account.server.output()


def test_asgi_interface_serves_the_same_api(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(interface="asgi")
    _, mk = server.create_account()
    sk = str(server.create_key(mk)["key"])
    c = sdk(server.v1, sk)
    assert c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}]
                                     ).choices[0].message.content == ANSWER
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ANSWER
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    with pytest.raises(openai.AuthenticationError):
        sdk(server.v1, "sk_bad").models.list()
