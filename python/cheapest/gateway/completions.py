"""Chat and text completions, apart from their wire format: which engine serves the request (routed by `model`
among the worker's models, within the key's allow-list), the prompt's tokens, the sampling parameters within the
model's context, and collecting a whole answer.

Prompt and completion text pass through here in memory only; no message built here carries any of it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

from cheapest.api.chat import MAX_SEED, ChatCompletionRequest
from cheapest.api.completions import CompletionRequest
from cheapest.gateway.admission import Admission, Admissions
from cheapest.gateway.auth import Caller
from cheapest.gateway.errors import Refusal
from cheapest.engine.registry import ServedModels
from cheapest.engine.types import (
    ContextLengthError, Delta, Embedder, Engine, EngineError, Finish, FinishReason, SamplingParams,
)

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
LOADING_RETRY_AFTER = 5.0  # seconds a client waits before asking a loading model again


def served_model(models: ServedModels[Engine | Embedder], caller: Caller, model: str) -> Engine | Embedder:
    """The engine that serves `model` to this caller (a key may be limited to some models). A model still loading
    is "unavailable" with a retry time; one that failed to load, unavailable for good."""
    slot = models.find(model)
    if slot is None or not may_use(caller, slot.engine.model_id if slot.engine is not None else slot.name):
        # The requested name is not echoed: it is request text.
        raise Refusal("not_found", "The requested model does not exist or you do not have access to it.", param="model",
                      code="model_not_found")
    if slot.engine is None:  # `model` is a configured model's name here: safe to say
        if slot.state == "failed":
            raise Refusal("unavailable", f"The model {slot.name} failed to load on this server.", param="model",
                          code="model_unavailable")
        raise Refusal("unavailable", f"The model {slot.name} is still loading; retry shortly.", param="model",
                      code="model_loading", retry_after=LOADING_RETRY_AFTER)
    return slot.engine


def serving_engine(models: ServedModels[Engine | Embedder], caller: Caller, model: str) -> Engine:
    """The generating engine for `model`; an embedding model is refused (it serves /v1/embeddings)."""
    engine = served_model(models, caller, model)
    if isinstance(engine, Embedder):
        raise Refusal("invalid_request", f"The model {engine.model_id} is an embedding model: use /v1/embeddings.",
                      param="model", code="model_not_supported")
    return engine


def may_use(caller: Caller, model: str) -> bool:
    return caller.key.models is None or model in caller.key.models


def check_bounds(request: ChatCompletionRequest | CompletionRequest) -> None:
    """What the request types cannot say themselves, checked as soon as the body is decoded (before any prompt
    is rendered): a refusal names the field. (Ranges that fit msgspec's bounds are in the types.)"""
    if request.seed is not None and request.seed > MAX_SEED:
        raise Refusal("invalid_request", f"`seed` must be between 0 and {MAX_SEED}.", param="seed",
                      code="invalid_value")


def prompt_ids(engine: Engine, request: ChatCompletionRequest | CompletionRequest) -> list[int]:
    """The prompt's token ids: chat messages through the model's chat template, or the text prompt."""
    if request.n != 1:
        raise Refusal("invalid_request", "Only n=1 is supported.", param="n", code="invalid_value")
    if isinstance(request, ChatCompletionRequest):
        if not engine.has_chat_template:
            raise Refusal("invalid_request", f"The model {engine.model_id} has no chat template (it is a base model): "
                          "use /v1/completions with a text prompt.", param="model", code="model_has_no_chat_template")
        messages: Sequence[tuple[str, str]] = [(_ROLES[m.role], m.text()) for m in request.messages]
        try:
            prompt = engine.render_chat(messages)
        except Exception:
            raise Refusal("invalid_request", "The messages cannot be rendered with this model's chat template "
                          "(check the order of roles).", param="messages", code="invalid_messages") from None
        return engine.encode(prompt)
    # A text prompt gets the tokens the model's tokenizer adds (a base model's BOS); a rendered chat template
    # already holds its own.
    return engine.encode(request.prompt, special_tokens=True)


def requested_tokens(request: ChatCompletionRequest | CompletionRequest) -> int | None:
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        return request.max_completion_tokens
    return request.max_tokens


def sampling(engine: Engine, default_max_tokens: int, prompt_tokens: int,
             request: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
    """Sampling parameters; the prompt and the completion budget must fit the model's context."""
    ctx = engine.context_length
    if prompt_tokens >= ctx:
        raise Refusal("invalid_request", str(ContextLengthError(prompt_tokens, ctx)), param="messages",
                      code="context_length_exceeded")
    requested = requested_tokens(request)
    if requested is not None and prompt_tokens + requested > ctx:
        raise Refusal("invalid_request", f"This model's maximum context length is {ctx} tokens; you requested "
                      f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} for "
                      f"the completion).", param="max_tokens", code="context_length_exceeded")
    max_tokens = requested if requested is not None else min(default_max_tokens, ctx - prompt_tokens)
    stop = request.stop
    stops = () if stop is None else (stop,) if isinstance(stop, str) else tuple(s for s in stop if s)
    return SamplingParams(max_tokens=max_tokens, temperature=1.0 if request.temperature is None else
                          request.temperature, top_p=1.0 if request.top_p is None else request.top_p,
                          seed=request.seed, stop=stops)


def engine_refusal(exc: ContextLengthError | EngineError) -> Refusal:
    """What a failure inside generation tells the client (the engine's messages carry no text)."""
    if isinstance(exc, ContextLengthError):
        return Refusal("invalid_request", str(exc), param="messages", code="context_length_exceeded")
    return Refusal("model_failed", "The model failed while generating.", code="engine_error")


async def collect(admissions: Admissions, engine: Engine, admission: Admission, ids: list[int],
                  params: SamplingParams) -> tuple[str, FinishReason]:
    """The whole completion. However it ends (an answer, a failure, cancellation because the client went away),
    the tokens generated so far are metered, once."""
    gen: AsyncGenerator[Delta | Finish, None] = engine.generate(ids, params)
    parts: list[str] = []
    reason: FinishReason = "stop"
    n = 0
    try:
        async for item in gen:
            n = admission.completion_tokens = item.completion_tokens  # metered as it goes (LiveUsage)
            if type(item) is Delta:
                parts.append(item.text)
            else:
                assert isinstance(item, Finish)
                reason = item.reason
        return "".join(parts), reason
    except (ContextLengthError, EngineError) as exc:
        raise engine_refusal(exc) from None
    finally:
        admission.completion_tokens = n
        if getattr(gen, "ag_frame", True) is not None:  # a finished async generator has nothing to close
            await gen.aclose()
        admissions.settle(admission)
