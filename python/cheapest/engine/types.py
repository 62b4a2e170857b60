"""The contract between the engine and the HTTP layer.

The HTTP layer only knows these types; the ONNX engine (`onnx_engine.py`) and
the instant fixed-output model used by the gateway benchmark both implement
`Engine`. Text in these objects lives for one request and is never logged.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import msgspec
import numpy as np

if TYPE_CHECKING:
    from typing_extensions import TypeIs

FinishReason = Literal["stop", "length"]


class SamplingParams(msgspec.Struct, frozen=True):
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # matched across token boundaries, never emitted
    n: int = 1  # sequences from one prompt (prefilled once); items carry their `index`
    logprobs: int | None = None  # None: off; k >= 0: each token's logprob and the k most likely alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    frequency_penalty: float = 0.0  # subtracted per earlier occurrence of a token in the completion
    presence_penalty: float = 0.0  # subtracted once a token has occurred in the completion
    grammar: Grammar | None = None  # the output must match it (Engine.compile_grammar); None costs nothing


class Grammar:
    """A compiled output constraint (each engine its own subclass); every sequence generated with it gets its own
    matcher."""


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """One token as the model saw it: its text, UTF-8 bytes and logprob under the model's own distribution
    (before temperature, top_p, penalties and grammar masks), and the most likely tokens at that step."""

    token: str
    utf8: bytes
    logprob: float
    top: tuple[tuple[str, bytes, float], ...] = ()  # (token, utf8, logprob), most likely first


class Delta(msgspec.Struct, frozen=True):
    """New completion text (may be "" when a token ends mid-character or may start a stop string)."""

    text: str
    completion_tokens: int  # cumulative, for this sequence
    index: int = 0  # which of the n sequences
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens consumed since the last Delta, when asked for


class Finish(msgspec.Struct, frozen=True):
    reason: FinishReason
    completion_tokens: int  # this sequence's total
    index: int = 0
    stop: str | None = None  # the stop string that ended it, if one did


class ContextLengthError(ValueError):
    """The prompt (plus requested max_tokens where the caller checks it) does not fit the model's context.

    The message carries token counts only, never text."""

    def __init__(self, prompt_tokens: int, context_length: int) -> None:
        super().__init__(
            f"This model's maximum context length is {context_length} tokens; "
            f"the prompt has {prompt_tokens} tokens."
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class EngineError(RuntimeError):
    """Inference failed; the message is generic and carries no request text."""


class GrammarError(ValueError):
    """An output constraint the grammar engine cannot compile; the message carries no request text."""


class Engine(Protocol):
    model_id: str  # e.g. "SmolLM2-135M-Instruct"
    context_length: int
    vocab_size: int  # token ids are 0..vocab_size-1
    provider: str  # "CUDAExecutionProvider" / "CPUExecutionProvider" / "fixed"
    # True when `generate` never suspends (it yields everything at once): the HTTP layer then need not watch
    # for a client that goes away during generation.
    instant: bool
    # False for a base model that ships no chat template (and none is configured): it serves completions only.
    has_chat_template: bool

    def render_chat(self, messages: Sequence[tuple[str, str] | Mapping[str, Any]],
                    tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """Messages -> prompt text via the model's chat template (sandboxed Jinja). A message is a (role,
        content) pair or a dict in Hugging Face's chat format (role, content, tool_calls, tool_call_id, name);
        `tools` are OpenAI function tools, rendered by the template where it takes them, else as the system
        prompt of engine/chat.py's tool format."""
        ...

    async def grammar_ready(self) -> None:
        """Until compile_grammar can run without waiting (the grammar engine's view of the vocabulary is built on
        first use)."""
        ...

    def compile_grammar(self, grammar: str) -> Grammar:
        """An llguidance grammar (Lark syntax, `%json {schema}` inside) -> a Grammar for SamplingParams.
        Raises GrammarError when it cannot be compiled."""
        ...

    def encode(self, text: str, *, special_tokens: bool = False) -> list[int]:
        """Prompt text -> token ids (special tokens in the rendered template are honoured). `special_tokens`: add
        the ones the tokenizer adds to a bare text (a base model's BOS), for a text-completion prompt."""
        ...

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[Delta | Finish, None]:
        """Yields Delta items then exactly one Finish per sequence (params.n of them, each item tagged with its
        `index`; the generator ends after the last Finish). Raises ContextLengthError before any work if the
        prompt does not fit. Runs off the event loop; if the consumer stops iterating (aclose() or task
        cancellation), the sequence leaves the batch at the next decode step."""
        ...

    async def close(self) -> None: ...


def is_embedder(engine: object) -> TypeIs[Embedder]:
    """isinstance(engine, Embedder), decided once per type: a runtime protocol check walks the protocol's
    attributes on every call (~15 us on the request path)."""
    kind = type(engine)
    known = _EMBEDDER_TYPES.get(kind)
    if known is None:
        known = _EMBEDDER_TYPES[kind] = isinstance(engine, Embedder)
    return known


_EMBEDDER_TYPES: dict[type, bool] = {}


@runtime_checkable
class Embedder(Protocol):
    """A sentence-embedding model: token ids in, one vector per input out (engine/embedding.py)."""

    model_id: str
    context_length: int  # tokens per input, the model's special tokens included
    dimensions: int
    provider: str

    def tokenize(self, text: str) -> list[int]:
        """A text's token ids as the model reads them (its special tokens included)."""
        ...

    def wrap(self, ids: Sequence[int]) -> list[int]:
        """A client's token ids (without special tokens) as the model reads them."""
        ...

    def truncate(self, ids: list[int], limit: int) -> list[int]:
        """An input cut to `limit` tokens, its closing special tokens kept."""
        ...

    async def embed(self, inputs: Sequence[list[int]]) -> np.ndarray:
        """float32 [len(inputs), dimensions]; runs off the event loop, batched with other requests' inputs."""
        ...

    async def close(self) -> None: ...
