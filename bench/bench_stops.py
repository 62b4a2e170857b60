"""Stop strings over one streamed completion: cheapest_core.StopMatcher (the engine's) vs StopText, the Python
matcher the engine used before it (kept here as the peer).

    make bench   (or: .venv/bin/python -m pytest bench/bench_stops.py --benchmark-enable)
    .venv/bin/python bench/bench_stops.py [--repeat 5]     # medians and ratios as a table

One measured call streams a whole completion, one push per token, and flushes. Three cases:
- crafted: four 256-character stops (the most the core allows) that keep 255 characters withheld and
  make the Python matcher test every prefix length of three of them at every token; 256 and 1,024
  tokens of "a" (issue 11: such stops made a 1,024-token completion take seconds);
- chat: the two stops a chat client typically sends, over 1,024 tokens of ordinary text.
The table also times the Python matcher alone on four 1,101-character stops (more than the core
allows) over 256 and 1,024 tokens: without bounds its cost per token grows with the output.
Goal (issue 11): linear time whatever the stops, i.e. the crafted case per token independent of the
length; and no slower than Python on the ordinary case.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import pytest

from cheapest_core import StopMatcher


class StopText:
    """The engine's former matcher: withholds anything that might start a stop string, re-scanning the held
    text for every stop at each push (quadratic in a stop's length per token)."""

    __slots__ = ("_stops", "_held")

    def __init__(self, stops: list[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        text = self._held + text
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return text[:cut], True
        keep = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), keep, -1):  # longest suffix that starts `stop`
                if text.endswith(stop[:n]):
                    keep = n
                    break
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


A = "a" * 255
# In this order the Python matcher's search for the withheld suffix is longest.
CRAFTED = ["b" + A, "c" + A, "d" + A, A + "z"]
# Stops longer than the completion (the core refuses them): how the Python matcher grows without bounds.
UNBOUNDED = ["b" + "a" * 1100, "c" + "a" * 1100, "d" + "a" * 1100, "a" * 1100 + "z"]
WORDS = "the quick brown fox jumps over a lazy dog while User asks for more text".split()
CASES: dict[str, tuple[list[str], list[str]]] = {
    "crafted-256": (CRAFTED, ["a"] * 256),
    "crafted-1024": (CRAFTED, ["a"] * 1024),
    "chat-1024": (["\n\nUser:", "<|im_end|>"], [" " + WORDS[i % len(WORDS)] for i in range(1024)]),
}
PEERS: dict[str, Callable[[list[str]], StopMatcher | StopText]] = {"core": StopMatcher, "python": StopText}


def stream(make: Callable[[list[str]], StopMatcher | StopText], stops: list[str], tokens: list[str]) -> str:
    matcher = make(stops)
    out = []
    for token in tokens:
        text, stopped = matcher.push(token)
        out.append(text)
        if stopped:
            return "".join(out)
    out.append(matcher.flush())
    return "".join(out)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("peer", list(PEERS))
def test_stream_one_completion(benchmark, peer: str, case: str) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"stops: one completion, {case}"
    stops, tokens = CASES[case]
    out = benchmark(stream, PEERS[peer], stops, tokens)
    assert out == stream(StopText, stops, tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"{'case':<14} {'core ms':>10} {'python ms':>10} {'python/core':>12}")
    for case, (stops, tokens) in CASES.items():
        medians = {}
        for peer, make in PEERS.items():
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                stream(make, stops, tokens)
                times.append(time.perf_counter() - start)
            medians[peer] = statistics.median(times) * 1e3
        print(f"{case:<14} {medians['core']:>10.3f} {medians['python']:>10.3f} {medians['python'] / medians['core']:>11.0f}x")
    for n in (256, 1024):
        times = []
        for _ in range(max(1, args.repeat // 2)):
            start = time.perf_counter()
            stream(StopText, UNBOUNDED, ["a"] * n)
            times.append(time.perf_counter() - start)
        print(f"{'unbounded-' + str(n):<14} {'refused':>10} {statistics.median(times) * 1e3:>10.1f}")


if __name__ == "__main__":
    main()
