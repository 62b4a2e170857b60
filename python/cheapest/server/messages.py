"""/v1/messages and /v1/messages/count_tokens: Anthropic's Messages API (one JSON body, or its named SSE events),
over the same gateway as chat completions. The app authenticates these routes by `x-api-key` or a bearer key
and answers their errors in Anthropic's shape (see `anthropic_error`)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

import msgspec

from cheapest.api.anthropic import (
    AnthropicError, AnthropicErrorDetail, BlockDelta, ContentBlockDelta, ContentBlockStart, ContentBlockStop,
    CountTokensRequest, DeltaUsage, Message, MessageDelta, MessageStart, MessagesRequest,
    MessageStop, MessageUsage, Ping, StopDelta, StreamEvent, TextContent, TokenCount, ToolUseContent,
)
from cheapest.engine.types import Delta, Engine, Finish
from cheapest.gateway import Admission, Gateway
from cheapest.gateway.completions import Plan, collect, serving_engine
from cheapest.gateway.completions import run as run_plan
from cheapest.gateway.errors import Refusal
from cheapest.gateway.messages import message_plan, needs_grammar, stop_reason
from cheapest.gateway.tools import ToolCallParser
from cheapest.server.cancellation import until_disconnected
from cheapest.server.completions import SSE_HEADERS
from cheapest.server.errors import ApiError, decode_error, internal_error, rate_headers
from cheapest.server.request import Request, Response, StreamResponse, json_response

if TYPE_CHECKING:
    from cheapest.server.state import WorkerState

log = logging.getLogger("cheapest.server")
_encode = msgspec.json.Encoder().encode
_messages_decoder = msgspec.json.Decoder(MessagesRequest)
_count_decoder = msgspec.json.Decoder(CountTokensRequest)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def anthropic_error(err: ApiError) -> bytes:
    """An error in Anthropic's shape (the message is the same text-free one OpenAI's shape carries)."""
    return _encode(AnthropicError(AnthropicErrorDetail(ERROR_TYPES.get(err.status, "api_error"), err.message)))


def _tool_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


async def _decode(state: WorkerState, req: Request, decoder: msgspec.json.Decoder[Any]) -> Any:
    body = await req.body(state.settings.serving.max_body_bytes)
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise decode_error(exc) from None


async def count_tokens(state: WorkerState, req: Request) -> Response:
    caller = req.caller
    assert caller is not None
    mreq: CountTokensRequest = await _decode(state, req, _count_decoder)
    engine = serving_engine(state.models, caller, mreq.model)
    req.model = engine.model_id
    if needs_grammar(mreq):
        await engine.grammar_ready()
    plan = message_plan(engine, mreq, state.settings.serving.default_max_tokens)
    headers = rate_headers((await state.gateway.admit(caller)).rate)  # standing only; counting is not charged
    return json_response(_encode(TokenCount(plan.prompt_tokens)), headers)


async def messages(state: WorkerState, req: Request) -> Response | StreamResponse:
    caller = req.caller
    assert caller is not None
    gateway = state.gateway
    begun = await gateway.begin(caller)  # before the body is read, parsed, rendered or tokenized
    mreq: MessagesRequest = await _decode(state, req, _messages_decoder)
    req.stream = bool(mreq.stream)
    engine = serving_engine(state.models, caller, mreq.model)
    req.model = engine.model_id
    if needs_grammar(mreq):
        await engine.grammar_ready()
    plan = message_plan(engine, mreq, state.settings.serving.default_max_tokens)
    p = plan.prompt_tokens
    admission = await gateway.admit(caller, engine.model_id, p, plan.params.max_tokens, begun=begun)
    mid = state.ids.new("msg_")
    headers = rate_headers(admission.rate)
    if mreq.stream:
        return StreamResponse(200, SSE_HEADERS + headers, _stream(req, gateway, engine, admission, plan, mid),
                              finish=lambda: gateway.settle(admission))
    work = collect(gateway.admissions, engine, plan, admission)
    try:
        (answer,) = await (work if engine.instant else until_disconnected(work, req.watch_disconnect))
    finally:
        req.prompt_tokens, req.completion_tokens = p, admission.completion_tokens
    content: list[TextContent | ToolUseContent] = []
    calls = answer.parser.calls if answer.parser is not None else []
    if calls:
        content = [ToolUseContent(_tool_id(c.id), c.name, _input(c.arguments)) for c in calls]
    elif answer.text:
        content = [TextContent(answer.text)]
    out = Message(mid, engine.model_id, content, stop_reason(answer.reason, answer.stop, bool(calls)), answer.stop,
                  MessageUsage(p, admission.completion_tokens))
    return json_response(_encode(out), headers)


def _input(arguments: str) -> dict[str, Any]:
    """A call's arguments as an object (a call cut short by max_tokens: what parsed, or nothing)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _event(event: StreamEvent) -> bytes:
    name = str(event.__struct_config__.tag)  # the event's name is its type
    return b"event: " + name.encode() + b"\ndata: " + _encode(event) + b"\n\n"


class _Blocks:
    """The content blocks of a streamed answer: one text block, or one tool_use block per call."""

    def __init__(self, tools: bool) -> None:
        self.parser = ToolCallParser() if tools else None
        self.open: int | None = None  # the block being streamed
        self.count = 0
        self.calls = False

    def _start(self, block: TextContent | ToolUseContent) -> list[bytes]:
        out = self.stop()
        self.open = self.count
        self.count += 1
        return out + [_event(ContentBlockStart(self.open, block))]

    def stop(self) -> list[bytes]:
        if self.open is None:
            return []
        index, self.open = self.open, None
        return [_event(ContentBlockStop(index))]

    def text(self, piece: str, final: bool = False) -> list[bytes]:
        out: list[bytes] = []
        started: list[tuple[int, str, str]] = []
        pieces: list[tuple[int, str]] = []
        if self.parser is None:
            shown = piece
        else:
            shown, started, pieces = self.parser.push(piece, final)
        if shown:
            if self.open is None:
                out += self._start(TextContent(""))
            out.append(_event(ContentBlockDelta(self.count - 1, BlockDelta("text_delta", text=shown))))
        by_call: dict[int, list[str]] = {}
        for index, args in pieces:
            by_call.setdefault(index, []).append(args)
        names = {index: (call_id, name) for index, call_id, name in started}
        for index in sorted(set(by_call) | set(names)):  # calls come one after another in the text
            if index in names:
                self.calls = True
                call_id, name = names[index]
                out += self._start(ToolUseContent(_tool_id(call_id), name, {}))
            out += [_event(ContentBlockDelta(self.count - 1, BlockDelta("input_json_delta", partial_json=args))) for args in by_call.get(index, [])]
        return out


async def _stream(req: Request, gateway: Gateway, engine: Engine, admission: Admission, plan: Plan,
                  mid: str) -> AsyncGenerator[bytes, None]:
    """Anthropic's events: message_start, ping, the blocks, message_delta (stop reason, output tokens),
    message_stop; an error after the start is an `error` event."""
    items = run_plan(engine, plan, admission)
    blocks = _Blocks(plan.tools)
    p = plan.prompt_tokens
    try:
        yield _event(MessageStart(Message(mid, engine.model_id, [], None, None, MessageUsage(p, 0))))
        yield _event(Ping())
        async for _, item in items:
            if type(item) is Delta:
                for event in blocks.text(item.text):
                    yield event
            else:
                assert isinstance(item, Finish)
                for event in blocks.text("", final=True) + blocks.stop():
                    yield event
                reason = stop_reason(item.reason, item.stop, blocks.calls)
                yield _event(MessageDelta(StopDelta(reason, item.stop), DeltaUsage(admission.completion_tokens)))
        yield _event(MessageStop())
    except Refusal as refusal:
        err = AnthropicError(AnthropicErrorDetail("api_error" if refusal.kind == "model_failed"
                                                  else "invalid_request_error", refusal.message))
        yield b"event: error\ndata: " + _encode(err) + b"\n\n"
    except (GeneratorExit, asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # anything else, a Rust panic too: only its type is logged (it may quote text)
        log.error("stream failed: %s", type(exc).__name__)
        err = AnthropicError(AnthropicErrorDetail("api_error", internal_error().message))
        yield b"event: error\ndata: " + _encode(err) + b"\n\n"
    finally:
        await items.aclose()
        req.prompt_tokens, req.completion_tokens = p, admission.completion_tokens
        gateway.settle(admission)
