"""An instant fixed-output engine plugin: the gateway benchmark's model and the API tests' default.

Servers load it with `model_backend = "fixed_engine:load"` (this folder on PYTHONPATH); its options come from
`[engine.model_options]` / `CHEAPEST_MODEL_OPTION_<NAME>`: `text` (the completion), `tokens` (completion length in
words, cycling the text; 0 = the text once), `delay` (seconds per word, to observe streaming and disconnects),
`fail_seed` (a request with this seed fails after its first token with an EngineError), `crash_seed` (... with a
ValueError, a bug in the engine) and `panic_seed` (... with `PanicException`, a BaseException as pyo3 raises for a
Rust panic), the last two carrying the request's messages in their message, as a careless library might;
`slow_model` and `load_delay` (the model of that name takes this many seconds to load, to observe a model still
loading beside a ready one).

It also adds one route to each worker that loads it, `GET /_test/process`: the worker's pid and its core-dump
settings as the kernel reports them to the process itself (prctl(PR_GET_DUMPABLE) is not visible from outside to
a root test runner), so tests can tell which worker answered. A server with any other backend has no such route.

It speaks the same `Engine` contract as the ONNX engine: a ChatML prompt, one token per whitespace-separated
word, the configured text as completion (n times, for n sequences), `max_tokens` -> "length", stop strings
honoured. Grammars are checked by llguidance (so a schema it cannot compile is refused as with the real engine)
but not enforced: the text stays fixed.
"""

from __future__ import annotations

import asyncio
import os
import resource
import json
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import llguidance
import msgspec

from cheapest.config import DEFAULT_MODEL, EngineSettings
from cheapest.engine.types import ContextLengthError, Delta, EngineError, Finish, Grammar, GrammarError, SamplingParams
from cheapest.privacy.hardening import PR_GET_DUMPABLE, _libc
from cheapest.server.request import Request, Response, json_response
from cheapest.server.routes import Route


class FixedOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    text: str = "The capital of France is Paris."
    tokens: int = 0
    delay: float = 0.0
    fail_seed: int | None = None
    crash_seed: int | None = None
    panic_seed: int | None = None
    slow_model: str = ""
    load_delay: float = 0.0


class PanicException(BaseException):
    """Like pyo3's: a Rust panic reaches Python as a BaseException, not an Exception."""


def load(settings: EngineSettings, add_route: Callable[[Route], None]) -> FixedEngine:
    """The engine factory `model_backend` names: the model id is the model directory's name."""
    opts = msgspec.convert(settings.model_options, FixedOptions, strict=False)
    add_route(Route("GET", "/_test/process", process_info, "This worker's pid and core-dump settings"))
    name = Path(settings.model_dir).name or DEFAULT_MODEL
    if name == opts.slow_model:
        time.sleep(opts.load_delay)
    return FixedEngine(name, opts.text, tokens=opts.tokens, delay=opts.delay, fail_seed=opts.fail_seed,
                       crash_seed=opts.crash_seed, panic_seed=opts.panic_seed)


async def process_info(state: Any, req: Request) -> Response:
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    body = {"pid": os.getpid(), "rlimit_core": [soft, hard], "dumpable": _libc().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)}
    return json_response(msgspec.json.encode(body))


class FixedEngine:
    provider = "fixed"
    vocab_size = 1 << 16
    has_chat_template = True

    def __init__(self, model_id: str, text: str, *, context_length: int = 8192, tokens: int = 0,
                 delay: float = 0.0, fail_seed: int | None = None, crash_seed: int | None = None,
                 panic_seed: int | None = None) -> None:
        self.model_id = model_id
        self.context_length = context_length
        words = text.split(" ")
        self._pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        self._tokens = tokens or len(self._pieces)
        self._delay = delay
        # A request with this seed fails after its first token, to prove an engine failure answers generically
        # and leaves no request text behind.
        self._fail_seed = fail_seed
        self._crash_seed = crash_seed
        self._panic_seed = panic_seed
        self._prompt = ""  # the last rendered prompt, quoted by the injected crashes
        self.instant = delay == 0  # answers without ever suspending: the HTTP layer need not watch for disconnects

    def render_chat(self, messages: Sequence[tuple[str, str] | Mapping[str, Any]],
                    tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        turns = [m if isinstance(m, tuple) else (str(m["role"]), str(m.get("content") or "")) for m in messages]
        body = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
        if tools:
            body = f"<|im_start|>system\n{json.dumps(list(tools))}<|im_end|>\n" + body
        self._prompt = body
        return body + "<|im_start|>assistant\n"

    async def grammar_ready(self) -> None:
        return None

    def compile_grammar(self, grammar: str) -> Grammar:
        if llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(grammar)):
            raise GrammarError("the grammar engine cannot compile this constraint")
        return Grammar()

    def encode(self, text: str, *, special_tokens: bool = False) -> list[int]:
        return [len(w) for w in text.split()]

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[Delta | Finish, None]:
        if len(prompt_ids) >= self.context_length:
            raise ContextLengthError(len(prompt_ids), self.context_length)
        for index in range(params.n):
            async for item in self._one(prompt_ids, params):
                yield msgspec.structs.replace(item, index=index) if index else item

    async def _one(self, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[Delta | Finish, None]:
        budget = min(params.max_tokens, self.context_length - len(prompt_ids))
        injected = params.seed is not None and params.seed in (self._fail_seed, self._crash_seed, self._panic_seed)
        if not params.stop and not self._delay and not injected:
            # The common case (no stop strings, no delay, no injected failure): the same items as the loop
            # below, without its per-token bookkeeping.
            pieces, count = self._pieces, min(self._tokens, budget)
            if count <= len(pieces):
                for n in range(count):
                    yield Delta(pieces[n], n + 1)
            else:
                k = len(pieces)
                for n in range(count):
                    yield Delta(pieces[n % k], n + 1)
            yield Finish("stop", count) if count == self._tokens else Finish("length", count)
            return
        text = ""
        for n in range(1, self._tokens + 1):
            if n > budget:
                yield Finish("length", n - 1)
                return
            if self._delay:
                await asyncio.sleep(self._delay)
            piece = self._pieces[(n - 1) % len(self._pieces)]
            if params.stop:
                found = [(i, s) for s in params.stop if (i := (text + piece).find(s)) >= 0]
                if found:
                    cut, stop = min(found)
                    yield Delta((text + piece)[len(text):cut], n)
                    yield Finish("stop", n, stop=stop)
                    return
            text += piece
            yield Delta(piece, n)
            if self._fail_seed is not None and params.seed == self._fail_seed:
                raise EngineError("injected failure")
            if self._crash_seed is not None and params.seed == self._crash_seed:
                raise ValueError(f"injected bug near {self._prompt!r}")
            if self._panic_seed is not None and params.seed == self._panic_seed:
                raise PanicException(f"injected panic near {self._prompt!r}")
        yield Finish("stop", self._tokens)

    async def close(self) -> None:
        return None
