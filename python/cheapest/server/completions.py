"""/v1 routes: chat and text completions (one JSON body, or SSE chunks), models (generating and embedding ones),
the calling key's usage. Each handler parses the request, calls the gateway, and encodes the answer.

A plain stream (one choice, no logprobs, no tools) is framed by the core; streams with several choices,
logprobs or tool-call deltas are encoded here, in OpenAI's chunk shapes.

A generation's request is charged against the caller's request rate before its body is read (the cheapest
refusal first, and a refused request still counts). Once a stream has started, any failure ends it with an SSE
error event and `[DONE]` at once: the client is never left waiting on an open response."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Iterable
from typing import TYPE_CHECKING

import cheapest_core
import msgspec

from cheapest.api.chat import (
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChoiceLogprobs,
    ChunkChoice, ChunkDelta, ContentLogprob, FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta, TopLogprob,
)
from cheapest.api.common import Usage
from cheapest.api.completions import (
    Completion, CompletionChoice, CompletionChunk, CompletionChunkChoice, CompletionLogprobs, CompletionRequest,
)
from cheapest.api.models import Model, ModelList
from cheapest.engine.types import Delta, Embedder, Engine, Finish, TokenLogprob
from cheapest.gateway import Admission, Caller, Gateway
from cheapest.gateway.completions import (
    Choice, Plan, collect, may_use, needs_grammar, plan as plan_of, run, served_model, serving_engine,
)
from cheapest.gateway.errors import Refusal
from cheapest.gateway.tools import ToolCallParser
from cheapest.gateway.usage import key_usage as usage_of
from cheapest.server.cancellation import until_disconnected
from cheapest.server.errors import decode_error, internal_error, rate_headers
from cheapest.server.request import Request, Response, StreamResponse, json_response

if TYPE_CHECKING:
    from cheapest.server.state import WorkerState

log = logging.getLogger("cheapest.server")
_encode = msgspec.json.Encoder().encode
_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)
SSE_HEADERS = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]


async def _complete(state: WorkerState, req: Request, chat: bool) -> Response | StreamResponse:
    caller = req.caller
    assert caller is not None
    gateway = state.gateway
    begun = await gateway.begin(caller)  # before the body is read, parsed, rendered or tokenized
    body = await req.body(state.settings.serving.max_body_bytes)
    try:
        creq = (_chat_decoder if chat else _completion_decoder).decode(body)
    except msgspec.DecodeError as exc:
        raise decode_error(exc) from None
    req.stream = bool(creq.stream)
    engine = serving_engine(state.models, caller, creq.model)
    req.model = engine.model_id
    serving = state.settings.serving
    if needs_grammar(creq):
        await engine.grammar_ready()
    plan = plan_of(engine, creq, serving.default_max_tokens, serving.max_choices)
    p = plan.prompt_tokens
    admission = await gateway.admit(caller, engine.model_id, p, plan.params.max_tokens * plan.sequences,
                                    begun=begun)
    rid = state.ids.new("chatcmpl-" if chat else "cmpl-")
    created = int(time.time())
    headers = rate_headers(admission.rate)
    if creq.stream:
        include_usage = creq.stream_options is not None and creq.stream_options.include_usage
        framer = cheapest_core.SseFramer(rid, engine.model_id, created,
                                         "chat.completion.chunk" if chat else "text_completion")
        plain = plan.sequences == 1 and plan.logprobs is None and not plan.tools and plan.echo is None
        chunks = _Chunks(rid, created, engine.model_id, framer, plan, chat)
        return StreamResponse(200, SSE_HEADERS + headers,
                              _stream(req, gateway, engine, admission, plan, chunks, plain, include_usage),
                              finish=lambda: gateway.settle(admission))
    work = collect(gateway.admissions, engine, plan, admission)
    try:  # an engine that never waits needs no watching; a slow one stops when the client goes away
        answers = await (work if engine.instant else until_disconnected(work, req.watch_disconnect))
    finally:  # for the log line, however it ended
        req.prompt_tokens, req.completion_tokens = p, admission.completion_tokens
    usage = Usage(p, admission.completion_tokens, p + admission.completion_tokens)
    if chat:
        out: ChatCompletion | Completion = ChatCompletion(
            rid, created, engine.model_id, [_chat_choice(a, plan) for a in answers], usage)
    else:
        out = Completion(rid, created, engine.model_id, [_text_choice(a, plan) for a in answers], usage)
    return json_response(_encode(out), headers)


def _content_logprobs(entries: Iterable[TokenLogprob]) -> list[ContentLogprob]:
    return [ContentLogprob(e.token, e.logprob, list(e.utf8), [TopLogprob(t, lp, list(b)) for t, b, lp in e.top])
            for e in entries]


def _chat_choice(answer: Choice, plan: Plan) -> ChatChoice:
    logprobs = None if plan.logprobs is None else ChoiceLogprobs(_content_logprobs(answer.logprobs))
    parser = answer.parser
    if parser is not None and parser.calls:
        calls = [ToolCall(c.id, FunctionCall(c.name, c.arguments)) for c in parser.calls]
        reason = "tool_calls" if answer.reason == "stop" else answer.reason
        return ChatChoice(answer.index, AssistantMessage("assistant", None, calls), reason, logprobs)
    return ChatChoice(answer.index, AssistantMessage("assistant", answer.text), answer.reason, logprobs)


def _text_logprobs(entries: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return CompletionLogprobs([e.token for e in entries], [e.logprob for e in entries],
                              [{t: lp for t, _, lp in e.top} for e in entries], offsets)


def _text_choice(answer: Choice, plan: Plan) -> CompletionChoice:
    prefix = plan.echo[answer.index // plan.choices] if plan.echo is not None else ""
    logprobs = None if plan.logprobs is None else _text_logprobs(answer.logprobs, len(prefix))
    return CompletionChoice(prefix + answer.text, answer.index, answer.reason, logprobs)


class _Chunks:
    """The SSE events of a stream with several choices, logprobs or tool calls (OpenAI's chunk shapes)."""

    def __init__(self, rid: str, created: int, model: str, framer: cheapest_core.SseFramer, plan: Plan,
                 chat: bool) -> None:
        self.rid, self.created, self.model, self.framer, self.plan, self.chat = rid, created, model, framer, plan, chat
        self.parsers = [ToolCallParser() for _ in range(plan.sequences)] if plan.tools else None
        self.offsets = [0] * plan.sequences  # completions: text offsets for logprobs

    def _event(self, chunk: ChatCompletionChunk | CompletionChunk) -> bytes:
        return b"data: " + _encode(chunk) + b"\n\n"

    def _chat(self, choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
        return self._event(ChatCompletionChunk(self.rid, self.created, self.model, choices, usage=usage))

    def start(self) -> Iterable[bytes]:
        if self.chat:
            yield self._chat([ChunkChoice(i, ChunkDelta(role="assistant", content=""))
                              for i in range(self.plan.sequences)])
        elif self.plan.echo is not None:
            yield self._event(CompletionChunk(self.rid, self.created, self.model, [
                CompletionChunkChoice(self.plan.echo[i // self.plan.choices], i) for i in range(self.plan.sequences)]))

    def delta(self, index: int, item: Delta) -> Iterable[bytes]:
        plan = self.plan
        if not self.chat:
            logprobs = None
            if plan.logprobs is not None:
                logprobs = _text_logprobs(list(item.logprobs), self.offsets[index])
                self.offsets[index] += sum(len(e.token) for e in item.logprobs)
            if item.text or logprobs is not None:
                yield self._event(CompletionChunk(self.rid, self.created, self.model,
                                                  [CompletionChunkChoice(item.text, index, None, logprobs)]))
            return
        content = None if plan.logprobs is None else ChoiceLogprobs(_content_logprobs(item.logprobs))
        yield from self._chat_delta(index, item.text, content, final=False)

    def _chat_delta(self, index: int, text: str, logprobs: ChoiceLogprobs | None, final: bool) -> Iterable[bytes]:
        if self.parsers is None:
            if text or logprobs is not None:
                yield self._chat([ChunkChoice(index, ChunkDelta(content=text), logprobs)])
            return
        shown, started, pieces = self.parsers[index].push(text, final)
        calls = [ToolCallDelta(i, call_id, "function", FunctionCallDelta(name, "")) for i, call_id, name in started]
        calls += [ToolCallDelta(i, function=FunctionCallDelta(arguments=piece)) for i, piece in pieces]
        if shown or calls or logprobs is not None:
            yield self._chat([ChunkChoice(index, ChunkDelta(content=shown or None, tool_calls=calls or None),
                                          logprobs)])

    def finish(self, index: int, item: Finish) -> Iterable[bytes]:
        if not self.chat:
            yield self._event(CompletionChunk(self.rid, self.created, self.model,
                                              [CompletionChunkChoice("", index, item.reason)]))
            return
        reason: str = item.reason
        if self.parsers is not None:
            yield from self._chat_delta(index, "", None, final=True)
            if self.parsers[index].calls and item.reason == "stop":
                reason = "tool_calls"
        yield self._chat([ChunkChoice(index, ChunkDelta(), None, reason)])  # type: ignore[arg-type]

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        usage = Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)
        if self.chat:
            return self._chat([], usage)
        return self._event(CompletionChunk(self.rid, self.created, self.model, [], usage=usage))


async def _stream(req: Request, gateway: Gateway, engine: Engine, admission: Admission, plan: Plan,
                  chunks: _Chunks, plain: bool, include_usage: bool) -> AsyncGenerator[bytes, None]:
    """SSE chunks of one generation; closing this generator early (the client went away) stops the generation,
    and however it ends the tokens generated so far are metered once."""
    framer = chunks.framer
    items = run(engine, plan, admission)
    try:
        if plain:
            if chunks.chat:
                yield framer.role()
            async for _, item in items:
                if type(item) is Delta:
                    if item.text:
                        yield framer.delta(item.text)
                else:
                    assert isinstance(item, Finish)
                    yield framer.finish(item.reason)
        else:
            for event in chunks.start():
                yield event
            async for index, item in items:
                if type(item) is Delta:
                    for event in chunks.delta(index, item):
                        yield event
                else:
                    assert isinstance(item, Finish)
                    for event in chunks.finish(index, item):
                        yield event
        if include_usage:
            yield chunks.usage(plan.prompt_tokens, admission.completion_tokens)
        yield framer.done()
    except Refusal as refusal:
        yield framer.error(refusal.message, refusal.type, refusal.code)
        yield framer.done()
    except (GeneratorExit, asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # anything else, a Rust panic too: only its type is logged (it may quote text)
        log.error("stream failed: %s", type(exc).__name__)
        error = internal_error()
        yield framer.error(error.message, error.type, error.code)
        yield framer.done()
    finally:
        await items.aclose()
        req.prompt_tokens, req.completion_tokens = plan.prompt_tokens, admission.completion_tokens
        gateway.settle(admission)


async def chat_completions(state: WorkerState, req: Request) -> Response | StreamResponse:
    return await _complete(state, req, chat=True)


async def completions(state: WorkerState, req: Request) -> Response | StreamResponse:
    return await _complete(state, req, chat=False)


def _model(engine: Engine | Embedder) -> Model:
    return Model(engine.model_id, created=0, context_length=engine.context_length)


async def _read(state: WorkerState, req: Request) -> tuple[Caller, list[tuple[str, str]]]:
    """A /v1 read: the caller, admitted (standing only; nothing is charged), and its rate-limit headers."""
    caller = req.caller
    assert caller is not None
    return caller, rate_headers((await state.gateway.admit(caller)).rate)


async def list_models(state: WorkerState, req: Request) -> Response:
    caller, headers = await _read(state, req)
    models = [_model(engine) for engine in state.models.ready() if may_use(caller, engine.model_id)]
    return json_response(_encode(ModelList(models)), headers)


async def get_model(state: WorkerState, req: Request, model_id: str) -> Response:
    caller, headers = await _read(state, req)
    return json_response(_encode(_model(served_model(state.models, caller, model_id))), headers)


async def key_usage(state: WorkerState, req: Request) -> Response:
    caller, headers = await _read(state, req)
    return json_response(_encode(usage_of(state.settings, state.store, caller)), headers)
