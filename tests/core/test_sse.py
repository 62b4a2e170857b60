"""SSE framing of OpenAI streaming events (cheapest_core, sse.rs)."""

from __future__ import annotations

import json

import httpx2
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cheapest_core import SseError, SseFramer, json_escape

CHAT = SseFramer("chatcmpl-abc", "smollm2-135m", 1_700_000_000)
TEXT = SseFramer("cmpl-abc", "smollm2-135m", 1_700_000_000, object="text_completion")


def payload(event: bytes) -> dict:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    body = event[len(b"data: ") : -2]
    assert b"\n" not in body and b"\r" not in body  # one event, one data line
    return json.loads(body)


def reference_escape(text: str) -> str:
    return json.dumps(text, ensure_ascii=False).replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


@given(st.text())
def test_any_text_round_trips_through_both_kinds(text: str) -> None:
    chat = CHAT.delta(text)
    assert payload(chat)["choices"][0]["delta"]["content"] == text
    assert payload(TEXT.delta(text))["choices"][0]["text"] == text
    raw = chat.decode("utf-8")
    assert "\u2028" not in raw and "\u2029" not in raw
    assert not any(ord(c) < 0x20 for c in raw[:-2])


@given(st.text())
def test_json_escape_is_json_dumps_plus_line_separators(text: str) -> None:
    assert json_escape(text) == reference_escape(text)
    assert json.loads(json_escape(text)) == text


def test_escaping_edge_cases() -> None:
    assert json_escape('"\\') == r'"\"\\"'
    assert json_escape("\x00\x1f\x7f") == '"\\u0000\\u001f\x7f"'
    assert json_escape("\b\f\n\r\t") == r'"\b\f\n\r\t"'
    assert json_escape("\u2028\u2029") == r'"\u2028\u2029"'
    assert json_escape("😀𝄞") == '"😀𝄞"'  # astral characters stay raw UTF-8
    assert "😀".encode() in CHAT.delta("😀")


def test_chat_chunks_have_openai_fields_in_order() -> None:
    role = payload(CHAT.role())
    assert list(role) == ["id", "object", "created", "model", "choices"]
    assert (role["id"], role["object"], role["created"], role["model"]) == (
        "chatcmpl-abc",
        "chat.completion.chunk",
        1_700_000_000,
        "smollm2-135m",
    )
    assert role["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    delta = payload(CHAT.delta("Hi"))["choices"][0]
    assert list(delta) == ["index", "delta", "logprobs", "finish_reason"]
    assert delta == {"index": 0, "delta": {"content": "Hi"}, "logprobs": None, "finish_reason": None}
    for reason in ("stop", "length", "content_filter", "tool_calls"):
        assert payload(CHAT.finish(reason))["choices"] == [
            {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}
        ]
    usage = payload(CHAT.usage(12, 30))
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}
    assert SseFramer.done() == b"data: [DONE]\n\n"
    assert CHAT.object == "chat.completion.chunk"


def test_text_completion_chunks() -> None:
    chunk = payload(TEXT.delta("x"))
    assert chunk["object"] == "text_completion"
    assert chunk["choices"] == [{"text": "x", "index": 0, "logprobs": None, "finish_reason": None}]
    assert list(chunk["choices"][0]) == ["text", "index", "logprobs", "finish_reason"]
    assert payload(TEXT.finish("length"))["choices"][0] == {
        "text": "",
        "index": 0,
        "logprobs": None,
        "finish_reason": "length",
    }
    with pytest.raises(SseError):
        TEXT.role()


def test_prefix_fields_are_escaped() -> None:
    f = SseFramer('id"\n', "mo\\del\u2028", -1)
    p = payload(f.delta(""))
    assert (p["id"], p["model"], p["created"]) == ('id"\n', "mo\\del\u2028", -1)


def test_error_event() -> None:
    e = payload(CHAT.error('model "x" failed', "server_error"))
    assert e == {"error": {"message": 'model "x" failed', "type": "server_error", "param": None, "code": None}}
    assert payload(CHAT.error("m", "t", "c"))["error"]["code"] == "c"


def test_bad_arguments_are_sse_errors() -> None:
    with pytest.raises(SseError):
        CHAT.finish("eos")
    with pytest.raises(SseError) as err:
        SseFramer("a", "b", 1, object="chat.completion")
    assert isinstance(err.value, ValueError)


@given(st.lists(st.text(min_size=1), min_size=1, max_size=8))
def test_the_openai_sdk_parses_the_stream(pieces: list[str]) -> None:
    """The official SDK's SSE decoder and models read back text, finish reason and usage."""
    framer = SseFramer("chatcmpl-sdk", "m", 1)
    events = [framer.role(), *(framer.delta(p) for p in pieces), framer.finish("stop"), framer.usage(3, len(pieces))]
    body = b"".join([*events, SseFramer.done()])

    def handler(request: httpx2.Request) -> httpx2.Response:
        # Split the bytes mid-event to exercise the SDK's incremental parser.
        chunks = [body[i : i + 7] for i in range(0, len(body), 7)]
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=iter(chunks))

    with httpx2.Client(transport=httpx2.MockTransport(handler)) as http:
        client = openai.OpenAI(api_key="sk-test", base_url="http://127.0.0.1:9/v1", http_client=http)
        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
        chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(pieces)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 3 + len(pieces)
