"""The embedding engine: runs planned by length with bounded padding, concurrent requests sharing runs, the same
vectors however inputs are batched, token ids wrapped like a text's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from cheapest.engine.embedding import BATCH_TOKENS, PAD_SLACK, EmbeddingEngine, plan_batches


def test_runs_are_within_the_token_budget_and_the_padding_bound() -> None:
    lengths = [3, 250, 7, 9, 128, 5, 256, 6, 64, 70] * 20
    runs = plan_batches(lengths)
    assert sorted(i for run in runs for i in run) == list(range(len(lengths)))
    for run in runs:
        longest, shortest = max(lengths[i] for i in run), min(lengths[i] for i in run)
        assert longest * len(run) <= BATCH_TOKENS and longest <= 2 * shortest + PAD_SLACK


def test_concurrent_requests_share_runs_and_get_the_same_vectors(tiny_encoder_dir: Path) -> None:
    engine = EmbeddingEngine(tiny_encoder_dir, threads=1)
    texts = ["the man is eating food.", "hello", "a girl is carrying a baby", "the dog runs in the park"] * 4

    async def run() -> tuple[np.ndarray, list[np.ndarray], int]:
        alone = np.stack([(await engine.embed([engine.tokenize(t)]))[0] for t in texts])
        before = engine.runs
        together = await asyncio.gather(*(engine.embed([engine.tokenize(t)]) for t in texts))
        return alone, [v[0] for v in together], engine.runs - before

    try:
        alone, together, runs = asyncio.run(run())
        assert runs < len(texts)  # sixteen requests, fewer runs
        np.testing.assert_allclose(np.stack(together), alone, atol=1e-5)
        # A text's token ids (no special tokens) give the text's vector.
        ids = engine.tokenizer.encode(texts[0], add_special_tokens=False)
        assert engine.wrap(ids) == engine.tokenize(texts[0])
        assert engine.truncate(engine.tokenize(texts[0]), 4) == engine.tokenize(texts[0])[:3] + [3]
    finally:
        asyncio.run(engine.close())
