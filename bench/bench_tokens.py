"""Token counting: cheapest_core.Tokenizer vs the `tokenizers` package and tiktoken, same vocabulary.

    make bench   (or: .venv/bin/python -m pytest bench/bench_tokens.py --benchmark-enable)
    .venv/bin/python bench/bench_tokens.py [--repeat 5]     # MB/s table and ratios

The vocabulary is SmolLM2's (when the converter has produced its tokenizer.json in .data/models)
and a 16k byte-level BPE trained here with SmolLM2's pipeline. tiktoken gets an Encoding built
offline from the same byte-level ranks (GPT-2's split regex, no Digits step, so its counts differ
slightly; the counts of `tokenizers` are the ones ours must equal, and do: checked in every case).
Texts: Python source of the standard library, 1 KB / 100 KB / 10 MB, and a batch of 1000 x 1 KB.
Goal (issue 2): count / count_batch at least tiktoken's speed. The 10 MB case runs only with
--benchmark-enable (the `tokenizers` peer takes seconds on it).
"""

from __future__ import annotations

import argparse
import functools
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import tiktoken
import tokenizers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from tokenizer_corpus import python_source, smollm2_tokenizer_path, trained_tokenizer_json  # noqa: E402

from cheapest_core import Tokenizer  # noqa: E402

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SIZES = {"1KB": 1_000, "100KB": 100_000, "10MB": 10_000_000}
BATCH = (1000, 1_000)  # texts x bytes
SERIAL_PART = 200_000  # below the size cheapest_core counts in parallel parts


def byte_level_alphabet() -> dict[str, int]:
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(0x100 + i): b for i, b in enumerate(others)})
    return table


def tiktoken_encoding(json: str, name: str) -> tiktoken.Encoding:
    """An Encoding from the tokenizer's byte-level vocabulary: rank = token id, added tokens special."""
    ref = tokenizers.Tokenizer.from_str(json)
    specials = {t.content: i for i, t in ref.get_added_tokens_decoder().items()}
    alphabet = byte_level_alphabet()
    ranks: dict[bytes, int] = {}
    for token, tid in ref.get_vocab(with_added_tokens=False).items():
        if token not in specials and all(c in alphabet for c in token):
            ranks[bytes(alphabet[c] for c in token)] = tid
    top = max([*ranks.values(), *specials.values()]) + 1
    for b in range(256):  # tiktoken needs every byte; SmolLM2 lacks a few (0x04, 0xF5, ...)
        if bytes([b]) not in ranks:
            ranks[bytes([b])] = top
            top += 1
    return tiktoken.Encoding(name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


class Vocabulary:
    def __init__(self, name: str, json: str) -> None:
        self.name = name
        self.ours = Tokenizer.from_str(json)
        self.ref = tokenizers.Tokenizer.from_str(json)
        self.tiktoken = tiktoken_encoding(json, name)
        self._counts: dict[int, int] = {}

    def reference_count(self, text: str) -> int:
        """`tokenizers`' count, computed once per text (seconds for 10 MB)."""
        key = hash(text)
        if key not in self._counts:
            self._counts[key] = len(self.ref.encode(text).ids)
        return self._counts[key]


def vocabularies() -> list[str]:
    return ["smollm2", "trained"]


def load_vocabulary(name: str) -> Vocabulary:
    if name == "smollm2":
        path = smollm2_tokenizer_path()
        if path is None:
            pytest.skip("SmolLM2's tokenizer.json has not been converted in this checkout")
        return Vocabulary("SmolLM2", path.read_text(encoding="utf-8"))
    return Vocabulary("trained-16k", trained_tokenizer_json())


def parts(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


# Where pre-tokenizer pieces always break: an ASCII non-space, then ASCII whitespace (rust/tokens/pretok.rs).
SAFE_CUT = re.compile(r"(?<=[!-~])(?=[ \t\n\r\f\v])")


def serial_parts(text: str, size: int) -> list[str]:
    """`text` in parts of about `size` cut where counts add up exactly."""
    out, start = [], 0
    while len(text) - start > size and (m := SAFE_CUT.search(text, start + size)):
        out.append(text[start:m.start()])
        start = m.start()
    out.append(text[start:])
    return out


def peers(v: Vocabulary) -> dict[str, Callable[[str], int]]:
    return {
        "cheapest": v.ours.count,
        # The same counts from parts small enough to be counted on the calling thread alone.
        "cheapest_1thread": lambda t: sum(v.ours.count(p) for p in serial_parts(t, SERIAL_PART)),
        "tokenizers": lambda t: len(v.ref.encode(t).ids),
        "tiktoken": lambda t: len(v.tiktoken.encode_ordinary(t)),
    }


def batch_peers(v: Vocabulary) -> dict[str, Callable[[list[str]], int]]:
    return {
        "cheapest": lambda ts: sum(v.ours.count_batch(ts)),
        "tokenizers": lambda ts: sum(len(e.ids) for e in v.ref.encode_batch(ts)),
        "tiktoken": lambda ts: sum(len(x) for x in v.tiktoken.encode_ordinary_batch(ts)),
    }


def batch_texts() -> list[str]:
    n, size = BATCH
    return parts(python_source(n * size), size)[:n]


# --- pytest-benchmark -----------------------------------------------------------------------------

@pytest.fixture(scope="module", params=vocabularies())
def vocab(request: pytest.FixtureRequest) -> Vocabulary:
    return load_vocabulary(request.param)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("peer", ["cheapest", "cheapest_1thread", "tokenizers", "tiktoken"])
def test_count(benchmark, request: pytest.FixtureRequest, vocab: Vocabulary, size: str, peer: str) -> None:  # type: ignore[no-untyped-def]
    disabled = request.config.getoption("benchmark_disable") and not request.config.getoption("benchmark_enable")
    if size == "10MB" and disabled:
        pytest.skip("10 MB runs with --benchmark-enable only")
    text = python_source(SIZES[size])
    benchmark.group = f"count {size} ({vocab.name})"
    benchmark.extra_info["MB"] = len(text.encode()) / 1e6
    if size == "10MB":  # seconds per round for the `tokenizers` peer: a few rounds say enough
        n = benchmark.pedantic(peers(vocab)[peer], args=(text,), rounds=3, iterations=1)
    else:
        n = benchmark(peers(vocab)[peer], text)
    if peer != "tiktoken":  # tiktoken has no Digits step: close, not equal
        assert n == vocab.ours.count(text) == vocab.reference_count(text)


@pytest.mark.parametrize("peer", ["cheapest", "tokenizers", "tiktoken"])
def test_count_batch(benchmark, vocab: Vocabulary, peer: str) -> None:  # type: ignore[no-untyped-def]
    texts = batch_texts()
    benchmark.group = f"count_batch {BATCH[0]} x {BATCH[1]} B ({vocab.name})"
    n = benchmark(batch_peers(vocab)[peer], texts)
    if peer != "tiktoken":
        assert n == sum(len(e.ids) for e in vocab.ref.encode_batch(texts))


# --- table ------------------------------------------------------------------------------------------

def median_seconds(fn: Callable[[], object], repeat: int, budget: float = 2.0) -> float:
    times: list[float] = []
    deadline = time.perf_counter() + budget
    while len(times) < repeat or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if times[-1] > budget:
            break
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sizes", default=",".join(SIZES))
    args = parser.parse_args()
    for name in vocabularies():
        try:
            v = load_vocabulary(name)
        except pytest.skip.Exception:
            continue
        print(f"\n{v.name} (vocab {v.ours.vocab_size}, fast path {v.ours.fast_path})")
        print(f"{'case':<22}{'cheapest':>10}{'1 thread':>10}{'tokenizers':>12}{'tiktoken':>10}"
              f"{'vs tok':>9}{'vs tt':>8}{'1thr vs tt':>12}   MB/s, ratios of medians")
        cases: list[tuple[str, float, dict[str, Callable[[], object]]]] = []
        for size in args.sizes.split(","):
            text = python_source(SIZES[size])
            assert v.ours.count(text) == len(v.ref.encode(text).ids)
            cases.append((f"count {size}", len(text.encode()) / 1e6,
                          {k: functools.partial(f, text) for k, f in peers(v).items()}))
        texts = batch_texts()
        cases.append((f"count_batch {BATCH[0]}x1KB", sum(len(t.encode()) for t in texts) / 1e6,
                      {k: functools.partial(f, texts) for k, f in batch_peers(v).items()}))
        for label, mb, fns in cases:
            speed = {k: mb / median_seconds(fn, args.repeat) for k, fn in fns.items()}
            one = speed.get("cheapest_1thread", float("nan"))
            print(f"{label:<22}{speed['cheapest']:>10.1f}{one:>10.1f}{speed['tokenizers']:>12.2f}"
                  f"{speed['tiktoken']:>10.1f}{speed['cheapest'] / speed['tokenizers']:>8.1f}x"
                  f"{speed['cheapest'] / speed['tiktoken']:>7.2f}x{one / speed['tiktoken']:>11.2f}x")


if __name__ == "__main__":
    main()
