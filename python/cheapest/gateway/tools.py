"""Tool calling apart from the wire: the conversation in the chat template's terms, and the calls read back out
of the model's (grammar-constrained) output, whole or as they stream.

The output of a request with tools is free text, or calls in the tool format of engine/chat.py:

    <tool_call>\\n{"name": "NAME", "arguments": ARGUMENTS}\\n</tool_call>   (repeated, "\\n" between calls)

The grammar writes JSON with fixed separators and no raw newline, so a call's arguments end at the `}` before
the next newline; `ToolCallParser` reads the format incrementally and hands out the same events whether the
answer streams or not.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cheapest.api.chat import ChatMessage, Tool
from cheapest.engine.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_SEPARATOR

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_NAME_OPEN = '{"name": "'
_ARGS_OPEN = '", "arguments": '
_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def _arguments(text: str) -> Any:
    """An earlier call's arguments as the template wants them: the object, or the text if it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages -> Hugging Face chat dicts (what chat templates read)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        turn: dict[str, Any] = {"role": ROLES[m.role], "content": m.text()}
        if m.tool_calls:
            turn["tool_calls"] = [{"id": c.id, "type": "function",
                                   "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                  for c in m.tool_calls]
        if m.tool_call_id is not None:
            turn["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            turn["name"] = m.name
        out.append(turn)
    return out


def template_tools(tools: Sequence[Tool]) -> list[dict[str, Any]]:
    """Function tools as chat templates take them (OpenAI's own shape)."""
    out = []
    for t in tools:
        assert t.function is not None
        f: dict[str, Any] = {"name": t.function.name}
        if t.function.description is not None:
            f["description"] = t.function.description
        f["parameters"] = t.function.parameters or {"type": "object", "properties": {}}
        out.append({"type": "function", "function": f})
    return out


@dataclass
class ParsedCall:
    id: str
    name: str = ""
    arguments: str = ""


@dataclass
class ToolCallParser:
    """Free text or tool calls, read incrementally. `push` returns (text, calls started, argument pieces) since
    the last push: calls as (index, id, name), pieces as (index, text)."""

    text: str = ""
    calls: list[ParsedCall] = field(default_factory=list)
    _buf: str = ""
    _mode: str = "undecided"  # "text" once the output is free text, "calls" once it opened a call
    _pos: int = 0  # in calls mode: where parsing stands in _buf
    _state: str = "open"  # open -> name -> args -> close -> (separator) open ...
    _sent: int = 0  # arguments characters of the current call handed out

    def push(self, piece: str, final: bool = False) -> tuple[str, list[tuple[int, str, str]], list[tuple[int, str]]]:
        self._buf += piece
        if self._mode == "undecided":
            if self._buf.startswith(TOOL_CALL_OPEN):
                self._mode = "calls"
            elif TOOL_CALL_OPEN.startswith(self._buf) and not final:
                return "", [], []
            else:
                self._mode = "text"
        if self._mode == "text":
            out, self._buf = self._buf, ""
            self.text += out
            return out, [], []
        return "", *self._parse(final)

    def _parse(self, final: bool) -> tuple[list[tuple[int, str, str]], list[tuple[int, str]]]:
        started: list[tuple[int, str, str]] = []
        pieces: list[tuple[int, str]] = []
        buf = self._buf
        while True:
            if self._state == "open" and not self._skip(TOOL_CALL_OPEN + _NAME_OPEN, "name"):
                break
            if self._state == "name":
                end = buf.find('"', self._pos)
                if end < 0 or len(buf) < end + len(_ARGS_OPEN):
                    break
                call = ParsedCall(new_call_id(), buf[self._pos:end])
                self.calls.append(call)
                started.append((len(self.calls) - 1, call.id, call.name))
                self._pos, self._sent, self._state = end + len(_ARGS_OPEN), 0, "args"
            if self._state == "args":
                call = self.calls[-1]
                end = buf.find("\n", self._pos)
                # The call's closing brace follows the arguments: hold back the last character until it is known.
                upto = end - 1 if end >= 0 else (len(buf) if final else len(buf) - 1)
                if upto > self._pos + self._sent:
                    more = buf[self._pos + self._sent:upto]
                    call.arguments += more
                    self._sent += len(more)
                    pieces.append((len(self.calls) - 1, more))
                if end < 0:
                    break
                self._pos, self._state = end, "close"
            if self._state == "close" and not self._skip(TOOL_CALL_CLOSE + TOOL_CALL_SEPARATOR, "open"):
                break
        return started, pieces

    def _skip(self, literal: str, then: str) -> bool:
        """Past `literal` (the format guarantees it is there) once it has all arrived."""
        if len(self._buf) - self._pos < len(literal):
            return False
        self._pos += len(literal)
        self._state = then
        return True
