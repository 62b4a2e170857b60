"""The engine's request features on the tiny random-weight model: n sequences from one prefill, grammar masks
computed while the model runs, logprobs, penalties and biases, and tools rendered into chat templates."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cheapest.engine.chat import ChatTemplate, tool_call_text
from cheapest_core import Tokenizer

from cheapest.engine.grammar import MaskWorker, _CoreVocabulary
from cheapest.engine.onnx_engine import OnnxEngine, load_engine
from cheapest.engine.sampling import Sampler
from cheapest.engine.types import Delta, Finish, GrammarError, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[OnnxEngine]:
    eng = load_engine(tiny_model_dir, threads=2, max_batch=8)
    yield eng
    asyncio.run(eng.close())


def _run(eng: OnnxEngine, ids: list[int], params: SamplingParams) -> dict[int, tuple[str, Finish, list[Delta]]]:
    async def go() -> dict[int, tuple[str, Finish, list[Delta]]]:
        deltas: dict[int, list[Delta]] = {}
        finishes: dict[int, Finish] = {}
        async for item in eng.generate(ids, params):
            if isinstance(item, Finish):
                finishes[item.index] = item
            else:
                deltas.setdefault(item.index, []).append(item)
        return {i: ("".join(d.text for d in deltas.get(i, [])), f, deltas.get(i, [])) for i, f in finishes.items()}
    return asyncio.run(go())


def _prompt(eng: OnnxEngine) -> list[int]:
    return eng.encode(eng.render_chat([("user", "hello there")]))


@pytest.mark.parametrize("spm", [False, True], ids=["byte-level", "sentencepiece"])
def test_grammar_view_from_the_core_tokenizer(spm: bool, tmp_path_factory: pytest.TempPathFactory) -> None:
    """llguidance's view of the vocabulary, built from the core tokenizer's token bytes and encoder, is the one
    it reads from tokenizer.json (tiny models of both tokenizer kinds; Gemma 3's in tests/engine/test_gemma3.py)."""
    from fixtures_model import assert_grammar_view_is_llguidances, write_tiny_gguf

    from cheapest.convert.converter import convert

    root = tmp_path_factory.mktemp("grammar-view")
    model_dir = root / "model"
    convert(write_tiny_gguf(root / "tiny.gguf", spm=spm), model_dir)
    texts = ["Hello world", "  two  spaces", "{\"a\": [1, 2]}", "héllo 😀", ""]
    if spm:  # the tiny SentencePiece vocabulary prepends a space: llguidance reads that tokenizer.json itself
        assert _CoreVocabulary.of(Tokenizer.from_file(model_dir / "tokenizer.json"), model_dir / "tokenizer.json",
                                  [2]) is None
        data = json.loads((model_dir / "tokenizer.json").read_text())
        data["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}  # Gemma's shape
        data["decoder"]["decoders"] = data["decoder"]["decoders"][:3]  # no Strip of the prefix
        (model_dir / "tokenizer.json").write_text(json.dumps(data))
    assert_grammar_view_is_llguidances(model_dir / "tokenizer.json", texts)


def test_n_sequences_share_one_prefill(engine: OnnxEngine) -> None:
    ids = _prompt(engine)
    greedy = _run(engine, ids, SamplingParams(12, temperature=0))[0]
    runs = engine.prefill_runs
    three = _run(engine, ids, SamplingParams(12, temperature=0, n=3))
    assert engine.prefill_runs == runs + 1  # one prefill, its cache copied into the other rows
    assert [three[i][0] for i in range(3)] == [greedy[0]] * 3  # the copied caches are the prompt's
    sampled = _run(engine, ids, SamplingParams(12, temperature=1.0, seed=11, n=3))
    alone = _run(engine, ids, SamplingParams(12, temperature=1.0, seed=11))
    assert sampled[0][0] == alone[0][0]  # stream 0 is the seed's own
    assert len({sampled[i][0] for i in range(3)}) == 3  # the others draw from their own streams


def test_more_sequences_than_the_batch_still_finish(tiny_model_dir: Path) -> None:
    eng = load_engine(tiny_model_dir, threads=2, max_batch=2)
    try:
        out = _run(eng, _prompt(eng), SamplingParams(4, temperature=0, n=5))
        assert sorted(out) == [0, 1, 2, 3, 4] and len({t for t, _, _ in out.values()}) == 1
    finally:
        asyncio.run(eng.close())


def test_grammar_constrains_every_sequence_and_unconstrained_ones_never_wait(engine: OnnxEngine) -> None:
    ids = _prompt(engine)
    _run(engine, ids, SamplingParams(6, temperature=1.0, seed=1))
    assert engine._scheduler._masks is None  # no constrained sequence yet: no worker was ever made
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}},
              "required": ["a", "b"], "additionalProperties": False,
              "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}
    grammar = engine.compile_grammar("start: obj\nobj: %json " + json.dumps(schema))
    out = _run(engine, ids, SamplingParams(60, temperature=1.0, seed=3, n=4, grammar=grammar))
    for text, finish, _ in out.values():
        if finish.reason == "stop":
            value = json.loads(text)
            assert set(value) == {"a", "b"} and value["b"] in ("x", "y")
        else:
            assert re.match(r'\{"a": -?\d*', text), text
    with pytest.raises(GrammarError):
        engine.compile_grammar('start: %json {"type": "object", "if": {}}')


def test_masks_are_computed_while_the_model_runs(engine: OnnxEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mask worker fills step N+1's mask in its own thread while the runner computes step N."""
    spans: dict[str, list[tuple[float, float, str]]] = {"model": [], "mask": []}
    runner = engine._runner
    decode, compute = runner.decode, MaskWorker._compute

    def slow_decode(tokens: Any) -> Any:
        start = time.perf_counter()
        time.sleep(0.02)
        out = decode(tokens)
        spans["model"].append((start, time.perf_counter(), threading.current_thread().name))
        return out

    def timed_compute(self: MaskWorker, constraints: Any) -> None:
        start = time.perf_counter()
        compute(self, constraints)
        spans["mask"].append((start, time.perf_counter(), threading.current_thread().name))

    monkeypatch.setattr(runner, "decode", slow_decode)
    monkeypatch.setattr(MaskWorker, "_compute", timed_compute)
    grammar = engine.compile_grammar('start: "a" /[0-9]{8}/')
    _run(engine, _prompt(engine), SamplingParams(12, temperature=0, grammar=grammar))
    assert len(spans["mask"]) >= len(spans["model"]) >= 5
    assert {name for _, _, name in spans["mask"]} == {"cheapest-masks_0"}
    overlapping = sum(1 for ms, _, _ in spans["mask"] for s, e, _ in spans["model"] if s <= ms <= e)
    assert overlapping >= len(spans["model"]) - 1  # every step's mask started during that step's model run


def test_logprobs_are_the_models_distribution(engine: OnnxEngine) -> None:
    out = _run(engine, _prompt(engine), SamplingParams(8, temperature=0, logprobs=4))
    entries = [e for d in out[0][2] for e in d.logprobs]
    assert 1 <= len(entries) <= 8
    for e in entries:
        assert e.top[0][2] == e.logprob and e.top[0][0] == e.token  # greedy: the likeliest token was chosen
        assert sum(np.exp(lp) for _, _, lp in e.top) <= 1.0 + 1e-9
    assert "".join(e.utf8.decode("utf-8", "replace") for e in entries).startswith(out[0][0][:1])


def test_bias_and_penalties_change_the_choice() -> None:
    logits = np.array([3.0, 2.0, 1.0, 0.0], dtype=np.float32)
    assert Sampler(SamplingParams(1, temperature=0))(logits) == 0
    assert Sampler(SamplingParams(1, temperature=0, logit_bias=((3, 10.0),)))(logits) == 3
    penalised = Sampler(SamplingParams(1, temperature=0, frequency_penalty=0.6, presence_penalty=0.6))
    assert [penalised(logits) for _ in range(3)] == [0, 1, 0]  # 3-1.2 < 2; then 2-1.2 < 3-1.2
    masked = Sampler(SamplingParams(1, temperature=0))
    assert masked(logits, np.array([0b1100], dtype=np.int32)) == 2  # a grammar's bitmask: tokens 2 and 3
    assert masked(logits, np.zeros(1, dtype=np.int32), fallback=7) == 7  # nothing allowed: the sequence ends
    assert logits.tolist() == [3.0, 2.0, 1.0, 0.0]  # the runner's buffer is never written


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
QWEN_LIKE = ("{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}{% for m in messages %}[{{ m.role }}]"
             "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} "
             "{{ c.function.arguments | tojson }}{% endfor %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}")


def test_templates_that_take_tools_render_them_and_others_get_the_tool_format() -> None:
    history: list[Any] = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
    native = ChatTemplate(QWEN_LIKE)
    assert native.takes_tools
    assert native.render(history, tools=TOOLS, add_generation_prompt=False) == (
        'TOOLS:[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]\n'
        '[user]weather?[assistant]CALL get_weather {"city": "Paris"}[tool]sunny')  # trim_blocks ate the newlines
    plain = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    assert not plain.takes_tools
    text = plain.render(history, tools=TOOLS, add_generation_prompt=False)
    assert text.startswith("<system>You may call one or more functions") and '"name": "get_weather"' in text
    assert '<assistant><tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert text.endswith("<user><tool_response>\nsunny\n</tool_response>")
    assert tool_call_text("f", {"a": 1}) == '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
