"""The ONNX Runtime engine: one loaded model directory shared by every request of the process.

`generate` hands a sequence to the scheduler thread (batching.py) and awaits its output on the request's
event loop; nothing here blocks the loop. Per-token text handling (incremental UTF-8-safe detokenization,
stop strings held back until they can no longer match, EOS, max_tokens) runs in the scheduler thread, and
each result is passed to the loop with `call_soon_threadsafe`. Stop strings are matched by the core's
`StopMatcher` (Aho-Corasick, linear in the text whatever the stops), so no request's stops can slow the step
that every request of the worker shares.

Text never leaves memory: errors carry token counts or generic messages only.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from typing import Any

from cheapest_core import StopMatcher

from cheapest.engine.batching import Scheduler
from cheapest.engine.batching import Sequence as BatchSequence
from cheapest.engine.chat import ChatPrompt, ChatTemplate, ChatTemplateError
from cheapest.engine.grammar import GrammarCompiler, LlgGrammar
from cheapest.engine.loader import CPU, SPIN_US, IncrementalDecoder, ModelSpec, TextTokenizer, Tokenizer, \
    choose_providers, load_tokenizer, open_session, read_model_dir, release_freed_heap, served_graph
from cheapest.engine.logprobs import TokenTexts
from cheapest.engine.runner import ConcatKv, KvRunner, SharedBufferKv
from cheapest.engine.sampling import Sampler
from cheapest.engine.types import ContextLengthError, Delta, EngineError, Finish, FinishReason, Grammar, \
    GrammarError, SamplingParams, TokenLogprob
from cheapest.model_layout import TOKENIZER

_CLOSED = "the engine is closed"


def _contents(messages: Sequence[tuple[str, str] | Mapping[str, Any]]) -> Iterator[str]:
    for m in messages:
        content = m[1] if isinstance(m, tuple) else m.get("content")
        if isinstance(content, str):
            yield content


def _tool_texts(messages: Sequence[tuple[str, str] | Mapping[str, Any]],
                tools: Sequence[Mapping[str, Any]] | None) -> Iterator[str]:
    """What a request's tools and tool calls put into the prompt (as JSON, the way templates render it)."""
    if tools:
        yield json.dumps(list(tools), ensure_ascii=False)
    for m in messages:
        if not isinstance(m, tuple) and m.get("tool_calls"):
            yield json.dumps(m["tool_calls"], ensure_ascii=False)


class _Output:
    """One sequence's token -> text pipeline; called by the scheduler thread. With logprobs asked for, each
    Delta carries the entries of the tokens consumed since the last one (EOS excluded)."""

    def __init__(self, decoder: IncrementalDecoder, params: SamplingParams, eos: frozenset[int], budget: int,
                 deliver: Callable[[Delta | Finish | BaseException], None], index: int = 0,
                 sampler: Sampler | None = None) -> None:
        self._decoder = decoder
        # StopStringError (a ValueError) past 16 stops of 256 characters; the API allows 4.
        self._stop = StopMatcher(params.stop)
        self._eos = eos
        self._budget = budget
        self._deliver = deliver
        self._count = 0
        self._index = index
        self._sampler = sampler if params.logprobs is not None else None
        self._logprobs: list[TokenLogprob] = []

    def accept(self, token: int) -> bool:
        self._count += 1
        if token in self._eos:  # EOS ends the text; its own text is never shown
            return self._finish("stop", "", self._decoder.flush())
        if self._sampler is not None and self._sampler.last is not None:
            self._logprobs.append(self._sampler.last)
        text, stopped = self._stop.push(self._decoder.push(token))
        if stopped:
            return self._finish("stop", text, None)
        if self._count >= self._budget:
            return self._finish("length", text, self._decoder.flush())
        self._deliver(self._delta(text))
        return False

    def _delta(self, text: str) -> Delta:
        if not self._logprobs:
            return Delta(text, self._count, self._index)
        entries, self._logprobs = tuple(self._logprobs), []
        return Delta(text, self._count, self._index, entries)

    def _finish(self, reason: FinishReason, text: str, tail: str | None) -> bool:
        if tail is not None:  # the decoder's last bytes may still complete a stop string
            more, stopped = self._stop.push(tail)
            text += more if stopped else more + self._stop.flush()
            reason = "stop" if stopped else reason
        self._deliver(self._delta(text))
        self._deliver(Finish(reason, self._count, self._index, self._stop.matched))
        return True


class OnnxEngine:
    instant = False  # generation runs in the scheduler thread; the request's loop awaits each token

    def __init__(self, spec: ModelSpec, tokenizer: Tokenizer, runner: KvRunner, provider: str,
                 chat_template: str | None = None) -> None:
        self.model_id = spec.model_id
        self.context_length = spec.context_length
        self.vocab_size = spec.vocab_size
        self.provider = provider
        self.spec = spec
        self.tokenizer = tokenizer
        self._runner = runner
        # A template the operator configured for this model wins over the model's own.
        self._template: ChatTemplate | None = None if chat_template is None else ChatTemplate(
            chat_template, ChatTemplate.special_tokens(spec.tokenizer_config))
        # A base model (Gemma 3 270M) has none: render_chat raises NoChatTemplateError, completions still work.
        self.has_chat_template = chat_template is not None or ChatTemplate.present(spec.tokenizer_config)
        self._text = TextTokenizer(spec.model_dir / TOKENIZER) if self.has_chat_template else None
        self._scheduler = Scheduler(runner, spec.model_id)
        self._grammars = GrammarCompiler(spec.model_dir / TOKENIZER, spec.vocab_size, sorted(spec.eos_token_ids),
                                         tokenizer)
        self._eos_token = min(spec.eos_token_ids, default=0)
        self._texts = TokenTexts(self._token_bytes)
        self._own_token_bytes = spec.vocab_size > 0 and tokenizer.token_bytes(0) is not None

    def _token_bytes(self, token: int) -> bytes:
        """One token's bytes for logprobs: the core tokenizer's own (byte-level and SentencePiece BPE), so a
        logprobs request does not build llguidance's view of the vocabulary (Gemma 3: ~2 s and ~140 MiB);
        llguidance's for other tokenizer shapes."""
        raw = self.tokenizer.token_bytes(token)
        return raw if raw is not None else self._grammars.tokenizer.decode_bytes([token])

    # --- text ---------------------------------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[tuple[str, str] | Mapping[str, Any]],
                    tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        if self._template is None:
            self._template = ChatTemplate.from_tokenizer_config(self.spec.tokenizer_config)
        prompt = self._template.render(messages, tools=tools)
        if not prompt.parts and any(self._has_special(content) for content in _contents(messages)):
            # The template changes message content, so content cannot be told from markup in its output.
            raise ChatTemplateError("a message holds a control token's text, which this model's chat template "
                                    "cannot keep as text")
        if self._template.takes_tools and any(self._has_special(text) for text in _tool_texts(messages, tools)):
            # A template that renders tools itself puts their definitions and call arguments beside its markup
            # (in the tool format they are message content, kept as text like the rest).
            raise ChatTemplateError("a tool definition or tool call holds a control token's text")
        return prompt

    async def grammar_ready(self) -> None:
        await self._grammars.ready()

    def compile_grammar(self, grammar: str) -> Grammar:
        return self._grammars.compile(grammar)

    def encode(self, text: str, *, special_tokens: bool = False) -> list[int]:
        """Prompt text -> ids; `special_tokens`: the tokenizer's own additions (BOS) for a text prompt. The
        rendered template already holds its special tokens (BOS included where the model wants it); the message
        content inside it is text, whatever it contains."""
        parts = text.parts if isinstance(text, ChatPrompt) else ()
        whole = list(self.tokenizer.encode(text, add_special_tokens=special_tokens and not parts))
        if not parts or self._text is None:
            return whole
        # Content that makes no control token: the whole prompt encoded at once, as transformers does (pieces
        # encoded apart would split merges across their joins, e.g. content starting with a newline).
        # (Not cached: a template's markup can hold request text, such as tool definitions it renders itself.)
        specials = self._text.special_ids
        markup = self.tokenizer.encode("".join(p for p, content in parts if not content), add_special_tokens=False)
        if sum(i in specials for i in whole) == sum(i in specials for i in markup):
            return whole
        ids: list[int] = []
        for part, content in parts:
            piece = self.tokenizer.encode(part, add_special_tokens=False)
            if content and not specials.isdisjoint(piece):
                piece = self._text.encode(part)  # typed control tokens: their characters, not the tokens
            ids += piece
        return ids

    def _has_special(self, text: str) -> bool:
        return self._text is not None and not self._text.special_ids.isdisjoint(
            self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # --- generation ---------------------------------------------------------------------------------------------

    @property
    def active_sequences(self) -> int:
        return self._scheduler.active + self._scheduler.waiting

    @property
    def decode_steps(self) -> int:
        return self._scheduler.steps

    @property
    def prefill_runs(self) -> int:
        return self._scheduler.prefill_runs

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[Delta | Finish, None]:
        if not prompt_ids:  # an empty completion prompt: start from BOS, as the model was trained to
            if self.spec.bos_token_id is None:
                raise EngineError("the prompt has no tokens and the model has no BOS token")
            prompt_ids = [self.spec.bos_token_id]
        if len(prompt_ids) >= self.context_length:
            raise ContextLengthError(len(prompt_ids), self.context_length)
        if params.max_tokens < 1:
            yield Finish("length", 0)
            return
        vocab = self.spec.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise EngineError("prompt token id out of range")
        if params.grammar is not None and not isinstance(params.grammar, LlgGrammar):
            raise EngineError("the grammar was compiled by another engine")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta | Finish | BaseException] = asyncio.Queue()

        def deliver(item: Delta | Finish | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)  # RuntimeError once the loop is gone: dropped

        budget = min(params.max_tokens, self.context_length - len(prompt_ids))
        if params.grammar is not None or (params.logprobs is not None and not self._own_token_bytes):
            await self._grammars.ready()  # built on first use; the scheduler thread must not wait for it
        texts = self._texts if params.logprobs is not None else None
        seqs: list[BatchSequence] = []
        try:
            for index in range(params.n):
                sampler = Sampler(params, stream=index, texts=texts)
                output = _Output(self.tokenizer.decoder(), params, self.spec.eos_token_ids, budget, deliver, index,
                                 sampler)
                constraint = None if params.grammar is None else \
                    self._grammars.constraint(params.grammar, self._eos_token)
                seqs.append(BatchSequence(list(prompt_ids), sampler, output.accept, deliver, constraint))
        except GrammarError:
            raise EngineError("the grammar could not be matched") from None
        seqs[0].siblings = seqs[1:]
        try:
            self._scheduler.submit(seqs[0])
        except RuntimeError:
            raise EngineError(_CLOSED) from None
        running = params.n
        try:
            while running:
                item = await queue.get()
                if isinstance(item, BaseException):
                    message = _CLOSED if str(item) == _CLOSED else "inference failed"
                    raise EngineError(message) from None
                yield item
                if isinstance(item, Finish):
                    running -= 1
        finally:
            for seq in seqs:
                seq.cancel()
            self._scheduler.wake()

    async def close(self) -> None:
        await asyncio.to_thread(self._scheduler.close)


def load_engine(model_dir: str | os.PathLike[str], *, threads: int | None = None,
                providers: Sequence[str] | None = None, max_batch: int | None = None,
                graph: str | None = None, spin_us: int = SPIN_US, chat_templates: Mapping[str, str] | None = None,
                shared_arena: bool = False, huge_pages: bool = True, **runner_options: Any) -> OnnxEngine:
    """Open a model directory. `graph` picks a file under onnx/ (default: the served graph,
    model_cpu.onnx on the CPU provider where the directory has it, else model.onnx).
    `spin_us`: how long idle ONNX Runtime pool threads spin before sleeping (0 = never spin; see loader.py).
    `chat_templates`: model id -> a chat template replacing the model's own (or standing in for a missing one).
    `shared_arena`: the session allocates from the process's one CPU arena (several models in one process).
    `huge_pages`: the core's operators copy their weights into transparent huge pages (loader.session_options)."""
    chosen = choose_providers(providers)
    spec = read_model_dir(model_dir, graph=graph or served_graph(model_dir, chosen))
    session = open_session(spec, threads=threads, providers=chosen, spin_us=spin_us, shared_arena=shared_arena,
                           huge_pages=huge_pages)
    provider = session.get_providers()[0]
    try:
        runner: KvRunner
        if spec.kv_layout == "shared_buffer":
            device = "cpu" if provider == CPU else "cuda"
            runner = SharedBufferKv(session, spec, max_batch or (16 if device == "cpu" else 64), device=device,
                                    **runner_options)
        else:
            runner = ConcatKv(session, spec, max_batch or 16)
    except ValueError as e:
        raise EngineError("the model graph does not match the model directory") from e
    engine = OnnxEngine(spec, load_tokenizer(spec.model_dir), runner, provider, (chat_templates or {}).get(spec.model_id))
    release_freed_heap()
    return engine
