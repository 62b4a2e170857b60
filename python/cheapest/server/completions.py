"""/v1 routes: chat and text completions (one JSON body, or SSE chunks framed by the core), models (generating and
embedding ones), the calling key's usage. Each handler parses the request, calls the gateway, and encodes the answer.

A generation's request is charged against the caller's request rate before its body is read (the cheapest
refusal first, and a refused request still counts). Once a stream has started, any failure ends it with an SSE
error event and `[DONE]` at once: the client is never left waiting on an open response."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

import cheapest_core
import msgspec

from cheapest.api.chat import AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest
from cheapest.api.common import Usage
from cheapest.api.completions import Completion, CompletionChoice, CompletionRequest
from cheapest.api.models import Model, ModelList
from cheapest.gateway import Admission, Caller, Gateway
from cheapest.gateway.completions import (
    check_bounds, collect, engine_refusal, may_use, prompt_ids, sampling, served_model, serving_engine,
)
from cheapest.gateway.usage import key_usage as usage_of
from cheapest.engine.types import ContextLengthError, Delta, Embedder, Engine, EngineError, Finish, SamplingParams
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
    check_bounds(creq)
    req.stream = creq.stream
    engine = serving_engine(state.models, caller, creq.model)
    req.model = engine.model_id
    ids = prompt_ids(engine, creq)
    p = len(ids)
    params = sampling(engine, state.settings.serving.default_max_tokens, p, creq)
    admission = await gateway.admit(caller, engine.model_id, p, params.max_tokens, begun=begun)
    rid = state.ids.new("chatcmpl-" if chat else "cmpl-")
    created = int(time.time())
    headers = rate_headers(admission.rate)
    if creq.stream:
        include_usage = creq.stream_options is not None and creq.stream_options.include_usage
        framer = cheapest_core.SseFramer(rid, engine.model_id, created,
                                         "chat.completion.chunk" if chat else "text_completion")
        return StreamResponse(200, SSE_HEADERS + headers,
                              _stream(req, gateway, engine, admission, ids, params, framer, chat, include_usage),
                              finish=lambda: gateway.settle(admission))
    work = collect(gateway.admissions, engine, admission, ids, params)
    try:  # an engine that never waits needs no watching; a slow one stops when the client goes away
        text, reason = await (work if engine.instant else until_disconnected(work, req.watch_disconnect))
    finally:  # for the log line, however it ended
        req.prompt_tokens, req.completion_tokens = p, admission.completion_tokens
    usage = Usage(p, admission.completion_tokens, p + admission.completion_tokens)
    if chat:
        out: ChatCompletion | Completion = ChatCompletion(
            rid, created, engine.model_id, [ChatChoice(0, AssistantMessage("assistant", text), reason)], usage)
    else:
        out = Completion(rid, created, engine.model_id, [CompletionChoice(text, 0, reason)], usage)
    return json_response(_encode(out), headers)


async def _stream(req: Request, gateway: Gateway, engine: Engine, admission: Admission, ids: list[int],
                  params: SamplingParams, framer: cheapest_core.SseFramer, chat: bool,
                  include_usage: bool) -> AsyncGenerator[bytes, None]:
    """SSE chunks of one generation; closing this generator early (the client went away) stops the generation,
    and however it ends the tokens generated so far are metered once."""
    gen = engine.generate(ids, params)
    try:
        if chat:
            yield framer.role()
        async for item in gen:
            admission.completion_tokens = item.completion_tokens
            if type(item) is Delta:
                if item.text:
                    yield framer.delta(item.text)
            else:
                assert isinstance(item, Finish)
                yield framer.finish(item.reason)
        if include_usage:
            yield framer.usage(len(ids), admission.completion_tokens)
        yield framer.done()
    except (ContextLengthError, EngineError) as exc:
        refusal = engine_refusal(exc)
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
        await gen.aclose()
        req.prompt_tokens, req.completion_tokens = len(ids), admission.completion_tokens
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
