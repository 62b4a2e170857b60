"""Every field of the official `openai` SDK's chat and text completion request types, sent to a real server on the
real SmolLM2: each is honoured (its effect is checked) or refused with a 400 `unsupported_parameter` naming it.

The tables below must name exactly the SDK's fields: a field a new SDK adds fails this test until it is decided.
Requests are short (a few tokens) so the walk costs seconds.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types import completion_create_params as text_params
from openai.types.chat import completion_create_params as chat_params

from fixtures_server import ServerProcess, start_server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = "The capital of France is Paris."
PARIS = 38634  # "Paris" in SmolLM2's vocabulary
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}]
Check = Callable[[dict[str, Any]], None]


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[tuple[ServerProcess, str]]:
    server = start_server(tmp_path_factory.mktemp("fields"), backend="onnx", model_dir=smollm2_dir,
                          extra_env={"CHEAPEST_MODEL_THREADS": "2"})
    _, mk = server.create_account(plan="pro")
    yield server, str(server.create_key(mk)["key"])
    server.stop()


def _content(r: dict[str, Any], i: int = 0) -> str:
    return str(r["choices"][i]["message"]["content"] or "")


def _refused(param: str) -> Check:
    def check(r: dict[str, Any]) -> None:
        assert r["status"] == 400, r
        assert r["error"]["code"] == "unsupported_parameter" and r["error"]["param"] == param, r
        assert param.split(".")[0] in r["error"]["message"]
    return check


def _ok(check: Callable[[dict[str, Any]], object]) -> Check:
    def run(r: dict[str, Any]) -> None:
        assert r["status"] == 200, r
        check(r)
    return run


def _greedy(r: dict[str, Any]) -> None:
    assert _content(r) == GREEDY


def _json_object(r: dict[str, Any]) -> None:
    assert isinstance(json.loads(_content(r)), dict)


def _one_call(r: dict[str, Any]) -> None:
    calls = r["choices"][0]["message"]["tool_calls"]
    assert len(calls) == 1 and r["choices"][0]["finish_reason"] == "tool_calls", r
    assert calls[0]["function"]["name"] == "get_weather" and "city" in json.loads(calls[0]["function"]["arguments"])


def _logprobs(k: int) -> Check:
    def check(r: dict[str, Any]) -> None:
        content = r["choices"][0]["logprobs"]["content"]
        assert content and all(len(c["top_logprobs"]) == k for c in content)
    return _ok(check)


# field -> [(request fields, check)]: the SDK field set and what each does.
CHAT: dict[str, list[tuple[dict[str, Any], Check]]] = {
    "messages": [({}, _ok(_greedy))],
    "model": [({}, _ok(lambda r: r["model"] == MODEL))],
    "audio": [({"audio": {"voice": "alloy", "format": "mp3"}}, _refused("audio"))],
    "frequency_penalty": [({"frequency_penalty": 2.0, "max_tokens": 24}, _ok(lambda r: _content(r) != GREEDY))],
    "presence_penalty": [({"presence_penalty": 2.0, "max_tokens": 24}, _ok(lambda r: _content(r) != GREEDY))],
    "function_call": [({"function_call": "auto"}, _refused("function_call"))],
    "functions": [({"functions": [{"name": "f"}]}, _refused("functions"))],
    "logit_bias": [({"logit_bias": {str(PARIS): 100}, "max_tokens": 2}, _ok(lambda r: _content(r) == "ParisParis"))],
    "logprobs": [({"logprobs": True}, _logprobs(0))],
    "top_logprobs": [({"logprobs": True, "top_logprobs": 3, "max_tokens": 3}, _logprobs(3))],
    "max_completion_tokens": [({"max_completion_tokens": 2}, _ok(
        lambda r: r["usage"]["completion_tokens"] == 2 and r["choices"][0]["finish_reason"] == "length"))],
    "max_tokens": [({"max_tokens": 3}, _ok(lambda r: r["usage"]["completion_tokens"] == 3))],
    "metadata": [({"metadata": {"a": "b"}}, _refused("metadata"))],
    "modalities": [({"modalities": ["text"]}, _ok(_greedy)), ({"modalities": ["text", "audio"]}, _refused("modalities"))],
    "moderation": [({"moderation": {"model": "omni-moderation-latest"}}, _refused("moderation"))],
    "n": [({"n": 3, "temperature": 1.0, "max_tokens": 4}, _ok(lambda r: [c["index"] for c in r["choices"]] == [0, 1, 2]
                                                              and r["usage"]["completion_tokens"] == 12))],
    "parallel_tool_calls": [({"tools": WEATHER, "tool_choice": "required", "parallel_tool_calls": False,
                              "max_tokens": 40}, _ok(_one_call))],
    "prediction": [({"prediction": {"type": "content", "content": "Paris"}}, _refused("prediction"))],
    "prompt_cache_key": [({"prompt_cache_key": "k1"}, _ok(_greedy))],
    "prompt_cache_options": [({"prompt_cache_options": {"mode": "explicit"}}, _refused("prompt_cache_options"))],
    "prompt_cache_retention": [({"prompt_cache_retention": "in_memory"}, _ok(_greedy)),
                               ({"prompt_cache_retention": "24h"}, _refused("prompt_cache_retention"))],
    "reasoning_effort": [({"reasoning_effort": "none"}, _ok(_greedy)),
                         ({"reasoning_effort": "high"}, _refused("reasoning_effort"))],
    "response_format": [({"response_format": {"type": "json_object"}, "max_tokens": 60}, _ok(_json_object))],
    "safety_identifier": [({"safety_identifier": "user-1"}, _ok(_greedy))],
    "seed": [({"seed": 7, "temperature": 1.0, "max_tokens": 12, "n": 2}, _ok(
        lambda r: r["choices"][0]["message"] != r["choices"][1]["message"]))],
    "service_tier": [({"service_tier": "auto"}, _ok(lambda r: r["service_tier"] == "default")),
                     ({"service_tier": "flex"}, _refused("service_tier"))],
    "stop": [({"stop": [" Paris"]}, _ok(lambda r: _content(r) == "The capital of France is"))],
    "store": [({"store": False}, _ok(_greedy)), ({"store": True}, _refused("store"))],
    "stream_options": [({"stream": True, "stream_options": {"include_usage": True}},
                        _ok(lambda r: r["chunks"][-1]["usage"]["completion_tokens"] >= 7)),
                       ({"stream": True, "stream_options": {"include_obfuscation": True}},
                        _refused("stream_options.include_obfuscation"))],
    "stream": [({"stream": True}, _ok(lambda r: "".join(c["choices"][0]["delta"].get("content") or ""
                                                        for c in r["chunks"] if c["choices"]) == GREEDY))],
    "temperature": [({"temperature": 0.0}, _ok(_greedy))],
    "tool_choice": [({"tools": WEATHER, "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                      "max_tokens": 40}, _ok(_one_call))],
    "tools": [({"tools": WEATHER, "tool_choice": "none", "max_tokens": 8},
               _ok(lambda r: r["choices"][0]["message"].get("tool_calls") is None and _content(r)))],
    "top_p": [({"temperature": 1.0, "top_p": 1e-9}, _ok(_greedy))],
    "user": [({"user": "user-1"}, _ok(_greedy))],
    "verbosity": [({"verbosity": "low"}, _refused("verbosity"))],
    "web_search_options": [({"web_search_options": {}}, _refused("web_search_options"))],
}

PROMPT = "The capital of France is"


def _text(r: dict[str, Any], i: int = 0) -> str:
    return str(r["choices"][i]["text"])


TEXT: dict[str, list[tuple[dict[str, Any], Check]]] = {
    "model": [({}, _ok(lambda r: r["model"] == MODEL))],
    "prompt": [({"prompt": [PROMPT, "One, two,"]}, _ok(lambda r: len(r["choices"]) == 2 and _text(r) != _text(r, 1))),
               ({"prompt": [504, 3575]}, _ok(lambda r: r["usage"]["prompt_tokens"] == 2))],
    "best_of": [({"best_of": 3, "n": 1, "temperature": 1.0, "seed": 1}, _ok(lambda r: len(r["choices"]) == 1))],
    "echo": [({"echo": True}, _ok(lambda r: _text(r).startswith(PROMPT) and len(_text(r)) > len(PROMPT)))],
    "frequency_penalty": [({"frequency_penalty": 2.0, "max_tokens": 24}, _ok(lambda r: r["choices"][0]["text"]))],
    "presence_penalty": [({"presence_penalty": 2.0, "max_tokens": 24}, _ok(lambda r: r["choices"][0]["text"]))],
    "logit_bias": [({"logit_bias": {str(PARIS): 100}, "max_tokens": 2}, _ok(lambda r: _text(r) == "ParisParis"))],
    "logprobs": [({"logprobs": 2}, _ok(lambda r: all(len(t) == 2 for t in r["choices"][0]["logprobs"]["top_logprobs"])))],
    "max_tokens": [({"max_tokens": 2}, _ok(lambda r: r["usage"]["completion_tokens"] == 2))],
    "n": [({"n": 2, "temperature": 1.0}, _ok(lambda r: len(r["choices"]) == 2))],
    "seed": [({"seed": 5, "temperature": 1.0, "n": 2}, _ok(lambda r: _text(r) != _text(r, 1)))],
    "stop": [({"stop": "."}, _ok(lambda r: "." not in _text(r)))],
    "stream_options": [({"stream": True, "stream_options": {"include_usage": True}},
                        _ok(lambda r: r["chunks"][-1]["usage"]["completion_tokens"] > 0))],
    "suffix": [({"suffix": " is the capital."}, _refused("suffix"))],
    "stream": [({"stream": True}, _ok(lambda r: r["chunks"][-1]["choices"][0]["finish_reason"] == "length"))],
    "temperature": [({"temperature": 0.0}, _ok(lambda r: _text(r).startswith(" Paris")))],
    "top_p": [({"temperature": 1.0, "top_p": 1e-9}, _ok(lambda r: _text(r).startswith(" Paris")))],
    "user": [({"user": "u"}, _ok(lambda r: r["choices"]))],
}


def _sdk_fields(params: Any) -> set[str]:
    names: set[str] = set()
    for cls in (params.CompletionCreateParamsBase, params.CompletionCreateParamsStreaming):
        names |= set(typing.get_type_hints(cls))
    return names


def _post(server: ServerProcess, sk: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(server.v1 + path, json=body, headers={"Authorization": f"Bearer {sk}"}, timeout=120)
    if r.status_code != 200:
        return {"status": r.status_code, **r.json()}
    if body.get("stream"):
        chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        return {"status": 200, "chunks": chunks}
    return {"status": 200, **r.json()}


def test_tables_name_every_sdk_field() -> None:
    assert set(CHAT) == _sdk_fields(chat_params)
    assert set(TEXT) == _sdk_fields(text_params)


@pytest.mark.parametrize("path, table, base", [
    ("/chat/completions", CHAT, {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 16}),
    ("/completions", TEXT, {"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 6}),
])
def test_every_field_is_honoured_or_refused_by_name(smol: tuple[ServerProcess, str], path: str,
                                                    table: dict[str, list[tuple[dict[str, Any], Check]]],
                                                    base: dict[str, Any]) -> None:
    server, sk = smol
    failures = []
    for field, cases in table.items():
        for extra, check in cases:
            got = _post(server, sk, path, base | extra)
            try:
                check(got)
            except (AssertionError, KeyError, TypeError, ValueError) as exc:
                failures.append((field, extra, repr(exc), str(got)[:400]))
    assert not failures, "\n".join(map(str, failures))


def test_the_sdk_sends_every_chat_field(smol: tuple[ServerProcess, str]) -> None:
    """Through the SDK's own request building: a refused field comes back as its BadRequestError."""
    server, sk = smol
    client = openai.OpenAI(base_url=server.v1, api_key=sk, max_retries=0, timeout=120)
    with client:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2,  # type: ignore[arg-type]
                                           prediction={"type": "content", "content": "Paris"})
        assert info.value.code == "unsupported_parameter" and info.value.param == "prediction"
        r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,  # type: ignore[arg-type]
                                           max_completion_tokens=16, service_tier="default", store=False)
        assert r.choices[0].message.content == GREEDY and r.service_tier == "default"
