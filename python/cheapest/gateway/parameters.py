"""Every request field is honoured or refused by name: the fields (and values) of OpenAI's chat and text
completion requests this service does not do, each refused with a 400 `unsupported_parameter` that names it and
says why. Fields not listed here are honoured (gateway/completions.py); unknown fields are ignored, as OpenAI
does.
"""

from __future__ import annotations

from typing import Any

from cheapest.api.chat import ChatCompletionRequest
from cheapest.api.completions import CompletionRequest
from cheapest.gateway.errors import Refusal

# Fields refused whenever they are set (not null), and why.
_NEVER: dict[str, str] = {
    "audio": "audio output is not available; the models here write text",
    "functions": "the deprecated `functions` API is not served; use `tools`",
    "function_call": "the deprecated `function_call` is not served; use `tool_choice`",
    "metadata": "`metadata` tags stored completions, and no completion is ever stored here",
    "moderation": "moderation is not offered",
    "prediction": "predicted outputs are not supported",
    "prompt_cache_options": "prompts are never cached between requests, so there are no cache breakpoints",
    "verbosity": "`verbosity` applies to reasoning models only",
    "web_search_options": "web search is not available; nothing leaves the inference servers",
    "suffix": "the models here do not fill in the middle",
}


def unsupported(param: str, why: str) -> Refusal:
    return Refusal("invalid_request", f"`{param}` is not supported: {why}.", param=param,
                   code="unsupported_parameter")


def _allowed(param: str, value: Any, allowed: tuple[Any, ...], why: str) -> None:
    if value is not None and value not in allowed:
        raise unsupported(param, why)


def check_supported(request: ChatCompletionRequest | CompletionRequest) -> None:
    """Refuse, by name, the first field whose value asks for something the service does not do."""
    for name, why in _NEVER.items():
        if getattr(request, name, None) is not None:
            raise unsupported(name, why)
    options = request.stream_options
    if options is not None and options.include_obfuscation:
        raise unsupported("stream_options.include_obfuscation", "streams are not padded; send false or omit it")
    if isinstance(request, CompletionRequest):
        return
    _allowed("service_tier", request.service_tier, ("auto", "default"), "one tier is served, `default`")
    _allowed("store", request.store, (False,), "completions are never stored")
    _allowed("reasoning_effort", request.reasoning_effort, ("none",), "the models here do not reason")
    _allowed("prompt_cache_retention", request.prompt_cache_retention, ("in_memory",),
             "prompts are kept in memory for the request alone")
    if request.modalities is not None and set(request.modalities) - {"text"}:
        raise unsupported("modalities", "the models here write text only")
    for i, message in enumerate(request.messages):
        if message.role == "function" or message.function_call is not None:
            raise unsupported(f"messages[{i}].function_call" if message.function_call is not None
                              else f"messages[{i}].role", "the deprecated functions API is not served; use tools")
        if message.audio is not None:
            raise unsupported(f"messages[{i}].audio", "audio is not available")
    for i, tool in enumerate(request.tools or ()):
        if tool.type != "function" or tool.function is None:
            raise unsupported(f"tools[{i}].type", "only function tools are served")
    choice = request.tool_choice
    if choice is not None and not isinstance(choice, str) and choice.type not in ("function", "allowed_tools"):
        raise unsupported("tool_choice.type", "only function tools are served")
