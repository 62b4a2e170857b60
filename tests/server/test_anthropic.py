"""Anthropic's Messages API through the official `anthropic` SDK against real servers: create, stream,
count_tokens, errors and both ways of sending the key (fixed engine); tools and a tool_result round trip, streamed
tool_use blocks and stop sequences on the real SmolLM2."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from fixtures_server import ApiAccount, ServerProcess, start_server

MODEL = "SmolLM2-135M-Instruct"
HELLO: Any = [{"role": "user", "content": "Hello"}]
WEATHER: Any = {"name": "get_weather", "description": "Get the current weather in a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                                 "required": ["city"], "additionalProperties": False}}


def _client(base_url: str, key: str, **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0, timeout=120, **kw)


def test_create_stream_and_count_tokens(api_account: ApiAccount) -> None:
    server = api_account.server
    with _client(server.base_url, api_account.sk) as client:
        m = client.messages.create(model=MODEL, max_tokens=50, messages=HELLO, system="Be brief.")
        assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_") and m.model == MODEL
        assert [b.type for b in m.content] == ["text"] and m.content[0].text == "The capital of France is Paris."  # type: ignore[union-attr]
        assert m.stop_reason == "end_turn" and m.stop_sequence is None
        count = client.messages.count_tokens(model=MODEL, messages=HELLO, system="Be brief.")
        assert m.usage.input_tokens == count.input_tokens > 0 and m.usage.output_tokens == 6

        with client.messages.stream(model=MODEL, max_tokens=50, messages=HELLO) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text == "The capital of France is Paris." and final.stop_reason == "end_turn"
        assert final.usage.output_tokens == 6

        short = client.messages.create(model=MODEL, max_tokens=2, messages=HELLO)
        assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2
        stopped = client.messages.create(model=MODEL, max_tokens=50, messages=HELLO, stop_sequences=[" France"])
        assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == " France"
        assert stopped.content[0].text == "The capital of"  # type: ignore[union-attr]


def test_the_raw_events_are_anthropics(api_account: ApiAccount) -> None:
    r = httpx.post(api_account.server.v1 + "/messages", headers={"x-api-key": api_account.sk},
                   json={"model": MODEL, "max_tokens": 3, "messages": HELLO, "stream": True})
    names = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    assert names == ["message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    data = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert [d["type"] for d in data] == names
    assert data[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}


def test_keys_by_header_or_bearer_and_errors_in_anthropics_shape(api_account: ApiAccount) -> None:
    server = api_account.server
    with _client(server.base_url, "", default_headers={"Authorization": f"Bearer {api_account.sk}"}) as bearer:
        assert bearer.messages.create(model=MODEL, max_tokens=2, messages=HELLO).usage.output_tokens == 2
    with _client(server.base_url, "sk_" + "x" * 36) as client, pytest.raises(anthropic.AuthenticationError) as auth:
        client.messages.create(model=MODEL, max_tokens=2, messages=HELLO)
    assert auth.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                          "message": auth.value.body["error"]["message"]}}  # type: ignore[index]
    with _client(server.base_url, api_account.sk) as client:
        with pytest.raises(anthropic.NotFoundError) as missing:
            client.messages.create(model="claude-nope", max_tokens=2, messages=HELLO)
        assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
        with pytest.raises(anthropic.BadRequestError) as bad:
            client.messages.create(model=MODEL, max_tokens=0, messages=HELLO)
        assert "max_tokens" in bad.value.message
        for extra, param in (({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
                             ({"container": "c"}, "container"), ({"output_config": {"effort": "high"}},
                                                                  "output_config.effort")):
            with pytest.raises(anthropic.BadRequestError) as refused:
                client.messages.create(model=MODEL, max_tokens=2, messages=HELLO, **extra)
            assert f"`{param}` is not supported" in refused.value.message
        image: Any = [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x"}}]}]
        with pytest.raises(anthropic.BadRequestError) as block:
            client.messages.create(model=MODEL, max_tokens=2, messages=image)
        assert "messages[0].content[0].type" in block.value.message
        # Accepted: thinking disabled, a cache hint (nothing is cached), metadata.user_id, sampling via extra_body
        m = client.messages.create(model=MODEL, max_tokens=2, messages=HELLO, thinking={"type": "disabled"},
                                   metadata={"user_id": "u1"}, service_tier="standard_only",
                                   extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 5},
                                   system=[{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}])
        assert m.usage.cache_read_input_tokens == 0 and m.usage.cache_creation_input_tokens == 0
    r = httpx.post(server.v1 + "/messages", headers={"x-api-key": api_account.sk}, content=b"{not json")
    assert r.status_code == 400 and r.json()["type"] == "error"


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[anthropic.Anthropic]:
    server: ServerProcess = start_server(tmp_path_factory.mktemp("anthropic"), backend="onnx",
                                         model_dir=smollm2_dir, extra_env={"CHEAPEST_MODEL_THREADS": "2"})
    _, mk = server.create_account(plan="pro")
    with _client(server.base_url, str(server.create_key(mk)["key"])) as client:
        yield client
    server.stop()


@pytest.mark.slow
def test_tool_use_round_trip_on_the_real_model(smol: anthropic.Anthropic) -> None:
    ask: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    m = smol.messages.create(model=MODEL, max_tokens=60, messages=ask, tools=[WEATHER],
                             tool_choice={"type": "tool", "name": "get_weather"}, extra_body={"temperature": 0})
    assert m.stop_reason == "tool_use"
    (use,) = m.content
    assert use.type == "tool_use" and use.name == "get_weather" and use.id.startswith("toolu_")
    assert isinstance(use.input, dict) and isinstance(use.input["city"], str)
    with smol.messages.stream(model=MODEL, max_tokens=60, messages=ask, tools=[WEATHER],
                              tool_choice={"type": "tool", "name": "get_weather"},
                              extra_body={"temperature": 0}) as stream:
        streamed = stream.get_final_message()
    assert [(b.type, getattr(b, "input", None)) for b in streamed.content] == [("tool_use", use.input)]
    history: Any = ask + [{"role": "assistant", "content": [use.model_dump()]},
                          {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                        "content": "18 degrees and sunny"}]}]
    final = smol.messages.create(model=MODEL, max_tokens=40, messages=history, tools=[WEATHER],
                                 tool_choice={"type": "none"}, extra_body={"temperature": 0})
    assert final.stop_reason in ("end_turn", "max_tokens") and final.content[0].type == "text"
    counted = smol.messages.count_tokens(model=MODEL, messages=history, tools=[WEATHER])
    assert counted.input_tokens == final.usage.input_tokens
