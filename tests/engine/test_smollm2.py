"""The engine on the real SmolLM2-135M-Instruct (converted from its GGUF): known greedy answers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from cheapest.engine.onnx_engine import OnnxEngine, load_engine
from cheapest.engine.types import Delta, Finish, SamplingParams
from fixtures_model import collect_generation

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
PROMPT_START = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308]
ANSWER_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]
ANSWER = "The capital of France is Paris."
GREEDY = SamplingParams(max_tokens=32, temperature=0.0)


@pytest.fixture(scope="module")
def engine(smollm2_dir: Path) -> Iterator[OnnxEngine]:
    eng = load_engine(smollm2_dir, threads=2)
    yield eng
    asyncio.run(eng.close())


async def _collect(eng: OnnxEngine, ids: list[int], params: SamplingParams) -> tuple[list[Delta], Finish]:
    return await collect_generation(eng, ids, params)


def _question(eng: OnnxEngine) -> list[int]:
    return eng.encode(eng.render_chat([("user", QUESTION)]))


def _pieces(eng: OnnxEngine, ids: list[int]) -> list[str]:
    """What each answer token adds to the stream (ASCII answer: one token, one piece; EOS adds nothing)."""
    return [eng.decode([i]) for i in ids[:-1]] + [""]


def test_capital_of_france(engine: OnnxEngine) -> None:
    ids = _question(engine)
    assert len(ids) == 37 and ids[:12] == PROMPT_START
    deltas, finish = asyncio.run(_collect(engine, ids, GREEDY))
    assert "".join(d.text for d in deltas) == ANSWER
    assert engine.decode(ANSWER_IDS[:-1]) == ANSWER
    # One Delta per generated token, so the pieces pin down the token ids; id 2 (EOS) ends it with "stop".
    assert [d.text for d in deltas] == _pieces(engine, ANSWER_IDS)
    assert finish == Finish("stop", len(ANSWER_IDS))
    assert ANSWER_IDS[-1] in engine.spec.eos_token_ids
    assert engine.provider == "CPUExecutionProvider"


def test_batched_answers_equal_the_single_answer(engine: OnnxEngine) -> None:
    question = _question(engine)
    others = [engine.encode(engine.render_chat([("user", q)])) for q in
              ("Name three colors.", "Write a haiku about the sea.", "What is 2 + 2?")]
    alone = [asyncio.run(_collect(engine, ids, GREEDY)) for ids in others]

    async def together() -> list[tuple[list[Delta], Finish]]:
        return await asyncio.gather(*(_collect(engine, ids, GREEDY) for ids in [question, *others, question]))

    results = asyncio.run(together())
    texts = ["".join(d.text for d in deltas) for deltas, _ in results]
    assert texts[0] == texts[-1] == ANSWER
    assert texts[1:-1] == ["".join(d.text for d in deltas) for deltas, _ in alone]


def test_stop_string_inside_the_answer(engine: OnnxEngine) -> None:
    deltas, finish = asyncio.run(_collect(engine, _question(engine), SamplingParams(
        max_tokens=32, temperature=0.0, stop=("ance is",))))
    assert "".join(d.text for d in deltas) == "The capital of Fr"
    assert finish.reason == "stop"


def test_reference_graph_gives_the_same_answer(smollm2_dir: Path) -> None:
    """The plain fp32 graph, served with the concatenating (left-padded) cache."""
    eng = load_engine(smollm2_dir, threads=2, graph="model_fp32.onnx")
    try:
        assert eng.spec.kv_layout == "concat"
        deltas, finish = asyncio.run(_collect(eng, _question(eng), GREEDY))
        assert "".join(d.text for d in deltas) == ANSWER
        assert finish == Finish("stop", len(ANSWER_IDS))
    finally:
        asyncio.run(eng.close())



def test_huge_page_weights_give_the_same_logits_from_one_resident_copy(smollm2_dir: Path) -> None:
    """The core's operators copy their weights into transparent huge pages and drop the session's mapping of the
    model file (rust/ortops/pages.rs): the same logits bit for bit as reading the mapped file, and resident
    memory still holds one copy of the weights after 84 steps (fresh processes, so each measures its own); the
    tied head's rescored rows read its copy, not the file's pages again."""
    from fixtures_model import assert_huge_page_weights

    assert_huge_page_weights(smollm2_dir)
