"""Framing one streamed chat chunk: SseFramer.delta vs msgspec.json.encode of the same chunk dict plus the
`data: ` / `\\n\\n` concatenation (the encoder built once, as a msgspec service would).

    make bench   (or: .venv/bin/python -m pytest bench/bench_sse.py --benchmark-enable)

Goal (issue 2): at least as fast as msgspec. Two texts: a typical token, and a 200-character piece with
quotes, newlines and non-ASCII text.
"""

from __future__ import annotations

import json

import msgspec
import pytest

from cheapest_core import SseFramer

ID, MODEL, CREATED = "chatcmpl-8f2c1e0b9a7d4c3e", "SmolLM2-135M-Instruct", 1_700_000_000
FRAMER = SseFramer(ID, MODEL, CREATED)
ENCODER = msgspec.json.Encoder()
TEXTS = {"token": " the", "piece": ('He said "bonjour" \u00e0 Paris,\nthen left. ' * 5)[:200]}


def msgspec_chunk(text: str) -> bytes:
    chunk = {
        "id": ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}],
    }
    return b"data: " + ENCODER.encode(chunk) + b"\n\n"


@pytest.mark.parametrize("name", list(TEXTS))
@pytest.mark.benchmark(group="sse: one chat chunk")
def test_core_sse_framer(benchmark, name: str) -> None:  # type: ignore[no-untyped-def]
    out = benchmark(FRAMER.delta, TEXTS[name])
    assert json.loads(out[6:]) == json.loads(msgspec_chunk(TEXTS[name])[6:])


@pytest.mark.parametrize("name", list(TEXTS))
@pytest.mark.benchmark(group="sse: one chat chunk")
def test_msgspec_dict_encode(benchmark, name: str) -> None:  # type: ignore[no-untyped-def]
    out = benchmark(msgspec_chunk, TEXTS[name])
    assert out == FRAMER.delta(TEXTS[name])
