"""Stop strings over streamed text (cheapest_core.StopMatcher, stops.rs) against the definition."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cheapest_core import StopMatcher, StopStringError


def naive(stops: list[str], pieces: list[str]) -> list[tuple[str, bool] | str]:
    """The definition, the obvious way, over a whole stream: what each push returns, then flush. Each
    push emits the held text plus the piece, up to the earliest stop in it (and then starts afresh),
    or withholding its longest suffix that is a proper prefix of a stop."""
    stops = [s for s in stops if s]
    answers: list[tuple[str, bool] | str] = []
    held = ""
    for piece in pieces:
        text, held = held + piece, ""
        starts = [i for i in (text.find(s) for s in stops) if i >= 0]
        if starts:
            answers.append((text[: min(starts)], True))
            continue
        prefixes = [n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])]
        cut = len(text) - max(prefixes, default=0)
        text, held = text[:cut], text[cut:]
        answers.append((text, False))
    answers.append(held)
    return answers


def run(matcher: StopMatcher, pieces: list[str]) -> list[tuple[str, bool] | str]:
    out: list[tuple[str, bool] | str] = [matcher.push(p) for p in pieces]
    out.append(matcher.flush())
    return out


def test_withholds_a_possible_stop_and_drops_everything_from_the_earliest_stop() -> None:
    m = StopMatcher(["\n\nUser:", "END"])
    assert m.push("Hello") == ("Hello", False)
    assert m.push(" world\n") == (" world", False)
    assert m.push("\nUs") == ("", False)
    assert m.push("ed to") == ("\n\nUsed to", False)
    assert m.push(" the E") == (" the ", False)
    assert m.push("Xtra END! more") == ("EXtra ", True)
    assert m.flush() == ""
    # After a stop the matcher starts afresh; without stops it passes text through.
    assert m.push("EN") == ("", False) and m.flush() == "EN"
    assert StopMatcher([]).push("anything") == ("anything", False)
    assert StopMatcher(["", ""]).push("x") == ("x", False)


def test_the_stop_that_starts_first_wins_among_those_complete_in_one_push() -> None:
    assert StopMatcher(["abcd", "bc"]).push("xabcd") == ("x", True)
    m = StopMatcher(["abcd", "bc"])
    assert m.push("xab") == ("x", False)
    assert m.push("c") == ("a", True)  # "bc" is complete now; "abcd" might have been, later


def test_bounds_are_refused_without_quoting_the_stop() -> None:
    assert (StopMatcher.MAX_STOPS, StopMatcher.MAX_STOP_CHARS) == (16, 256)
    with pytest.raises(StopStringError, match="at most 16 stop strings"):
        StopMatcher(["x"] * 17)
    secret = "canary-" + "秘" * 300
    with pytest.raises(StopStringError) as err:
        StopMatcher(["ok", secret])
    assert isinstance(err.value, ValueError)
    assert "canary" not in str(err.value) and "秘" not in str(err.value)
    assert "stop string 1 is 307 characters" in str(err.value)
    StopMatcher(["秘" * 256] * 16)  # the largest allowed: 16 x 1,024 bytes
    with pytest.raises(StopStringError, match="not valid Unicode") as err:
        StopMatcher(["ok", "canary\ud800"])
    assert "canary" not in str(err.value)
    with pytest.raises(StopStringError, match="text is not valid Unicode"):
        StopMatcher(["a"]).push("\udfff")
    with pytest.raises(TypeError):
        StopMatcher("abc")  # type: ignore[arg-type]  # a str is one stop, not three


# Stops drawn from a tiny alphabet overlap and prefix each other all the time; the wider one
# brings multi-byte UTF-8 (2, 3 and 4 bytes) and characters the stops share bytes with.
TINY = st.sampled_from("ab")
WIDE = st.sampled_from("ab\né日🙂\u2028 ")


@st.composite
def streams(draw: st.DrawFn, alphabet: st.SearchStrategy[str]) -> tuple[list[str], list[str]]:
    stops = draw(st.lists(st.text(alphabet, min_size=0, max_size=6), max_size=5))
    text = draw(st.text(alphabet, max_size=60))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=20)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    return stops, pieces


@settings(max_examples=600, deadline=None)
@given(case=st.one_of(streams(TINY), streams(WIDE)))
def test_equals_the_definition_for_any_stops_and_any_split(case: tuple[list[str], list[str]]) -> None:
    stops, pieces = case
    assert run(StopMatcher(stops), pieces) == naive(stops, pieces)


@settings(max_examples=200, deadline=None)
@given(stops=st.lists(st.text(max_size=8), max_size=4), pieces=st.lists(st.text(max_size=12), max_size=12))
def test_equals_the_definition_on_arbitrary_unicode(stops: list[str], pieces: list[str]) -> None:
    stops = [s for s in stops if not any(0xD800 <= ord(c) <= 0xDFFF for c in s)]
    pieces = [p for p in pieces if not any(0xD800 <= ord(c) <= 0xDFFF for c in p)]
    assert run(StopMatcher(stops), pieces) == naive(stops, pieces)
