"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, its requests, responses, errors
and stream events.

Content blocks of every kind decode into one `ContentBlock`, so that a kind the service does not serve (images,
documents, thinking, server tools) reaches the gateway, which refuses it by name rather than ignore it. Unknown
fields are ignored, as Anthropic does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

StopSequence = Annotated[str, Meta(max_length=256)]


class ContentBlock(msgspec.Struct, frozen=True, kw_only=True):
    """A request content block, any kind: text, tool_use (an assistant's call), tool_result (a user's answer to
    one). Other kinds (image, document, thinking, server tools...) are refused by name by the gateway."""

    type: str
    text: str | None = None  # text
    id: str | None = None  # tool_use
    name: str | None = None  # tool_use
    input: dict[str, Any] | None = None  # tool_use
    tool_use_id: str | None = None  # tool_result
    content: str | list[ContentBlock] | None = None  # tool_result: text or text blocks
    is_error: bool | None = None  # tool_result
    cache_control: Any = None  # accepted: nothing is cached (usage reports 0 cache tokens)
    citations: Any = None  # refused when set

    def result_text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(b.text or "" for b in self.content)


class MessageParam(msgspec.Struct, frozen=True):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class ToolParam(msgspec.Struct, frozen=True, kw_only=True):
    name: Annotated[str, Meta(pattern="^[a-zA-Z0-9_-]{1,64}$")]
    input_schema: dict[str, Any]
    description: str | None = None
    type: str | None = None  # "custom" or absent; server tools (web_search, bash...) are refused by name
    cache_control: Any = None
    strict: bool | None = None


class ToolChoice(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class OutputFormat(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["json_schema"]
    schema: dict[str, Any]


class OutputConfig(msgspec.Struct, frozen=True, kw_only=True):
    format: OutputFormat | None = None
    effort: Any = None  # refused when set: the models here do not reason


class Metadata(msgspec.Struct, frozen=True):
    user_id: str | None = None  # accepted; never logged or stored


class ThinkingConfig(msgspec.Struct, frozen=True, kw_only=True):
    type: str  # "disabled" is honoured (the models never think); anything else is refused


class CountTokensRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    messages: Annotated[list[MessageParam], Meta(min_length=1)]
    system: str | list[ContentBlock] | None = None  # text blocks
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    cache_control: Any = None  # accepted: nothing is cached
    # Refused when set.
    speed: Any = None
    user_profile_id: Any = None
    workspace_id: Any = None


class MessagesRequest(CountTokensRequest, frozen=True, kw_only=True):
    max_tokens: Annotated[int, Meta(ge=1)]
    stop_sequences: Annotated[list[StopSequence], Meta(max_length=16)] | None = None  # the engine's matcher's bounds
    stream: bool | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None  # one tier, standard, serves both
    container: Any = None
    diagnostics: Any = None
    inference_geo: Any = None


# --- responses --------------------------------------------------------------------------------------------------


class TextContent(msgspec.Struct, frozen=True, tag="text", tag_field="type"):
    text: str


class ToolUseContent(msgspec.Struct, frozen=True, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: dict[str, Any]


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class MessageUsage(msgspec.Struct, frozen=True):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    service_tier: str = "standard"


class Message(msgspec.Struct, frozen=True):
    id: str
    model: str
    content: list[TextContent | ToolUseContent]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: MessageUsage
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"


class TokenCount(msgspec.Struct, frozen=True):
    input_tokens: int


class AnthropicErrorDetail(msgspec.Struct, frozen=True):
    type: str
    message: str


class AnthropicError(msgspec.Struct, frozen=True):
    """Anthropic's error shape, for every 4xx/5xx of these routes."""

    error: AnthropicErrorDetail
    type: Literal["error"] = "error"


# Stream events: the event's name is its `type` tag.


class _Event(msgspec.Struct, frozen=True, tag_field="type"):
    pass


class MessageStart(_Event, frozen=True, tag="message_start"):
    message: Message


class ContentBlockStart(_Event, frozen=True, tag="content_block_start"):
    index: int
    content_block: TextContent | ToolUseContent


class BlockDelta(msgspec.Struct, frozen=True, omit_defaults=True):
    """`text_delta` (text) or `input_json_delta` (a piece of a tool_use block's input JSON)."""

    type: Literal["text_delta", "input_json_delta"]
    text: str | None = None
    partial_json: str | None = None


class ContentBlockDelta(_Event, frozen=True, tag="content_block_delta"):
    index: int
    delta: BlockDelta


class ContentBlockStop(_Event, frozen=True, tag="content_block_stop"):
    index: int


class StopDelta(msgspec.Struct, frozen=True):
    stop_reason: StopReason | None
    stop_sequence: str | None


class DeltaUsage(msgspec.Struct, frozen=True):
    output_tokens: int


class MessageDelta(_Event, frozen=True, tag="message_delta"):
    delta: StopDelta
    usage: DeltaUsage


class MessageStop(_Event, frozen=True, tag="message_stop"):
    pass


class Ping(_Event, frozen=True, tag="ping"):
    pass


StreamEvent = MessageStart | ContentBlockStart | ContentBlockDelta | ContentBlockStop | MessageDelta | MessageStop | Ping
