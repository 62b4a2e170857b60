"""Structured outputs, tool calls and logprobs through the official `openai` SDK on the real SmolLM2.

The model is tiny and knows nothing of JSON Schemas or this tool format: whatever it would have written, the
grammar makes its output parse and validate, at temperature 0 and 0.8 over many seeds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pydantic
import pytest

from fixtures_server import ServerProcess, start_server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
CAT = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 40},
    "colour": {"enum": ["black", "white", "ginger", "grey"]},
    "toys": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
}, "required": ["name", "age", "colour", "toys"], "additionalProperties": False}
ASK_CAT = [{"role": "user", "content": "Describe a cat as JSON."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


class Cat(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=24)
    age: int
    indoor: bool


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[openai.OpenAI]:
    server: ServerProcess = start_server(tmp_path_factory.mktemp("structured"), backend="onnx",
                                         model_dir=smollm2_dir, extra_env={"CHEAPEST_MODEL_THREADS": "2"})
    _, mk = server.create_account(plan="pro")
    with openai.OpenAI(base_url=server.v1, api_key=str(server.create_key(mk)["key"]), max_retries=0,
                       timeout=300) as c:
        yield c
    server.stop()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_json_schema_outputs_validate_over_many_seeds(client: openai.OpenAI, temperature: float) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "cat", "schema": CAT, "strict": True}}
    seeds = [0] if temperature == 0 else [1, 2, 3, 4]
    outputs = []
    for seed in seeds:  # n=3 decodes three sequences in one batch, each with its own matcher
        r = client.chat.completions.create(model=MODEL, messages=ASK_CAT, response_format=fmt,  # type: ignore[arg-type]
                                           temperature=temperature, seed=seed, n=3, max_tokens=120)
        for choice in r.choices:
            assert choice.finish_reason == "stop", choice
            value = json.loads(choice.message.content or "")
            jsonschema.validate(value, CAT)
            outputs.append(choice.message.content)
    assert len(set(outputs)) == (1 if temperature == 0 else len(outputs))  # sampled, not one canned answer


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_json_object_outputs_parse(client: openai.OpenAI, temperature: float) -> None:
    for seed in [0] if temperature == 0 else [5, 6]:
        r = client.chat.completions.create(model=MODEL, messages=ASK_CAT, temperature=temperature, seed=seed,  # type: ignore[arg-type]
                                           n=3, max_tokens=200, response_format={"type": "json_object"})
        for choice in r.choices:
            if choice.finish_reason == "stop":
                assert isinstance(json.loads(choice.message.content or ""), dict)
            else:  # an object still open at max_tokens: cut, and said so
                assert choice.finish_reason == "length" and (choice.message.content or "").startswith("{")


def test_max_tokens_inside_an_object_finishes_with_length(client: openai.OpenAI) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "cat", "schema": CAT, "strict": True}}
    r = client.chat.completions.create(model=MODEL, messages=ASK_CAT, response_format=fmt, temperature=0,  # type: ignore[arg-type]
                                       max_tokens=5)
    assert r.choices[0].finish_reason == "length"
    assert (r.choices[0].message.content or "").startswith('{"name": "')


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    r = client.chat.completions.parse(model=MODEL, messages=ASK_CAT, response_format=Cat, temperature=0,  # type: ignore[arg-type]
                                      max_tokens=80)
    cat = r.choices[0].message.parsed
    assert isinstance(cat, Cat) and cat.name


def test_a_schema_the_engine_cannot_compile_is_a_400_naming_response_format(client: openai.OpenAI) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object", "if": {}}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK_CAT, response_format=fmt, max_tokens=5)  # type: ignore[arg-type]
    assert info.value.param == "response_format" and info.value.code == "invalid_schema"


def test_a_tool_call_round_trip(client: openai.OpenAI) -> None:
    messages: list[Any] = list(ASK_WEATHER)
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], temperature=0,  # type: ignore[arg-type, list-item]
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])  # type: ignore[index]
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "18 degrees celsius and sunny"})
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], temperature=0,  # type: ignore[arg-type, list-item]
                                           tool_choice="none", max_tokens=60)
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.content
    assert not final.choices[0].message.tool_calls
    # The result is in the prompt the model saw: a longer result makes a longer prompt.
    messages[-1] = {**messages[-1], "content": "18 degrees celsius and sunny, with a light breeze from the west"}
    longer = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], temperature=0,  # type: ignore[arg-type, list-item]
                                            tool_choice="none", max_tokens=1)
    assert final.usage is not None and longer.usage is not None
    assert longer.usage.prompt_tokens > final.usage.prompt_tokens


def test_streamed_tool_calls_assemble_like_the_whole_answer(client: openai.OpenAI) -> None:
    kwargs: Any = {"model": MODEL, "messages": ASK_WEATHER, "tools": [WEATHER], "tool_choice": "required",
                   "temperature": 0, "max_tokens": 90}
    whole = client.chat.completions.create(**kwargs)
    with client.chat.completions.stream(**kwargs) as stream:
        deltas = [e for e in stream if e.type == "tool_calls.function.arguments.delta"]
        streamed = stream.get_final_completion()
    assert len(deltas) > 1  # the arguments arrived in pieces
    got = [(c.function.name, c.function.arguments) for c in streamed.choices[0].message.tool_calls or []]
    want = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls or []]
    assert got == want and got
    assert streamed.choices[0].finish_reason == whole.choices[0].finish_reason
    for _, arguments in got[:-1] if whole.choices[0].finish_reason == "length" else got:
        jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])  # type: ignore[index]


def test_logprobs_top_entry_is_the_greedy_token(client: openai.OpenAI) -> None:
    kwargs: Any = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                   "temperature": 0, "max_tokens": 12, "logprobs": True, "top_logprobs": 5}
    r = client.chat.completions.create(**kwargs)
    assert r.choices[0].logprobs is not None
    content = r.choices[0].logprobs.content or []
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 5 and c.top_logprobs[0].token == c.token
        assert c.top_logprobs[0].logprob == c.logprob <= 0
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
        assert bytes(c.bytes or []).decode() == c.token
    streamed = [lp for chunk in client.chat.completions.create(**kwargs, stream=True)
                for choice in chunk.choices if choice.logprobs for lp in choice.logprobs.content or []]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
