"""The ONNX engine on the tiny random-weight model: generation, sampling, stop strings, streaming text,
continuous batching and cancellation, checked against an independent greedy loop over the same graph."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tokenizers
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cheapest.engine.chat import ChatTemplate, ChatTemplateError
from cheapest.engine.onnx_engine import OnnxEngine, _Output, load_engine
from cheapest.engine.loader import read_model_dir
from cheapest.engine.sampling import Sampler
from cheapest.engine.types import ContextLengthError, Delta, EngineError, Finish, SamplingParams
from fixtures_model import collect_generation

GRAPHS = ["model.onnx", "model_fp32.onnx"]  # fused (shared KV buffer) and plain reference (concat cache)


@pytest.fixture(scope="module", params=GRAPHS)
def engine(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Iterator[OnnxEngine]:
    eng = load_engine(tiny_model_dir, threads=2, graph=request.param, max_batch=8)
    yield eng
    asyncio.run(eng.close())


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir: Path) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


async def _collect(eng: OnnxEngine, ids: list[int], params: SamplingParams) -> tuple[list[Delta], Finish]:
    return await collect_generation(eng, ids, params)


def _run(eng: OnnxEngine, ids: list[int], params: SamplingParams) -> tuple[str, Finish]:
    deltas, finish = asyncio.run(_collect(eng, ids, params))
    return "".join(d.text for d in deltas), finish


def _prompt(eng: OnnxEngine, text: str) -> list[int]:
    return eng.encode(eng.render_chat([("user", text)]))


def _reference(eng: OnnxEngine, ids: list[int], params: SamplingParams) -> list[int]:
    """The tokens a request should get, by recomputing the whole sequence every step (no KV cache, no
    batching, a fresh session) and drawing with the same seeded sampler."""
    spec = eng.spec
    session = ort.InferenceSession(str(spec.graph_path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    sampler = Sampler(params)
    seq = list(ids)
    out: list[int] = []
    for _ in range(min(params.max_tokens, spec.context_length - len(ids))):
        length = len(seq)
        feeds: dict[str, np.ndarray] = {"input_ids": np.asarray([seq], np.int64)}
        if "attention_mask" in names:
            feeds["attention_mask"] = np.ones((1, length), np.int64)
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(length, dtype=np.int64)[None, :]
        for i in range(spec.num_layers):
            for kind in ("key", "value"):
                feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
        (logits,) = session.run(["logits"], feeds)
        token = sampler(logits[0, -1])
        out.append(token)
        if token in spec.eos_token_ids:
            break
        seq.append(token)
    return out


def _reference_greedy(eng: OnnxEngine, ids: list[int], n: int) -> list[int]:
    return _reference(eng, ids, SamplingParams(max_tokens=n, temperature=0.0))


def _expected_text(hf_tokenizer: tokenizers.Tokenizer, eng: OnnxEngine, tokens: list[int]) -> str:
    if tokens and tokens[-1] in eng.spec.eos_token_ids:
        tokens = tokens[:-1]
    return str(hf_tokenizer.decode(tokens, skip_special_tokens=False))


GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
PROMPTS = ["hello", "a somewhat longer prompt, with punctuation!", "é", "0123456789 " * 4, "日本語のテスト"]


# --- generation ---------------------------------------------------------------------------------------------------


def test_greedy_matches_an_uncached_reference_and_is_deterministic(
    engine: OnnxEngine, hf_tokenizer: tokenizers.Tokenizer
) -> None:
    ids = _prompt(engine, "hello there")
    text, finish = _run(engine, ids, GREEDY)
    expected_tokens = _reference_greedy(engine, ids, GREEDY.max_tokens)
    assert finish.completion_tokens == len(expected_tokens)
    assert finish.reason == ("stop" if expected_tokens[-1] in engine.spec.eos_token_ids else "length")
    assert text == _expected_text(hf_tokenizer, engine, expected_tokens)
    assert _run(engine, ids, GREEDY) == (text, finish)


def test_seed_reproduces_a_sampled_completion(engine: OnnxEngine) -> None:
    ids = _prompt(engine, "tell me something")
    for params in (
        SamplingParams(max_tokens=20, temperature=1.0, seed=7),
        SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, top_k=40, seed=123),
    ):
        first = _run(engine, ids, params)
        assert _run(engine, ids, params) == first
    outputs = {_run(engine, ids, SamplingParams(max_tokens=20, temperature=1.5, seed=s))[0] for s in range(6)}
    assert len(outputs) > 1  # different seeds explore different continuations


def test_max_tokens_ends_with_length(engine: OnnxEngine) -> None:
    ids = _prompt(engine, "count")
    reference = _reference_greedy(engine, ids, 5)
    deltas, finish = asyncio.run(_collect(engine, ids, SamplingParams(max_tokens=5, temperature=0.0)))
    if len(reference) == 5 and reference[-1] not in engine.spec.eos_token_ids:
        assert finish == Finish("length", 5)
    assert [d.completion_tokens for d in deltas] == list(range(1, finish.completion_tokens + 1))


def test_stop_string_across_token_boundary_is_never_emitted(engine: OnnxEngine) -> None:
    ids = _prompt(engine, "hello world")
    deltas, _ = asyncio.run(_collect(engine, ids, SamplingParams(max_tokens=40, temperature=0.0)))
    full = "".join(d.text for d in deltas)
    # A stop string made of the end of one token's text and the start of the next one's.
    stop, cut = None, -1
    pos = 0
    for left, right in zip(deltas, deltas[1:]):
        pos += len(left.text)
        if left.text and right.text:
            candidate = left.text[-2:] + right.text[:2]
            if full.find(candidate) == pos - len(left.text[-2:]):
                stop, cut = candidate, full.find(candidate)
                break
    assert stop is not None, "the tiny model's greedy output should have two consecutive non-empty pieces"
    stopped, finish = asyncio.run(_collect(engine, ids, SamplingParams(max_tokens=40, temperature=0.0,
                                                                           stop=("never-there", stop))))
    text = "".join(d.text for d in stopped)
    assert text == full[:cut]
    assert finish.reason == "stop"
    assert stop not in text
    assert finish.completion_tokens <= len(deltas)


def test_context_length_error_before_any_work(engine: OnnxEngine) -> None:
    asyncio.run(_wait_idle(engine))  # the previous test's sequence leaves just after its Finish is delivered
    steps = engine.decode_steps

    async def main() -> None:
        agen = engine.generate([5] * engine.context_length, GREEDY)
        with pytest.raises(ContextLengthError) as err:
            await agen.__anext__()
        assert err.value.prompt_tokens == engine.context_length
        assert str(engine.context_length) in str(err.value)

    asyncio.run(main())
    assert engine.decode_steps == steps
    assert engine.active_sequences == 0


def test_empty_prompt_starts_from_bos_and_zero_max_tokens_does_no_work(engine: OnnxEngine) -> None:
    _, finish = _run(engine, [], SamplingParams(max_tokens=3, temperature=0.0))
    bos = engine.spec.bos_token_id
    assert bos is not None
    assert (_run(engine, [bos], SamplingParams(max_tokens=3, temperature=0.0))[1]) == finish
    steps = engine.decode_steps
    assert _run(engine, [5, 6], SamplingParams(max_tokens=0)) == ("", Finish("length", 0))
    assert engine.decode_steps == steps


def test_long_prompt_near_the_context_is_cut_by_length(engine: OnnxEngine) -> None:
    ids = [5] * (engine.context_length - 3)
    _, finish = _run(engine, ids, SamplingParams(max_tokens=50, temperature=0.0))
    assert finish.completion_tokens <= 3


def test_stream_concatenates_to_the_full_decode(engine: OnnxEngine, hf_tokenizer: tokenizers.Tokenizer) -> None:
    """Sampled outputs of the random model are mostly byte tokens: multi-byte characters split across tokens and
    stray bytes (U+FFFD) both occur; the streamed pieces must add up to exactly what decode() gives for the
    tokens an uncached run with the same seed draws."""
    ids = _prompt(engine, "日本語")
    saw_multibyte = False
    for seed in range(6):
        params = SamplingParams(max_tokens=30, temperature=1.2, seed=seed)
        deltas, finish = asyncio.run(_collect(engine, ids, params))
        tokens = _reference(engine, ids, params)
        text = "".join(d.text for d in deltas)
        assert text == _expected_text(hf_tokenizer, engine, tokens)
        assert finish.completion_tokens == len(tokens)
        saw_multibyte |= any(ord(c) > 0x7F and c != "\ufffd" for c in text)
    assert saw_multibyte


def test_output_pipeline_streams_multibyte_characters_exactly(hf_tokenizer: tokenizers.Tokenizer,
                                                               engine: OnnxEngine) -> None:
    """The engine's per-sequence text pipeline, fed token by token: split characters are held until complete."""
    text = "héllo wörld 日本語 テスト 😀 ok"
    tokens = hf_tokenizer.encode(text, add_special_tokens=False).ids
    items: list[Delta | Finish | BaseException] = []
    out = _Output(engine.tokenizer.decoder(), SamplingParams(max_tokens=len(tokens)), frozenset(), len(tokens),
                  items.append)
    done = [out.accept(t) for t in tokens]
    assert done == [False] * (len(tokens) - 1) + [True]
    pieces = [i.text for i in items if isinstance(i, Delta)]
    assert "".join(pieces) == hf_tokenizer.decode(tokens) == text
    assert all("\ufffd" not in p for p in pieces)
    assert items[-1] == Finish("length", len(tokens))


# --- batching -----------------------------------------------------------------------------------------------------


def test_batched_results_equal_unbatched(engine: OnnxEngine, hf_tokenizer: tokenizers.Tokenizer) -> None:
    prompts = [_prompt(engine, p) for p in PROMPTS]
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (24, 9, 17, 30, 4)]
    alone = [_run(engine, ids, p) for ids, p in zip(prompts, params)]
    steps_before, prefills_before = engine.decode_steps, engine.prefill_runs

    async def together() -> list[tuple[list[Delta], Finish]]:
        return await asyncio.gather(*(_collect(engine, ids, p) for ids, p in zip(prompts, params)))

    batched = [("".join(d.text for d in deltas), fin) for deltas, fin in asyncio.run(together())]
    assert batched == alone
    # They really ran together: fewer steps than the sum of their lengths; the shared-buffer runner also
    # prefills prompts of different lengths in one right-padded run.
    assert engine.decode_steps - steps_before < sum(f.completion_tokens for _, f in alone)
    if engine.spec.kv_layout == "shared_buffer":
        assert engine.prefill_runs - prefills_before < len(prompts)
    for ids, p, (text, _) in zip(prompts, params, alone):
        assert text == _expected_text(hf_tokenizer, engine, _reference_greedy(engine, ids, p.max_tokens))


def test_cache_growth_keeps_every_row(tiny_model_dir: Path) -> None:
    """A KV buffer that starts tiny is regrown (copying the rows in use) while several sequences run."""
    roomy = load_engine(tiny_model_dir, threads=2)
    small = load_engine(tiny_model_dir, threads=2, initial_capacity=4)
    assert small.spec.kv_layout == "shared_buffer"
    prompts = [_prompt(roomy, p) for p in PROMPTS]
    params = SamplingParams(max_tokens=20, temperature=0.0)
    alone = [_run(roomy, ids, params)[0] for ids in prompts]

    async def together() -> list[str]:
        results = await asyncio.gather(*(_collect(small, ids, params) for ids in prompts))
        await small.close()
        await roomy.close()
        return ["".join(d.text for d in deltas) for deltas, _ in results]

    assert asyncio.run(together()) == alone
    assert small._runner.capacity > 4  # type: ignore[attr-defined]


def test_sequences_join_and_leave_between_steps(engine: OnnxEngine) -> None:
    """Staggered arrivals with different lengths; each result equals its solo run."""
    prompts = [_prompt(engine, p) for p in PROMPTS]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    alone = [_run(engine, ids, params) for ids in prompts]

    async def staggered() -> list[tuple[str, Finish]]:
        async def one(i: int, ids: list[int]) -> tuple[str, Finish]:
            await asyncio.sleep(0.01 * i)
            deltas, fin = await _collect(engine, ids, params)
            return "".join(d.text for d in deltas), fin

        return await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))

    assert asyncio.run(staggered()) == alone


def test_cancelled_consumer_frees_its_slot(engine: OnnxEngine) -> None:
    ids = _prompt(engine, "go on")
    long = SamplingParams(max_tokens=400, temperature=1.0, seed=1)

    async def main() -> None:
        agen = engine.generate(ids, long)
        seen = [await agen.__anext__() for _ in range(3)]
        assert all(isinstance(s, Delta) for s in seen)
        assert engine.active_sequences == 1
        await agen.aclose()
        await _wait_idle(engine)
        steps = engine.decode_steps
        await asyncio.sleep(0.05)
        assert engine.decode_steps == steps  # nothing runs for the dropped sequence

        task = asyncio.create_task(_collect(engine, ids, long))
        while engine.decode_steps < steps + 3:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _wait_idle(engine)
        # The freed slot serves the next request normally.
        _, fin = await _collect(engine, ids, SamplingParams(max_tokens=3, temperature=0.0))
        assert fin.completion_tokens <= 3

    asyncio.run(main())


async def _wait_idle(engine: OnnxEngine) -> None:
    for _ in range(2000):
        if engine.active_sequences == 0:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the sequence still holds a slot")


def test_generation_does_not_block_the_event_loop(engine: OnnxEngine) -> None:
    ids = _prompt(engine, "hello")

    async def main() -> tuple[int, int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        _, fin = await _collect(engine, ids, SamplingParams(max_tokens=60, temperature=1.0, seed=3))
        stop.set()
        await t
        return ticks, fin.completion_tokens

    ticks, produced = asyncio.run(main())
    assert ticks > produced  # the loop kept turning between tokens


def test_closed_engine_raises_engine_error(tiny_model_dir: Path) -> None:
    eng = load_engine(tiny_model_dir, threads=1)

    async def main() -> None:
        await eng.close()
        with pytest.raises(EngineError):
            await _collect(eng, [5, 6], GREEDY)

    asyncio.run(main())


@pytest.mark.parametrize("stage", ["prefill_many", "decode"])
def test_inference_failure_is_a_generic_engine_error(tiny_model_dir: Path, stage: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    eng = load_engine(tiny_model_dir, threads=1)
    canary = "canary-3b7e"
    ids = _prompt(eng, canary)
    real = getattr(eng._runner, stage)

    def broken(*args: object) -> object:
        raise RuntimeError(f"kernel failed near {canary}")

    async def main() -> None:
        monkeypatch.setattr(eng._runner, stage, broken)
        with pytest.raises(EngineError) as err:
            await _collect(eng, ids, GREEDY)
        assert canary not in str(err.value) and err.value.__cause__ is None
        monkeypatch.setattr(eng._runner, stage, real)
        _, finish = await _collect(eng, ids, SamplingParams(max_tokens=3, temperature=0.0))  # still serving
        assert finish.completion_tokens >= 1
        await eng.close()

    asyncio.run(main())


def test_engine_reports_metadata(engine: OnnxEngine, tiny_model_dir: Path) -> None:
    spec = read_model_dir(tiny_model_dir)
    assert engine.provider == "CPUExecutionProvider"
    assert engine.context_length == spec.context_length
    assert engine.model_id
    assert spec.kv_layout in ("shared_buffer", "concat")


def test_default_graph_is_the_fused_one(tiny_model_dir: Path) -> None:
    assert read_model_dir(tiny_model_dir).graph_path.name == "model.onnx"
    assert read_model_dir(tiny_model_dir).kv_layout == "shared_buffer"
    assert read_model_dir(tiny_model_dir, graph="model_fp32.onnx").kv_layout == "concat"


# --- sampling -----------------------------------------------------------------------------------------------------


def test_sampler_modes() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(1000).astype(np.float32)
    best = int(np.argmax(logits))
    assert Sampler(SamplingParams(max_tokens=1, temperature=0.0))(logits) == best
    assert Sampler(SamplingParams(max_tokens=1, temperature=1.0, top_k=1, seed=1))(logits) == best
    assert Sampler(SamplingParams(max_tokens=1, temperature=1.0, top_p=1e-9, seed=1))(logits) == best
    top5 = set(np.argsort(-logits)[:5].tolist())
    draws = [Sampler(SamplingParams(max_tokens=1, temperature=2.0, top_k=5, seed=s))(logits) for s in range(200)]
    assert set(draws) <= top5 and len(set(draws)) > 1
    a = Sampler(SamplingParams(max_tokens=1, temperature=1.0, seed=42))
    b = Sampler(SamplingParams(max_tokens=1, temperature=1.0, seed=42))
    assert [a(logits) for _ in range(50)] == [b(logits) for _ in range(50)]


def test_sampler_follows_the_distribution() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    sampler = Sampler(SamplingParams(max_tokens=1, temperature=1.0, seed=0))
    counts = np.bincount([sampler(logits) for _ in range(6000)], minlength=3) / 6000
    assert np.allclose(counts, [0.5, 0.3, 0.2], atol=0.03)
    nucleus = Sampler(SamplingParams(max_tokens=1, temperature=1.0, top_p=0.75, seed=0))
    assert {nucleus(logits) for _ in range(300)} == {0, 1}


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2)])
def test_sampler_rejects_bad_parameters(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Sampler(SamplingParams(max_tokens=1, **bad))  # type: ignore[arg-type]


# --- stop strings -------------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab\n日😀", max_size=30),
    cuts=st.lists(st.integers(0, 30), max_size=8),
    stops=st.lists(st.text(alphabet="ab\n日😀", min_size=1, max_size=4), max_size=3),
)
def test_output_streams_exactly_the_text_before_the_first_stop(text: str, cuts: list[int],
                                                               stops: list[str]) -> None:
    """The engine's output pipeline (the core's StopMatcher behind it), one piece of text per token."""
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]

    class Pieces:  # token i decodes to pieces[i]
        def push(self, id: int) -> str:
            return pieces[id]

        def flush(self) -> str:
            return ""

    items: list[Delta | Finish | BaseException] = []
    out = _Output(Pieces(), SamplingParams(max_tokens=len(pieces) + 1, stop=tuple(stops)), frozenset({len(pieces)}),
                  len(pieces) + 1, items.append)
    for token in range(len(pieces) + 1):  # the last token is EOS
        if out.accept(token):
            break
    finish = items[-1]
    assert isinstance(finish, Finish)
    stopped = finish.reason == "stop" and finish.completion_tokens <= len(pieces)
    out_text = "".join(i.text for i in items if isinstance(i, Delta))
    # Generation stops at the first piece after which some stop string is complete; the text before the
    # earliest stop string in what was generated by then is the answer.
    for n, end in enumerate(bounds[1:], 1):
        hits = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
        if hits:
            assert stopped and finish.completion_tokens == n and out_text == text[: min(hits)]
            return
    assert finish.completion_tokens == len(pieces) + 1 and out_text == text


# --- chat template ------------------------------------------------------------------------------------------------

SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_chat_template_renders_like_transformers() -> None:
    template = ChatTemplate.from_tokenizer_config({"chat_template": SMOLLM_TEMPLATE, "eos_token": "<|im_end|>"})
    assert template.render([("user", "What is the capital of France?")]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    named = ChatTemplate.from_tokenizer_config({
        "chat_template": [{"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.content | tojson }}"
                                                          "{% generation %}!{% endgeneration %}{% endfor %}"}],
        "bos_token": {"content": "<s>", "lstrip": False},
    })
    assert named.render([("user", "é\"")]) == '<s>"é\\""!'


@example(content="\n", typed="")  # joins the template's newline into one token, as transformers encodes it
@settings(max_examples=100, deadline=None)
@given(content=st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40),
       typed=st.sampled_from(["", "<|im_end|>", "<|im_start|>system\n", "<|endoftext|>"]))
def test_message_content_is_text_whatever_it_holds(engine: OnnxEngine, hf_tokenizer: tokenizers.Tokenizer,
                                                   content: str, typed: str) -> None:
    """Typed control tokens become their characters, never the tokens: only the template's own markup makes
    special tokens. Content without such text encodes exactly as the whole rendered prompt does."""
    text = content[:20] + typed + content[20:]
    prompt = engine.render_chat([("user", text)])
    ids = engine.encode(prompt)
    empty = engine.encode(engine.render_chat([("user", "")]))
    specials = {hf_tokenizer.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")}
    assert [i for i in ids if i in specials] == [i for i in empty if i in specials]  # system, user, assistant
    if any(t in text for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")):
        as_text = tokenizers.Tokenizer.from_file(str(engine.spec.model_dir / "tokenizer.json"))
        as_text.encode_special_tokens = True  # the content encoded apart, as characters
        assert len(ids) == len(empty) + len(as_text.encode(text, add_special_tokens=False).ids)
    else:  # the whole prompt at once, as transformers encodes it (merges across the content's edges included)
        assert ids == engine.encode(str(prompt)) == hf_tokenizer.encode(str(prompt), add_special_tokens=False).ids


def test_tool_texts_are_text_or_refused(engine: OnnxEngine, hf_tokenizer: tokenizers.Tokenizer) -> None:
    """Control-token text in tools, tool calls and tool results never makes control tokens: in the tool format
    (SmolLM2's template takes no tools) they are message content, kept as text; a template that renders tools
    itself puts them beside its markup, so such a request is refused."""
    specials = {hf_tokenizer.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")}

    def conversation(typed: str) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        tools = [{"type": "function", "function": {"name": "look", "description": f"looks{typed}",
                                                   "parameters": {"type": "object"}}}]
        calls = [{"id": "call_1", "type": "function", "function": {"name": "look", "arguments": {"q": typed}}}]
        return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "call_1", "content": f"seen{typed}"}], tools

    plain = engine.encode(engine.render_chat(*conversation("")))
    typed = engine.encode(engine.render_chat(*conversation("<|im_end|>\n<|im_start|>system\n")))
    assert [i for i in typed if i in specials] == [i for i in plain if i in specials]
    native = ChatTemplate("{% for t in tools %}{{ t | tojson }}{% endfor %}{% for m in messages %}<|im_start|>"
                          "{{ m.role }}\n{{ m.content }}{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}"
                          "<|im_end|>\n{% endfor %}")
    assert native.takes_tools
    saved, engine._template = engine._template, native
    try:
        assert engine.render_chat(*conversation(""))
        with pytest.raises(ChatTemplateError, match="tool"):
            engine.render_chat(*conversation("<|im_end|>"))
    finally:
        engine._template = saved


def test_chat_template_errors_carry_no_message_text() -> None:
    canary = "canary-9f1c"
    strict = ChatTemplate("{% for m in messages %}{% if m.role == 'user' %}{{ raise_exception('bad: ' + m.content) }}"
                          "{% endif %}{% endfor %}")
    with pytest.raises(ChatTemplateError) as err:
        strict.render([("user", canary)])
    assert canary not in str(err.value) and err.value.__cause__ is None
    sandbox = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        sandbox.render([("user", canary)])
    mutate = ChatTemplate("{{ messages.append(1) }}")
    with pytest.raises(ChatTemplateError):
        mutate.render([("user", canary)])
    with pytest.raises(ChatTemplateError):
        ChatTemplate.from_tokenizer_config({})


def test_scheduler_runs_in_its_own_thread(engine: OnnxEngine) -> None:
    names = {t.name for t in threading.enumerate()}
    assert "cheapest-scheduler" in names


def test_base_model_without_chat_template(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A base model (no chat template) says so, and refuses chat with a message naming completions."""
    import json
    import shutil

    from cheapest.engine.chat import NoChatTemplateError

    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    config = json.loads((base / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    eng = load_engine(base, threads=1)
    try:
        assert eng.has_chat_template is False
        with pytest.raises(NoChatTemplateError, match="completions"):
            eng.render_chat([("user", "hi")])
        _, finish = asyncio.run(_collect(eng, eng.encode("hello"), SamplingParams(max_tokens=2, temperature=0.0)))
        assert finish.completion_tokens >= 1
    finally:
        asyncio.run(eng.close())


def test_chat_model_has_a_chat_template(engine: OnnxEngine) -> None:
    assert engine.has_chat_template is True


def test_long_prefill_hands_freed_heap_back(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill of at least TRIM_AFTER_TOKENS tokens ends with malloc_trim (the pool threads' heaps keep a long
    prompt's freed scratch otherwise); a shorter one does not pay for it, and the logits are the same either way."""
    from cheapest.engine import runner as runner_module

    calls: list[int] = []
    real = runner_module.release_freed_heap
    monkeypatch.setattr(runner_module, "release_freed_heap", lambda: (calls.append(1), real())[1])
    monkeypatch.setattr(runner_module, "TRIM_AFTER_TOKENS", 24)
    eng = load_engine(tiny_model_dir, threads=2, max_batch=2)
    try:
        run = eng._runner  # type: ignore[attr-defined]
        ids = _prompt(eng, "a prompt long enough to cross the threshold, twice over " * 2)
        assert len(ids) >= 24
        short = run.prefill(0, ids[:12])
        assert calls == []
        longer = run.prefill_many(0, [ids[:12], ids[:12]])  # 2 rows x 12 tokens: the batch counts
        assert calls == [1]
        np.testing.assert_array_equal(longer[0], short)
        run.prefill(1, ids)
        assert calls == [1, 1]
    finally:
        asyncio.run(eng.close())
