"""/v1 routes: chat and text completions (JSON or SSE), models, the calling key's usage."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncGenerator, Sequence

import cheapest_core
import msgspec

from cheapest.api.chat import AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest
from cheapest.api.common import Usage
from cheapest.api.completions import Completion, CompletionChoice, CompletionRequest
from cheapest.api.models import KeyUsage, Model, ModelList, ModelUsage, RateLimits
from cheapest.http import ratelimit
from cheapest.http.auth import authenticate, check_standing
from cheapest.http.billing import admit_spend
from cheapest.http.errors import ApiError, decode_error, internal_error
from cheapest.http.request import ClientGone, Request, Response, StreamResponse, json_response
from cheapest.http.state import WorkerState
from cheapest.engine.types import ContextLengthError, Delta, Engine, EngineError, Finish, FinishReason, SamplingParams
from cheapest.store import AccountRecord, KeyRecord

log = logging.getLogger("cheapest.http")

_encode = msgspec.json.Encoder().encode
_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SSE_HEADERS = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]

# Response ids: 12 random bytes each, as before, but drawn from a buffer refilled 512 ids at a time - one
# getrandom(2) per request was a tenth of the handler's time. The buffer is dropped in a forked child, so two
# workers never hand out the same ids.
_ID_BATCH = 512
_ids: list[str] = []


def _new_id() -> str:
    if not _ids:
        hexed = os.urandom(12 * _ID_BATCH).hex()
        _ids.extend(hexed[i:i + 24] for i in range(0, len(hexed), 24))
    return _ids.pop()


os.register_at_fork(after_in_child=_ids.clear)


# A key's effective limits, reused while `authenticate` keeps returning the very same (cached) key and account
# records; any change to either gives new record objects, hence new limits.
_limits: dict[str, tuple[KeyRecord, AccountRecord, ratelimit.Limits]] = {}


def _auth(state: WorkerState, req: Request) -> tuple[KeyRecord, AccountRecord, ratelimit.Limits]:
    key, account = authenticate(state.store, state.pepper, req.headers.get("authorization"), "sk")
    req.key_id = key.id
    check_standing(state.settings, account)
    hit = _limits.get(key.id)
    if hit is not None and hit[0] is key and hit[1] is account:
        limits = hit[2]
    else:
        limits = ratelimit.limits_for(state.settings, account, key)
        if len(_limits) >= 10_000:
            _limits.clear()
        _limits[key.id] = (key, account, limits)
    req.rate_limits = limits
    return key, account, limits


def _engine(state: WorkerState, model: str, key: KeyRecord) -> Engine:
    engine = state.engine
    if engine is None:
        raise ApiError(503, "The model is still loading; retry shortly.", type="server_error", code="not_ready")
    if model != engine.model_id or (key.models is not None and model not in key.models):
        # The requested name is not echoed: it is request text.
        raise ApiError(404, "The requested model does not exist or you do not have access to it.", param="model",
                       code="model_not_found")
    return engine


def _sampling(state: WorkerState, engine: Engine, prompt_tokens: int, requested: int | None,
              temperature: float | None, top_p: float | None, seed: int | None,
              stop: str | list[str] | None) -> SamplingParams:
    ctx = engine.context_length
    if prompt_tokens >= ctx:
        raise ApiError(400, str(ContextLengthError(prompt_tokens, ctx)), param="messages",
                       code="context_length_exceeded")
    if requested is not None and prompt_tokens + requested > ctx:
        raise ApiError(400, f"This model's maximum context length is {ctx} tokens; you requested "
                       f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} for the "
                       f"completion).", param="max_tokens", code="context_length_exceeded")
    max_tokens = requested if requested is not None else min(state.settings.default_max_tokens, ctx - prompt_tokens)
    stops = () if stop is None else (stop,) if isinstance(stop, str) else tuple(s for s in stop if s)
    return SamplingParams(max_tokens=max_tokens, temperature=1.0 if temperature is None else temperature,
                          top_p=1.0 if top_p is None else top_p, seed=seed, stop=stops)


class _Run:
    """One admitted generation: its accounting happens exactly once, however it ends."""

    __slots__ = ("state", "req", "key", "limits", "engine", "admission", "prompt_tokens", "completion_tokens",
                 "settled", "debit_to")

    def __init__(self, state: WorkerState, req: Request, key: KeyRecord, limits: ratelimit.Limits, engine: Engine,
                 admission: ratelimit.Admission, prompt_tokens: int) -> None:
        self.state, self.req, self.key, self.limits, self.engine = state, req, key, limits, engine
        self.admission, self.prompt_tokens = admission, prompt_tokens
        self.completion_tokens = 0
        self.settled = False
        self.debit_to: str | None = None  # a credit-funded account pays this request's cost

    def settle(self) -> None:
        if self.settled:
            return
        self.settled = True
        p, c = self.prompt_tokens, self.completion_tokens
        self.req.prompt_tokens, self.req.completion_tokens = p, c
        ratelimit.settle(self.state.limiter, self.key.id, self.limits, self.admission.charged_tokens, p + c)
        model = self.engine.model_id
        self.state.meter.record(self.key.id, model, p, c, self.state.cost_micro(model, p, c),
                                debit_account=self.debit_to)


async def _collect(run: _Run, gen: AsyncGenerator[Delta | Finish, None]) -> tuple[str, FinishReason]:
    parts: list[str] = []
    reason: FinishReason = "stop"
    n = 0
    try:
        async for item in gen:
            n = item.completion_tokens
            if type(item) is Delta:
                parts.append(item.text)
            else:
                assert isinstance(item, Finish)
                reason = item.reason
    finally:  # however it ends, the tokens generated so far are metered
        run.completion_tokens = n
    return "".join(parts), reason


async def _generate_all(run: _Run, prompt_ids: list[int], params: SamplingParams) -> tuple[str, FinishReason]:
    gen = run.engine.generate(prompt_ids, params)
    try:
        if getattr(run.engine, "instant", False) or run.req.watch_disconnect is None:
            return await _collect(run, gen)  # an engine that never waits: nothing to watch
        # A slow engine: stop generating if the client goes away before the answer is ready.
        work = asyncio.ensure_future(_collect(run, gen))
        watcher = asyncio.ensure_future(run.req.watch_disconnect())
        try:
            await asyncio.wait((work, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not work.done():
            run.req.disconnected = True
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            raise ClientGone
        return work.result()
    except ContextLengthError as exc:
        raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
    except EngineError:
        raise ApiError(500, "The model failed while generating.", type="server_error", code="engine_error") from None
    finally:
        if getattr(gen, "ag_frame", True) is not None:  # a finished async generator has nothing to close
            await gen.aclose()
        run.settle()


async def _stream(run: _Run, prompt_ids: list[int], params: SamplingParams, framer: cheapest_core.SseFramer,
                  chat: bool, include_usage: bool) -> AsyncGenerator[bytes, None]:
    gen = run.engine.generate(prompt_ids, params)
    try:
        if chat:
            yield framer.role()
        async for item in gen:
            if type(item) is Delta:
                run.completion_tokens = item.completion_tokens
                if item.text:
                    yield framer.delta(item.text)
            else:
                assert isinstance(item, Finish)
                run.completion_tokens = item.completion_tokens
                yield framer.finish(item.reason)
        if include_usage:
            yield framer.usage(run.prompt_tokens, run.completion_tokens)
        yield framer.done()
    except ContextLengthError as exc:
        yield framer.error(str(exc), "invalid_request_error", "context_length_exceeded")
        yield framer.done()
    except EngineError:
        yield framer.error("The model failed while generating.", "server_error", "engine_error")
        yield framer.done()
    finally:
        await gen.aclose()
        run.settle()


def _messages(creq: ChatCompletionRequest) -> Sequence[tuple[str, str]]:
    return [(_ROLES[m.role], m.text()) for m in creq.messages]


async def _complete(state: WorkerState, req: Request, chat: bool) -> Response | StreamResponse:
    key, account, limits = _auth(state, req)
    body = await req.body(state.settings.max_body_bytes)
    try:
        creq = (_chat_decoder if chat else _completion_decoder).decode(body)
    except msgspec.DecodeError as exc:
        raise decode_error(exc) from None
    req.stream = creq.stream
    engine = _engine(state, creq.model, key)
    req.model = engine.model_id
    if creq.n != 1:
        raise ApiError(400, "Only n=1 is supported.", param="n", code="invalid_value")
    if chat:
        assert isinstance(creq, ChatCompletionRequest)
        try:
            prompt = engine.render_chat(_messages(creq))
        except Exception:
            raise ApiError(400, "The messages cannot be rendered with this model's chat template (check the "
                           "order of roles).", param="messages", code="invalid_messages") from None
        requested = creq.max_completion_tokens if creq.max_completion_tokens is not None else creq.max_tokens
    else:
        assert isinstance(creq, CompletionRequest)
        prompt = creq.prompt
        requested = creq.max_tokens
    prompt_ids = engine.encode(prompt)
    del prompt
    p = len(prompt_ids)
    params = _sampling(state, engine, p, requested, creq.temperature, creq.top_p, creq.seed, creq.stop)
    debit_to = admit_spend(state, key, account)  # budgets (429) and credits (402), before any inference
    admission = ratelimit.admit(state.limiter, key.id, limits, p, params.max_tokens)
    run = _Run(state, req, key, limits, engine, admission, p)
    run.debit_to = debit_to
    rid = ("chatcmpl-" if chat else "cmpl-") + _new_id()
    created = int(time.time())
    if creq.stream:
        include_usage = creq.stream_options is not None and creq.stream_options.include_usage
        framer = cheapest_core.SseFramer(rid, engine.model_id, created,
                                         "chat.completion.chunk" if chat else "text_completion")
        return StreamResponse(200, SSE_HEADERS + admission.headers,
                              _stream(run, prompt_ids, params, framer, chat, include_usage))
    text, reason = await _generate_all(run, prompt_ids, params)
    usage = Usage(p, run.completion_tokens, p + run.completion_tokens)
    if chat:
        out: ChatCompletion | Completion = ChatCompletion(
            rid, created, engine.model_id, [ChatChoice(0, AssistantMessage("assistant", text), reason)], usage)
    else:
        out = Completion(rid, created, engine.model_id, [CompletionChoice(text, 0, reason)], usage)
    return json_response(_encode(out), admission.headers)


async def chat_completions(state: WorkerState, req: Request) -> Response | StreamResponse:
    return await _complete(state, req, chat=True)


async def completions(state: WorkerState, req: Request) -> Response | StreamResponse:
    return await _complete(state, req, chat=False)


def _model(engine: Engine) -> Model:
    return Model(engine.model_id, created=0, context_length=engine.context_length)


async def list_models(state: WorkerState, req: Request) -> Response:
    key, _, limits = _auth(state, req)
    engine = state.engine
    models = [] if engine is None or (key.models is not None and engine.model_id not in key.models) else [engine]
    return json_response(_encode(ModelList([_model(e) for e in models])),
                         ratelimit.peek(state.limiter, key.id, limits))


async def get_model(state: WorkerState, req: Request, model_id: str) -> Response:
    key, _, limits = _auth(state, req)
    engine = _engine(state, model_id, key)
    return json_response(_encode(_model(engine)), ratelimit.peek(state.limiter, key.id, limits))


async def key_usage(state: WorkerState, req: Request) -> Response:
    key, account, limits = _auth(state, req)
    totals: dict[str, list[int]] = {}
    for row in state.store.usage([key.id]):
        t = totals.setdefault(row.model, [0, 0, 0, 0])
        c = row.counter
        t[0] += c.requests
        t[1] += c.prompt_tokens
        t[2] += c.completion_tokens
        t[3] += c.cost_micro
    plan = state.settings.plan(account.plan)
    body = KeyUsage(
        key_id=key.id, plan=account.plan, limits=RateLimits(limits.rpm, limits.tpm),
        usage=[ModelUsage(m, t[0], t[1], t[2], t[3] / 1e6, t[3]) for m, t in sorted(totals.items())],
        budget_usd=key.limits.budget_usd if key.limits.budget_usd is not None else plan.budget_usd,
        budget_window=key.limits.budget_window or plan.budget_window,
    )
    return json_response(_encode(body), ratelimit.peek(state.limiter, key.id, limits))


__all__ = ["chat_completions", "completions", "get_model", "key_usage", "list_models", "internal_error"]
