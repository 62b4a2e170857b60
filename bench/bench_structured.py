"""Constrained decoding cost: decode tok/s with a JSON Schema grammar vs without, on the same prompt and model,
the per-token cost of the masks, and the compile time of a realistic schema.

    python bench/bench_structured.py [--model-dir DIR] [--threads 2] [--new-tokens 96] [--rounds 5]

Decode speed is tokens after the first / time after the first, greedy, batch 1; the constrained request asks
for a string the schema keeps open (minLength) so both runs decode the same number of tokens. The two take turns
for --rounds rounds; medians. The mask cost is measured where it is spent: the worker's consume + mask
(overlapped with the model's step) and the sampler's unpack + apply (on the critical path), per token.
Goal: constrained >= 0.9x unconstrained.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from cheapest.engine.grammar import MaskWorker
from cheapest.engine.onnx_engine import OnnxEngine, load_engine
from cheapest.engine.sampling import Sampler
from cheapest.engine.types import Finish, SamplingParams
from cheapest.gateway.structured import answer_grammar, response_grammar

REPO = Path(__file__).resolve().parent.parent
QUESTION = "Write a short story about a lighthouse keeper, as JSON."
LONG = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                          "story": {"type": "string", "minLength": 2000}},
        "required": ["title", "story"], "additionalProperties": False}
# A realistic API schema: an order with a customer, an address, line items, enums, formats, patterns.
ORDER = {
    "type": "object", "additionalProperties": False,
    "required": ["id", "customer", "items", "status", "created", "shipping"],
    "properties": {
        "id": {"type": "string", "pattern": "^ord_[a-z0-9]{12}$"},
        "status": {"enum": ["pending", "paid", "shipped", "delivered", "cancelled"]},
        "created": {"type": "string", "format": "date-time"},
        "customer": {"type": "object", "required": ["name", "email"], "additionalProperties": False, "properties": {
            "name": {"type": "string", "maxLength": 80}, "email": {"type": "string", "format": "email"},
            "phone": {"type": "string", "pattern": "^\\+?[0-9 ]{7,15}$"}, "vip": {"type": "boolean"}}},
        "shipping": {"type": "object", "required": ["street", "city", "country"], "additionalProperties": False,
                     "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                    "postcode": {"type": "string", "maxLength": 10},
                                    "country": {"type": "string", "pattern": "^[A-Z]{2}$"}}},
        "items": {"type": "array", "minItems": 1, "maxItems": 50, "items": {
            "type": "object", "required": ["sku", "quantity", "unit_price"], "additionalProperties": False,
            "properties": {"sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1, "maximum": 999},
                           "unit_price": {"type": "number", "minimum": 0}, "gift": {"type": "boolean"},
                           "options": {"type": "array", "items": {"enum": ["red", "green", "blue", "large"]}}}}},
        "notes": {"anyOf": [{"type": "string", "maxLength": 500}, {"type": "null"}]},
        "discount": {"type": "object", "properties": {"code": {"type": "string"}, "percent": {"type": "integer",
                                                                                                 "maximum": 100}}},
    },
}


def _grammar(schema: dict[str, Any]) -> str:
    rules = response_grammar("json_schema", schema)
    assert rules is not None
    return answer_grammar(rules)


async def _decode_rate(engine: OnnxEngine, ids: list[int], params: SamplingParams) -> tuple[float, int]:
    first = last = 0.0
    tokens = 0
    async for item in engine.generate(ids, params):
        now = time.perf_counter()
        if item.completion_tokens == 1 and not first:
            first = now
        last, tokens = now, item.completion_tokens
        if isinstance(item, Finish):
            break
    return (tokens - 1) / (last - first), tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=str(REPO / ".data" / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    engine = load_engine(args.model_dir, threads=args.threads)
    ids = engine.encode(engine.render_chat([("user", QUESTION)]))

    compile_ms, first_mask_ms = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        grammar = engine.compile_grammar(_grammar(ORDER))
        compile_ms.append(1000 * (time.perf_counter() - start))
        start = time.perf_counter()
        constraint = engine._grammars.constraint(grammar, 0)  # a sequence's matcher and its first mask
        worker = MaskWorker(engine.vocab_size, 1)
        worker.start([constraint]).result()
        first_mask_ms.append(1000 * (time.perf_counter() - start))
        worker.close()

    mask_seconds: list[float] = []
    compute = MaskWorker._compute

    def timed(self: MaskWorker, constraints: Any) -> None:
        start = time.perf_counter()
        compute(self, constraints)
        mask_seconds.append(time.perf_counter() - start)

    MaskWorker._compute = timed  # type: ignore[method-assign]
    long_grammar = engine.compile_grammar(_grammar(LONG))
    free = SamplingParams(args.new_tokens, temperature=0)
    constrained = SamplingParams(args.new_tokens, temperature=0, grammar=long_grammar)
    rates: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
    for _ in range(args.rounds):
        for name, params in (("unconstrained", free), ("constrained", constrained)):
            rate, tokens = asyncio.run(_decode_rate(engine, ids, params))
            rates[name].append(rate)
            if name == "constrained":
                assert tokens == args.new_tokens, tokens
    # The sampler's share, on the critical path: unpack the bitmask and choose among the allowed tokens, per token,
    # against the same choice without a mask.
    worker = MaskWorker(engine.vocab_size, 1)
    constraint = engine._grammars.constraint(long_grammar, 0)
    worker.start([constraint]).result()
    logits = np.random.default_rng(0).standard_normal(engine.vocab_size).astype(np.float32)
    sampler = Sampler(SamplingParams(1, temperature=0))
    apply_us = []
    for _ in range(300):
        start = time.perf_counter()
        sampler(logits)
        middle = time.perf_counter()
        sampler(logits, worker.allowed(constraint), 0)
        apply_us.append(1e6 * ((time.perf_counter() - middle) - (middle - start)))
    worker.close()
    asyncio.run(engine.close())

    free_rate, con_rate = statistics.median(rates["unconstrained"]), statistics.median(rates["constrained"])
    print(json.dumps({
        "decode_tok_s": {"unconstrained": round(free_rate, 1), "constrained": round(con_rate, 1),
                         "ratio": round(con_rate / free_rate, 3), "rounds": rates,
                         # each round's pair ran back to back: the median of their ratios drifts less with load
                         "paired_ratio_median": round(statistics.median(
                             c / f for c, f in zip(rates["constrained"], rates["unconstrained"])), 3)},
        "mask_worker_us_per_token": {"median": round(1e6 * statistics.median(mask_seconds), 1),
                                     "p90": round(1e6 * float(np.percentile(mask_seconds, 90)), 1),
                                     "note": "overlapped with the model's step"},
        "mask_apply_us_per_token": round(statistics.median(apply_us), 1),
        "order_schema": {"compile_ms": round(statistics.median(compile_ms), 2),
                         "matcher_and_first_mask_ms": round(statistics.median(first_mask_ms), 2)},
    }, indent=1))


if __name__ == "__main__":
    main()
