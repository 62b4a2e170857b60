"""One JSON metadata line per request on stdout; nothing about the request's content, ever."""

from __future__ import annotations

import sys
import time

import msgspec


class RequestLog(msgspec.Struct, array_like=False):
    ts: float
    key_id: str | None
    model: str | None
    status: int
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    stream: bool


_encode = msgspec.json.Encoder().encode


def write_request_log(started: float, key_id: str | None, model: str | None, status: int, prompt_tokens: int = 0,
                      completion_tokens: int = 0, stream: bool = False) -> None:
    now = time.time()
    line = RequestLog(round(now, 3), key_id, model, status, prompt_tokens, completion_tokens,
                      round((time.perf_counter() - started) * 1000, 3), stream)
    out = sys.stdout.buffer
    out.write(_encode(line) + b"\n")
    out.flush()
