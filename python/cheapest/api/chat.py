"""POST /v1/chat/completions: every field of OpenAI's request, and the response and stream chunk types.

Fields the service cannot honour are typed loosely (any JSON) so that decoding never hides them: the gateway
refuses each by name when it is set (gateway/parameters.py). Unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from cheapest.api.common import ResponseHead, Usage

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
MaxTokens = Annotated[int, Meta(ge=1)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
# Stop strings: at most 4 (OpenAI's bound) of at most 256 characters (the engine's matcher allows 16 x 256).
StopString = Annotated[str, Meta(max_length=256)]
Stop = StopString | Annotated[list[StopString], Meta(max_length=4)]
Seed = Annotated[int, Meta(ge=0)]  # and at most MAX_SEED (msgspec bounds stop at int64: checked by the gateway)
MAX_SEED = 2**64 - 1  # the sampler's generator takes an unsigned 64-bit seed
FunctionName = Annotated[str, Meta(pattern="^[a-zA-Z0-9_-]{1,64}$")]
Choices = Annotated[int, Meta(ge=1, le=128)]


class TextPart(msgspec.Struct, frozen=True):
    type: Literal["text"]
    text: str


class FunctionCall(msgspec.Struct, frozen=True):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(msgspec.Struct, frozen=True):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    function_call: Any = None  # the deprecated functions API: refused by name
    audio: Any = None  # refused by name

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # only false (no obfuscation field) is honoured


class FunctionDefinition(msgspec.Struct, frozen=True, kw_only=True):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema; none = no arguments
    strict: bool | None = None


class Tool(msgspec.Struct, frozen=True, kw_only=True):
    type: str  # "function"; other kinds ("custom") are refused by name
    function: FunctionDefinition | None = None
    custom: Any = None


class NamedFunction(msgspec.Struct, frozen=True):
    name: str


class AllowedTools(msgspec.Struct, frozen=True):
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]


class ToolChoiceObject(msgspec.Struct, frozen=True, kw_only=True):
    type: str  # "function" (a named function) or "allowed_tools"; "custom" is refused by name
    function: NamedFunction | None = None
    allowed_tools: AllowedTools | None = None
    custom: Any = None


class JsonSchemaFormat(msgspec.Struct, frozen=True, kw_only=True):
    name: Annotated[str, Meta(pattern="^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    schema: dict[str, Any] | None = None  # none: any JSON object
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class GenerationRequest(msgspec.Struct, frozen=True, kw_only=True):
    """The fields chat and text completions share. Unknown fields are ignored, as OpenAI does."""

    model: str
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Choices | None = None
    user: str | None = None  # accepted; never logged or stored
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]] | None = None


class ChatCompletionRequest(GenerationRequest, frozen=True, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceObject | None = None
    parallel_tool_calls: bool | None = None
    service_tier: str | None = None  # "auto" / "default" are served; others refused by name
    store: bool | None = None  # nothing is stored: true is refused
    modalities: list[str] | None = None  # ["text"] only
    reasoning_effort: str | None = None  # "none" only: the models do not reason
    safety_identifier: str | None = None  # accepted; never logged or stored
    prompt_cache_key: str | None = None  # accepted; prompts are never cached between requests
    prompt_cache_retention: str | None = None  # "in_memory" only: prompts are kept for the request alone
    # Asked for, but not something this service does: refused by name when set.
    audio: Any = None
    functions: Any = None
    function_call: Any = None
    metadata: Any = None
    moderation: Any = None
    prediction: Any = None
    prompt_cache_options: Any = None
    verbosity: Any = None
    web_search_options: Any = None


# --- responses --------------------------------------------------------------------------------------------------


class TopLogprob(msgspec.Struct, frozen=True):
    token: str
    logprob: float
    bytes: list[int]


class ContentLogprob(msgspec.Struct, frozen=True):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct, frozen=True):
    content: list[ContentLogprob] | None
    refusal: None = None


class AssistantMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None
    refusal: None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(msgspec.Struct, frozen=True):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(ResponseHead, frozen=True):
    choices: list[ChatChoice]
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"
    service_tier: str = "default"
    system_fingerprint: str | None = None


class FunctionCallDelta(msgspec.Struct, frozen=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct, frozen=True, omit_defaults=True):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class ChunkDelta(msgspec.Struct, frozen=True, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(msgspec.Struct, frozen=True):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(ResponseHead, frozen=True):
    choices: list[ChunkChoice]
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    usage: Usage | None = None
    service_tier: str = "default"
