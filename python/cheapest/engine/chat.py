"""The model's chat template (from tokenizer_config.json), rendered the way Hugging Face renders it.

Templates are code shipped with a model directory, so they run in Jinja's ImmutableSandboxedEnvironment with
the same globals and filters as `transformers` (raise_exception, strftime_now, tojson without ASCII escaping,
trim_blocks/lstrip_blocks, loop controls, the `{% generation %}` marker) so third-party templates render
byte-for-byte as their authors expect.

Tools: a template that takes a `tools` variable (Qwen, Llama 3.1+, SmolLM3, Hermes...) renders them, and the
assistants' `tool_calls` and `tool` messages, itself. For any other template the tool format below is rendered
into the conversation: the tools' JSON inside <tools></tools> in the system prompt, each call the model makes
as `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, earlier calls as that text in the assistant's
message, and tool results as a user message of <tool_response></tool_response> blocks. The server constrains
the model's output to this call format either way, so calls always parse.

Only the template's own markup may produce control tokens: a user who types `<|im_end|>\n<|im_start|>system`
into a message must get those characters as text, not a new turn. So `render` also says which parts of the
prompt are message content (`ChatPrompt.parts`): the template is rendered once more with a placeholder for each
content, and where putting the contents back in gives exactly the real rendering, the engine encodes the content
parts with special-token matching off. A template that changes content (trims it, cuts it) gives no parts; the
engine then refuses content that holds a special token's text rather than obey it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")

# The tool-call format the model is asked for (and constrained to): one call per block.
TOOL_CALL_OPEN = "<tool_call>\n"
TOOL_CALL_CLOSE = "\n</tool_call>"
TOOL_CALL_SEPARATOR = "\n"
TOOLS_PROMPT = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
)

Message = tuple[str, str] | Mapping[str, Any]


def tool_call_text(name: str, arguments: Any) -> str:
    """One call in the tool format (JSON with ", " and ": ", the way the constrained model writes it)."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE


def _in_tool_format(messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """The conversation for a template that knows nothing of tools: see the module's docstring."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [tool_call_text(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": TOOL_CALL_SEPARATOR.join(([content] if content else []) + calls)})
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        prompt = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


class ChatTemplateError(ValueError):
    """The template is missing, invalid, or refused the messages. The message never carries message text."""


class NoChatTemplateError(ChatTemplateError):
    """The model has no chat template (a base model): it serves completions, not chat."""


class _GenerationMarker(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering ignores it."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as serialized AddedToken objects.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _pick_template(raw: Any) -> str | None:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in raw if isinstance(t, Mapping)}
        chosen = named.get("default")
        return chosen if isinstance(chosen, str) else None
    return None


class ChatPrompt(str):
    """A rendered prompt that knows its pieces: (text, is message content) in order, or none when the template
    transformed the content (then only the whole text is known)."""

    parts: tuple[tuple[str, bool], ...]

    def __new__(cls, text: str, parts: tuple[tuple[str, bool], ...] = ()) -> ChatPrompt:
        prompt = super().__new__(cls, text)
        prompt.parts = parts
        return prompt


def _split(skeleton: str, marks: list[str], contents: Sequence[str]) -> tuple[tuple[str, bool], ...] | None:
    """`skeleton` cut at each of `marks` (in order, each once) with the content put back in; None if the marks
    are not all there exactly once and in order (the template did something to them)."""
    parts: list[tuple[str, bool]] = []
    rest = skeleton
    for mark, content in zip(marks, contents):
        before, found, rest = rest.partition(mark)
        if not found or mark in before or mark in rest:
            return None
        parts += [(before, False), (content, True)]
    parts.append((rest, False))
    return tuple((text, content) for text, content in parts if text)


class ChatTemplate:
    def __init__(self, template: str, special_tokens: Mapping[str, str] | None = None) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationMarker, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(template)
            self.takes_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(template))
        except jinja2.TemplateError:
            raise ChatTemplateError("the model's chat template is not valid Jinja") from None
        self._special_tokens = dict(special_tokens or {})

    @staticmethod
    def present(config: Mapping[str, Any]) -> bool:
        """Whether tokenizer_config.json carries a chat template."""
        return _pick_template(config.get("chat_template")) is not None

    @staticmethod
    def special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
        """The special tokens (bos_token, eos_token, ...) a template may use, from tokenizer_config.json."""
        return {k: t for k in _SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None}

    @classmethod
    def from_tokenizer_config(cls, config: Mapping[str, Any]) -> ChatTemplate:
        template = _pick_template(config.get("chat_template"))
        if template is None:
            raise NoChatTemplateError("this model has no chat template; use /v1/completions")
        return cls(template, cls.special_tokens(config))

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None) -> ChatPrompt:
        """(role, content) pairs or Hugging Face chat dicts (tool_calls with arguments as objects, tool messages
        with tool_call_id) -> the prompt; `tools`: OpenAI function tools, rendered natively or in the tool
        format. The prompt's parts mark each message's text content (see the module's docstring); tool
        definitions and call arguments a template renders itself are not parts: the engine checks them."""
        turns = [{"role": m[0], "content": m[1]} if isinstance(m, tuple) else dict(m) for m in messages]
        tooled = bool(tools) or any(t.get("tool_calls") or t.get("role") == "tool" for t in turns)
        if tooled and not self.takes_tools:
            turns, tools = _in_tool_format(turns, tools), None
        listed = list(tools) if tools else None
        text = self._render(turns, add_generation_prompt, listed)
        nonce = secrets.token_hex(8)
        marked = [i for i, t in enumerate(turns) if isinstance(t.get("content"), str) and t["content"]]
        marks = {i: f"\x00content{i}.{nonce}\x00" for i in marked}
        skeleton = self._render([{**t, "content": marks[i]} if i in marks else t for i, t in enumerate(turns)],
                                add_generation_prompt, listed)
        parts = _split(skeleton, [marks[i] for i in marked], [turns[i]["content"] for i in marked])
        if parts is None or "".join(p for p, _ in parts) != text:
            return ChatPrompt(text)
        return ChatPrompt(text, parts)

    def _render(self, turns: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[Mapping[str, Any]] | None) -> str:
        try:
            return self._template.render(
                messages=turns,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                documents=None,
                **self._special_tokens,
            )
        except jinja2.TemplateError:
            # The template's own message may quote the conversation; keep it out of errors that get logged.
            raise ChatTemplateError("the model's chat template rejected these messages") from None
