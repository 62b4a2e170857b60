"""Anthropic's Messages API on the same generation path: a Messages request becomes the chat request it means
(system prompt, text, tool_use and tool_result blocks, tools, tool_choice, output_config.format, sampling), so
one `Plan` - the same grammar engine, the same admission, metering and privacy - serves both APIs. Fields the
service does not do are refused by name; refusals name Anthropic's fields, never OpenAI's.
"""

from __future__ import annotations

import json
from typing import Literal

import msgspec

from cheapest.api.anthropic import ContentBlock, CountTokensRequest, MessagesRequest, StopReason
from cheapest.api.chat import (
    ChatCompletionRequest, ChatMessage, FunctionCall, FunctionDefinition, JsonSchemaFormat, NamedFunction,
    ResponseFormat, Tool, ToolCall, ToolChoiceObject,
)
from cheapest.engine.types import Engine, FinishReason
from cheapest.gateway.completions import Plan, plan
from cheapest.gateway.errors import Refusal
from cheapest.gateway.parameters import unsupported

# OpenAI's names in refusals -> the Messages API's.
_PARAMS = {"response_format": "output_config.format", "stop": "stop_sequences", "max_tokens": "max_tokens",
           "tool_choice": "tool_choice", "tools": "tools", "messages": "messages"}
_CHOICES: dict[str, Literal["none", "auto", "required"]] = {"auto": "auto", "any": "required", "none": "none"}
_NEVER = {
    "speed": "one speed is served", "user_profile_id": "user profiles are not available",
    "workspace_id": "workspaces are not available", "container": "code execution containers are not available",
    "diagnostics": "diagnostics are not offered", "inference_geo": "inference runs where this service runs",
}


def _check(request: CountTokensRequest) -> None:
    for name, why in _NEVER.items():
        if getattr(request, name, None) is not None:
            raise unsupported(name, why)
    if request.thinking is not None and request.thinking.type != "disabled":
        raise unsupported("thinking", "the models here do not think before answering")
    if request.output_config is not None and request.output_config.effort is not None:
        raise unsupported("output_config.effort", "the models here do not reason")
    for i, tool in enumerate(request.tools or ()):
        if tool.type not in (None, "custom"):
            raise unsupported(f"tools[{i}].type", "server tools are not available; define custom tools")


def _blocks(content: str | list[ContentBlock], where: str) -> list[ContentBlock]:
    if isinstance(content, str):
        return [ContentBlock(type="text", text=content)]
    for j, block in enumerate(content):
        if block.type not in ("text", "tool_use", "tool_result"):
            raise unsupported(f"{where}[{j}].type", "only text, tool_use and tool_result blocks are served")
        if block.citations is not None:
            raise unsupported(f"{where}[{j}].citations", "citations are not available")
    return content


def _invalid(message: str, param: str) -> Refusal:
    return Refusal("invalid_request", message, param=param, code="invalid_value")


def chat_request(request: CountTokensRequest) -> ChatCompletionRequest:
    """The chat request a Messages request means (its OpenAI fields are not validated again: msgspec's
    constructors do not check constraints, the Messages types did)."""
    _check(request)
    messages: list[ChatMessage] = []
    if request.system is not None:
        system = _blocks(request.system, "system")
        messages.append(ChatMessage(role="system", content="".join(b.text or "" for b in system)))
    for i, m in enumerate(request.messages):
        blocks = _blocks(m.content, f"messages[{i}].content")
        text = "".join(b.text or "" for b in blocks if b.type == "text")
        if m.role == "assistant":
            calls = [ToolCall(b.id or "", FunctionCall(b.name or "", json.dumps(b.input or {}, ensure_ascii=False)))
                     for b in blocks if b.type == "tool_use"]
            messages.append(ChatMessage(role="assistant", content=text, tool_calls=calls or None))
            continue
        for b in blocks:  # tool results answer the previous turn's calls, before the user's text
            if b.type == "tool_result":
                result = b.result_text()
                messages.append(ChatMessage(role="tool", tool_call_id=b.tool_use_id,
                                            content=f"Error: {result}" if b.is_error else result))
        if text or not any(b.type == "tool_result" for b in blocks):
            messages.append(ChatMessage(role="user", content=text))
    tools = [Tool(type="function", function=FunctionDefinition(name=t.name, description=t.description,
                                                                 parameters=t.input_schema))
             for t in request.tools or ()] or None
    choice = request.tool_choice
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceObject | None = None
    parallel = None
    if choice is not None and tools:
        parallel = False if choice.disable_parallel_tool_use else None
        if choice.type == "tool":
            if not choice.name:
                raise _invalid("`tool_choice.name` is required when its type is `tool`.", "tool_choice")
            tool_choice = ToolChoiceObject(type="function", function=NamedFunction(choice.name))
        else:
            tool_choice = _CHOICES[choice.type]
    fmt = request.output_config.format if request.output_config is not None else None
    response_format = None if fmt is None else \
        ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(name="output", schema=fmt.schema))
    if isinstance(request, MessagesRequest):
        return ChatCompletionRequest(
            model=request.model, messages=messages, max_tokens=request.max_tokens, temperature=request.temperature,
            top_p=request.top_p, stop=request.stop_sequences, tools=tools, tool_choice=tool_choice,
            parallel_tool_calls=parallel, response_format=response_format)
    return ChatCompletionRequest(model=request.model, messages=messages, tools=tools, tool_choice=tool_choice,
                                 parallel_tool_calls=parallel, response_format=response_format)


def _renamed(refusal: Refusal) -> Refusal:
    param = refusal.param
    if param is None or param not in _PARAMS or _PARAMS[param] == param:
        return refusal
    refusal.message = refusal.message.replace(f"`{param}`", f"`{_PARAMS[param]}`")
    refusal.param = _PARAMS[param]
    return refusal


def needs_grammar(request: CountTokensRequest) -> bool:
    """Whether planning the request compiles a grammar: await the engine's `grammar_ready()` first."""
    return bool(request.tools) or (request.output_config is not None and request.output_config.format is not None)


def message_plan(engine: Engine, request: CountTokensRequest, default_max_tokens: int) -> Plan:
    """The generation a Messages request asks for (a count_tokens request: its prompt alone)."""
    try:
        chat = chat_request(request)
        out = plan(engine, chat, default_max_tokens, 1)
    except Refusal as refusal:
        raise _renamed(refusal) from None
    if isinstance(request, MessagesRequest) and request.top_k:
        out.params = msgspec.structs.replace(out.params, top_k=request.top_k)
    return out


def stop_reason(reason: FinishReason, stop: str | None, tool_calls: bool) -> StopReason:
    if reason == "length":
        return "max_tokens"
    if tool_calls:
        return "tool_use"
    return "stop_sequence" if stop is not None else "end_turn"
