"""Reading tool calls out of a constrained answer: the same calls, ids aside, however the text is split into
pieces, and text that is not a call passes through untouched."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from cheapest.engine.chat import TOOL_CALL_SEPARATOR, tool_call_text
from cheapest.gateway.tools import ToolCallParser

CALLS = [("get_weather", {"city": "Paris \"centre\"", "days": [1, 2]}), ("lookup", {}), ("f-2", {"q": "}\\n"})]
OUTPUT = TOOL_CALL_SEPARATOR.join(tool_call_text(name, args) for name, args in CALLS)


def _feed(text: str, cuts: list[int]) -> tuple[str, list[tuple[str, str]], list[tuple[int, str]]]:
    parser = ToolCallParser()
    shown, names, pieces = "", [], []
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        got, started, args = parser.push(text[a:b], final=i == len(bounds) - 2)
        shown += got
        names += [(call_id, name) for _, call_id, name in started]
        pieces += args
    assert [c.arguments for c in parser.calls] == ["".join(p for i, p in pieces if i == k) for k in range(len(names))]
    return shown, [(c.name, c.arguments) for c in parser.calls], pieces


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_calls_parse_the_same_however_the_text_is_split(cuts: list[int]) -> None:
    shown, calls, _ = _feed(OUTPUT, cuts)
    assert shown == ""
    assert [(name, json.loads(args)) for name, args in calls] == CALLS


@given(st.text(max_size=40).filter(lambda t: not t.startswith("<tool_call>\n")),
       st.lists(st.integers(min_value=0, max_value=100), max_size=6))
def test_free_text_passes_through(text: str, cuts: list[int]) -> None:
    shown, calls, _ = _feed(text, cuts)
    assert (shown, calls) == (text, [])


def test_a_call_cut_short_keeps_what_arrived() -> None:
    parser = ToolCallParser()
    parser.push(tool_call_text("f", {"a": "long value"})[:-25], final=True)
    assert [(c.name, c.arguments) for c in parser.calls] == [("f", '{"a": "l')]
    assert parser.calls[0].id.startswith("call_") and len(parser.calls[0].id) == 29
