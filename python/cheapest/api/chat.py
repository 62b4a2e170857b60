"""POST /v1/chat/completions."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from cheapest.api.common import Usage

Role = Literal["system", "developer", "user", "assistant"]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
MaxTokens = Annotated[int, Meta(ge=1)]
# Stop strings: at most 4 (OpenAI's bound) of at most 256 characters (the engine's matcher allows 16 x 256).
StopString = Annotated[str, Meta(max_length=256)]
Stop = StopString | Annotated[list[StopString], Meta(max_length=4)]
Seed = Annotated[int, Meta(ge=0)]  # and at most MAX_SEED (msgspec bounds stop at int64: checked by the gateway)
MAX_SEED = 2**64 - 1  # the sampler's generator takes an unsigned 64-bit seed


class TextPart(msgspec.Struct, frozen=True):
    type: Literal["text"]
    text: str


class ChatMessage(msgspec.Struct, frozen=True):
    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


class GenerationRequest(msgspec.Struct, frozen=True, kw_only=True):
    """The fields chat and text completions share. Unknown fields are ignored, as OpenAI does."""

    model: str
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None


class ChatCompletionRequest(GenerationRequest, frozen=True, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None


class AssistantMessage(msgspec.Struct, frozen=True):
    role: Literal["assistant"]
    content: str


class ChatChoice(msgspec.Struct, frozen=True):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(msgspec.Struct, frozen=True):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"
