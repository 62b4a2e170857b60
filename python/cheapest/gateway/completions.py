"""Chat and text completions, apart from their wire format: which engine serves the request (routed by `model`
among the worker's models, within the key's allow-list), what it asks for (`plan`: prompts, sampling, output
grammar, tools, logprobs, choices) within the model's context and the service's bounds, and running it: the items
of every sequence, metered as they come, and whole answers.

Prompt and completion text pass through here in memory only; no message built here carries any of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import msgspec

from cheapest.api.chat import MAX_SEED, ChatCompletionRequest
from cheapest.api.completions import CompletionRequest
from cheapest.engine.registry import ServedModels
from cheapest.engine.types import (
    ContextLengthError, Delta, Embedder, Engine, EngineError, Finish, FinishReason, Grammar, SamplingParams,
    TokenLogprob, is_embedder,
)
from cheapest.gateway.admission import Admission, Admissions
from cheapest.gateway.auth import Caller
from cheapest.gateway.errors import Refusal
from cheapest.gateway.parameters import check_supported
from cheapest.gateway.structured import answer_grammar, compile_for, response_grammar, text_grammar, tool_grammar
from cheapest.gateway.tools import ToolCallParser, chat_messages, template_tools

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
    if is_embedder(engine):
        raise Refusal("invalid_request", f"The model {engine.model_id} is an embedding model: use /v1/embeddings.",
                      param="model", code="model_not_supported")
    return engine


def may_use(caller: Caller, model: str) -> bool:
    return caller.key.models is None or model in caller.key.models


def check_bounds(request: ChatCompletionRequest | CompletionRequest) -> None:
    """What the request types cannot say themselves, checked by `plan` before any prompt is rendered: a refusal
    names the field. (Ranges that fit msgspec's bounds are in the types.)"""
    if request.seed is not None and request.seed > MAX_SEED:
        raise Refusal("invalid_request", f"`seed` must be between 0 and {MAX_SEED}.", param="seed",
                      code="invalid_value")


def needs_grammar(request: ChatCompletionRequest | CompletionRequest) -> bool:
    """Whether planning the request compiles a grammar: await the engine's `grammar_ready()` first."""
    return isinstance(request, ChatCompletionRequest) and (request.response_format is not None or bool(request.tools))


def invalid(message: str, param: str) -> Refusal:
    return Refusal("invalid_request", message, param=param, code="invalid_value")


@dataclass
class Plan:
    """One request's generation: each prompt is prefilled once and decoded `params.n` times; `choices` of
    those are answered per prompt (fewer than n only with best_of, which keeps the likeliest)."""

    prompts: list[list[int]]
    params: SamplingParams
    choices: int = 1
    tools: bool = False  # the output may hold tool calls (parsed by ToolCallParser)
    logprobs: int | None = None  # what the client asked for; None: none shown
    echo: list[str] | None = None  # prompt texts to put before each choice's text

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def sequences(self) -> int:
        return len(self.prompts) * self.params.n


def plan(engine: Engine, request: ChatCompletionRequest | CompletionRequest, default_max_tokens: int,
         max_choices: int) -> Plan:
    """What the request asks of the engine; every field honoured or refused by name."""
    check_supported(request)
    check_bounds(request)
    n = request.n or 1
    grammar: Grammar | None = None
    tools = False
    echo: list[str] | None = None
    if isinstance(request, ChatCompletionRequest):
        prompts = [_chat_prompt(engine, request)]
        grammar, tools = _chat_grammar(engine, request)
        if request.top_logprobs is not None and not request.logprobs:
            raise invalid("`top_logprobs` needs `logprobs` set to true.", "top_logprobs")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        best_of = n
    else:
        prompts, texts = _text_prompts(engine, request)
        logprobs = request.logprobs
        best_of = request.best_of or n
        if best_of < n:
            raise invalid("`best_of` must be at least `n`.", "best_of")
        if best_of > n and request.stream:
            raise invalid("`best_of` cannot be larger than `n` when streaming.", "best_of")
        if request.echo:
            if texts is None:
                raise invalid("`echo` needs a text prompt (token id prompts are not echoed).", "echo")
            if logprobs is not None:
                raise invalid("`echo` with `logprobs` is not supported: prompt tokens are not scored.", "echo")
            echo = texts
    if len(prompts) * best_of > max_choices:
        raise invalid(f"At most {max_choices} sequences per request (prompts x {'best_of' if best_of > n else 'n'}).",
                      "best_of" if best_of > n else "n")
    bias = _logit_bias(engine, request)
    max_tokens = _max_tokens(engine, default_max_tokens, max(len(p) for p in prompts), request)
    stop = request.stop
    stops = () if stop is None else (stop,) if isinstance(stop, str) else tuple(s for s in stop if s)
    params = SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p, seed=request.seed, stop=stops, n=best_of,
        logprobs=0 if best_of > n and logprobs is None else logprobs, logit_bias=bias,
        frequency_penalty=request.frequency_penalty or 0.0, presence_penalty=request.presence_penalty or 0.0,
        grammar=grammar)
    return Plan(prompts, params, n, tools, logprobs, echo)


def _chat_prompt(engine: Engine, request: ChatCompletionRequest) -> list[int]:
    if not engine.has_chat_template:
        raise Refusal("invalid_request", f"The model {engine.model_id} has no chat template (it is a base model): "
                      "use /v1/completions with a text prompt.", param="model", code="model_has_no_chat_template")
    tools = template_tools(request.tools) if request.tools else None
    try:
        prompt = engine.render_chat(chat_messages(request.messages), tools)
    except Exception:
        raise Refusal("invalid_request", "The messages cannot be rendered with this model's chat template "
                      "(check the order of roles).", param="messages", code="invalid_messages") from None
    return engine.encode(prompt)


def _text_prompts(engine: Engine, request: CompletionRequest) -> tuple[list[list[int]], list[str] | None]:
    """The prompts' token ids, and their texts when they came as text. A text prompt gets the tokens the model's
    tokenizer adds (a base model's BOS); a rendered chat template already holds its own."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return [engine.encode(prompt, special_tokens=True)], [prompt]
    texts = [p for p in prompt if isinstance(p, str)]
    single = [p for p in prompt if isinstance(p, int)]
    many = [p for p in prompt if isinstance(p, list)]
    if len(texts) == len(prompt):
        return [engine.encode(p, special_tokens=True) for p in texts], texts
    if len(single) == len(prompt):
        ids = [single]
    elif len(many) == len(prompt):
        ids = many
    else:
        raise invalid("`prompt` must be a string, a list of strings, token ids, or a list of token id lists.",
                      "prompt")
    if any(t >= engine.vocab_size for p in ids for t in p):
        raise invalid("A prompt token id is outside the model's vocabulary.", "prompt")
    return ids, None


def _chat_grammar(engine: Engine, request: ChatCompletionRequest) -> tuple[Grammar | None, bool]:
    """The output grammar (response_format, tools per tool_choice), and whether calls may come out."""
    fmt = request.response_format
    answer = None
    if fmt is not None:
        if fmt.type == "json_schema" and fmt.json_schema is None:
            raise invalid("`response_format.json_schema` is required when its type is `json_schema`.",
                          "response_format")
        answer = response_grammar(fmt.type, fmt.json_schema.schema if fmt.json_schema is not None else None)
    tools = [t.function for t in request.tools or () if t.function is not None]
    choice = request.tool_choice
    if choice is not None and not tools:
        raise invalid("`tool_choice` is only allowed when `tools` are given.", "tool_choice")
    required = choice == "required"
    parallel = request.parallel_tool_calls is not False
    if choice is not None and not isinstance(choice, str):
        if choice.type == "function":
            if choice.function is None:
                raise invalid("`tool_choice.function` is required.", "tool_choice")
            named = [f for f in tools if f.name == choice.function.name]
            if not named:
                raise invalid("`tool_choice` names a function that is not in `tools`.", "tool_choice")
            tools, required, parallel = named, True, False
        else:
            allowed = choice.allowed_tools
            if allowed is None:
                raise invalid("`tool_choice.allowed_tools` is required.", "tool_choice")
            names = {str((t.get("function") or {}).get("name")) for t in allowed.tools}
            tools = [f for f in tools if f.name in names]
            if not tools:
                raise invalid("`tool_choice.allowed_tools` names no function in `tools`.", "tool_choice")
            required = allowed.mode == "required"
    answer_compiled = None if answer is None else compile_for(engine, answer_grammar(answer), "response_format")
    if not tools:
        return answer_compiled, False
    if choice == "none":
        return answer_compiled or compile_for(engine, text_grammar(), "tools"), False
    functions = [(f.name, f.parameters) for f in tools]
    grammar = tool_grammar(functions, required=required, parallel=parallel, answer=answer)
    return compile_for(engine, grammar, "tools"), True


def _logit_bias(engine: Engine, request: ChatCompletionRequest | CompletionRequest) -> tuple[tuple[int, float], ...]:
    if not request.logit_bias:
        return ()
    out = []
    for key, bias in request.logit_bias.items():
        if not key.isdigit() or int(key) >= engine.vocab_size:
            raise invalid("`logit_bias` keys must be token ids of the model's vocabulary.", "logit_bias")
        out.append((int(key), float(bias)))
    return tuple(out)


def requested_tokens(request: ChatCompletionRequest | CompletionRequest) -> int | None:
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        return request.max_completion_tokens
    return request.max_tokens


def _max_tokens(engine: Engine, default_max_tokens: int, prompt_tokens: int,
                request: ChatCompletionRequest | CompletionRequest) -> int:
    """The completion budget; the (longest) prompt and the budget must fit the model's context."""
    ctx = engine.context_length
    if prompt_tokens >= ctx:
        raise Refusal("invalid_request", str(ContextLengthError(prompt_tokens, ctx)), param="messages",
                      code="context_length_exceeded")
    requested = requested_tokens(request)
    if requested is not None and prompt_tokens + requested > ctx:
        raise Refusal("invalid_request", f"This model's maximum context length is {ctx} tokens; you requested "
                      f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} for "
                      f"the completion).", param="max_tokens", code="context_length_exceeded")
    return requested if requested is not None else min(default_max_tokens, ctx - prompt_tokens)


def engine_refusal(exc: ContextLengthError | EngineError) -> Refusal:
    """What a failure inside generation tells the client (the engine's messages carry no text)."""
    if isinstance(exc, ContextLengthError):
        return Refusal("invalid_request", str(exc), param="messages", code="context_length_exceeded")
    return Refusal("model_failed", "The model failed while generating.", code="engine_error")


# --- running a plan ---------------------------------------------------------------------------------------------


async def run(engine: Engine, plan: Plan, admission: Admission) -> AsyncGenerator[tuple[int, Delta | Finish], None]:
    """Every sequence's items as (sequence index, item), prompts after one another in the index (prompt k's
    sequences are k*n..k*n+n-1); the admission's completion tokens follow them. Engine failures become
    refusals; closing this generator stops every sequence."""
    counts = [0] * plan.sequences
    # One prompt: the engine's own generator (its items carry their sequence's index); several: merged.
    gen = engine.generate(plan.prompts[0], plan.params) if len(plan.prompts) == 1 else _merged(engine, plan)
    try:
        if plan.sequences == 1:
            async for item in gen:
                admission.completion_tokens = item.completion_tokens
                yield 0, item
        else:
            async for item in gen:
                counts[item.index] = item.completion_tokens
                admission.completion_tokens = sum(counts)
                yield item.index, item
    except (ContextLengthError, EngineError) as exc:
        raise engine_refusal(exc) from None
    finally:
        await gen.aclose()


async def _merged(engine: Engine, plan: Plan) -> AsyncGenerator[Delta | Finish, None]:
    """The items of several prompts' generations as they come, each re-indexed: prompt k's sequence i is
    k*n+i."""
    n = plan.params.n
    queue: asyncio.Queue[Delta | Finish | BaseException] = asyncio.Queue()

    async def pump(k: int, ids: list[int]) -> None:
        gen = engine.generate(ids, plan.params)
        try:
            async for item in gen:
                queue.put_nowait(msgspec.structs.replace(item, index=k * n + item.index))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait(exc)
        finally:
            await gen.aclose()

    tasks = [asyncio.ensure_future(pump(k, ids)) for k, ids in enumerate(plan.prompts)]
    running = plan.sequences
    try:
        while running:
            got = await queue.get()
            if isinstance(got, BaseException):
                raise got
            yield got
            if isinstance(got, Finish):
                running -= 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Choice:
    """One sequence's whole answer."""

    index: int
    text: str = ""
    reason: FinishReason = "stop"
    stop: str | None = None
    tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    parser: ToolCallParser | None = None

    def mean_logprob(self) -> float:
        return sum(t.logprob for t in self.logprobs) / max(1, len(self.logprobs))


async def collect(admissions: Admissions, engine: Engine, plan: Plan, admission: Admission) -> list[Choice]:
    """The whole answer: `plan.choices` per prompt (the likeliest of best_of), indexed 0.. in prompt order.
    However it ends (an answer, a failure, cancellation because the client went away), the tokens generated so
    far are metered, once."""
    answers = [Choice(i, parser=ToolCallParser() if plan.tools else None) for i in range(plan.sequences)]
    parts: list[list[str]] = [[] for _ in answers]
    try:
        async for index, item in run(engine, plan, admission):
            answer = answers[index]
            answer.tokens = item.completion_tokens
            if type(item) is Delta:
                parts[index].append(item.text)
                answer.logprobs.extend(item.logprobs)
            else:
                assert isinstance(item, Finish)
                answer.reason, answer.stop = item.reason, item.stop
    finally:
        admissions.settle(admission)
    for answer, texts in zip(answers, parts):
        answer.text = "".join(texts)
        if answer.parser is not None:
            answer.parser.push(answer.text, final=True)
    n = plan.params.n
    if plan.choices < n:  # best_of: the likeliest per token, as OpenAI ranks them
        answers = [a for k in range(len(plan.prompts))
                   for a in sorted(answers[k * n:(k + 1) * n], key=Choice.mean_logprob, reverse=True)[:plan.choices]]
    for i, answer in enumerate(answers):
        answer.index = i
    return answers
