"""What a request's output must look like, as one llguidance grammar: `response_format` (one JSON object, or
one that validates against a JSON Schema) and, with tools, free text or tool calls as `tool_choice` allows.

The grammar is Lark with the schemas embedded (`%json {...}`); JSON is written with fixed separators (", " and
": ", no newlines), so the tool-call parser (gateway/tools.py) knows exactly where arguments end. A grammar the
engine cannot compile is a 400 naming the field it came from; its message never quotes the schema.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from cheapest.engine.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_SEPARATOR
from cheapest.engine.types import Engine, Grammar, GrammarError
from cheapest.gateway.errors import Refusal

# llguidance's JSON options: no free whitespace (a small model can otherwise write newlines until max_tokens),
# the separators most models were trained on.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT: dict[str, Any] = {"type": "object"}
NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
# Free text that does not start a tool call (llguidance's `&` and `~` on lexemes).
_TEXT = 'TEXT: /(.|\\n)*/ & ~/' + TOOL_CALL_OPEN.replace("\n", "\\n") + '(.|\\n)*/'


def _lark_string(text: str) -> str:
    return json.dumps(text)


def _json_rule(name: str, schema: dict[str, Any]) -> str:
    styled = {**schema, "x-guidance": {**JSON_STYLE, **(schema.get("x-guidance") or {})}}
    return f"{name}: %json {json.dumps(styled, ensure_ascii=False)}"


def response_grammar(kind: str, schema: dict[str, Any] | None) -> list[str] | None:
    """Lark rules (the first defines `answer`) for a response_format; None for free text."""
    if kind == "text":
        return None
    if kind == "json_object":
        return [_json_rule("answer", ANY_OBJECT)]
    return [_json_rule("answer", schema if schema is not None else ANY_OBJECT)]


def call_schema(name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """One call's JSON: the function's name, then arguments that validate against its parameters."""
    return {"type": "object", "properties": {"name": {"const": name},
                                             "arguments": parameters if parameters else NO_ARGUMENTS},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_grammar(functions: Sequence[tuple[str, dict[str, Any] | None]], *, required: bool, parallel: bool,
                 answer: list[str] | None) -> str:
    """Free text (or the response_format's answer) OR tool calls; only calls when `required`."""
    rules = [_json_rule(f"f{i}", call_schema(name, params)) for i, (name, params) in enumerate(functions)]
    one = f"call: {_lark_string(TOOL_CALL_OPEN)} ({' | '.join(f'f{i}' for i in range(len(functions)))}) " \
          f"{_lark_string(TOOL_CALL_CLOSE)}"
    calls = f"calls: call ({_lark_string(TOOL_CALL_SEPARATOR)} call)*" if parallel else "calls: call"
    if required:
        start = "start: calls"
    elif answer is not None:
        start = "start: answer | calls"
        rules += answer
    else:
        start = "start: TEXT | calls"
        rules.append(_TEXT)
    return "\n".join([start, calls, one, *rules])


def answer_grammar(answer: list[str]) -> str:
    return "\n".join(["start: answer", *answer])


def text_grammar() -> str:
    """Free text that never starts a tool call (tool_choice "none" with tools in the prompt)."""
    return "start: TEXT\n" + _TEXT


def compile_for(engine: Engine, grammar: str, param: str) -> Grammar:
    try:
        return engine.compile_grammar(grammar)
    except GrammarError:
        what = "JSON schema" if param == "response_format" else "function parameters' JSON Schema"
        raise Refusal("invalid_request", f"The {what} in `{param}` uses a feature the grammar engine does not "
                      "support, or is not a valid schema.", param=param, code="invalid_schema") from None
