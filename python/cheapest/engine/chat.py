"""The model's chat template (from tokenizer_config.json), rendered the way Hugging Face renders it.

Templates are code shipped with a model directory, so they run in Jinja's ImmutableSandboxedEnvironment with
the same globals and filters as `transformers` (raise_exception, strftime_now, tojson without ASCII escaping,
trim_blocks/lstrip_blocks, loop controls, the `{% generation %}` marker) so third-party templates render
byte-for-byte as their authors expect.

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
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


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

    def render(self, messages: Sequence[tuple[str, str]], *, add_generation_prompt: bool = True) -> ChatPrompt:
        text = self._render(messages, add_generation_prompt)
        nonce = secrets.token_hex(8)
        marks = [f"\x00content{i}.{nonce}\x00" for i in range(len(messages))]
        skeleton = self._render([(role, mark) for (role, _), mark in zip(messages, marks)], add_generation_prompt)
        parts = _split(skeleton, marks, [content for _, content in messages])
        if parts is None or "".join(p for p, _ in parts) != text:
            return ChatPrompt(text)
        return ChatPrompt(text, parts)

    def _render(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=[{"role": role, "content": content} for role, content in messages],
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self._special_tokens,
            )
        except jinja2.TemplateError:
            # The template's own message may quote the conversation; keep it out of errors that get logged.
            raise ChatTemplateError("the model's chat template rejected these messages") from None
