"""Constrained decoding with llguidance: compile a grammar, give each sequence its own matcher, and compute the
next token masks of a batch off the critical path.

llguidance (the grammar engine llama.cpp, vLLM and ONNX Runtime GenAI use) takes Lark grammars with JSON
Schemas embedded (`%json {...}`); its matchers consume tokens and write bitmasks of the tokens allowed next
(one bit per vocabulary entry, 32 to an int32). Its tokenizer view (`LLTokenizer`) is built once per model,
when the first request with a grammar needs it, in a thread of its own, which a worker that never sees such a
request never pays; callers on the event loop wait for it with `await ready()`. Where the core tokenizer knows
each token's bytes (byte-level and SentencePiece BPE: `Tokenizer.token_bytes`) the view is built from those and
the core's own encoder (`_CoreVocabulary`, through llguidance's `TokenizerWrapper`), the same view its
tokenizer.json reader builds (every token's bytes and special flag compared in tests) without loading a second
copy of the vocabulary in the `tokenizers` crate: Gemma 3's first grammar request takes ~1.0-1.2 s and ~114 MiB
resident that way, ~2.0-2.3 s and ~204 MiB from tokenizer.json (`bench/bench_first_requests.py`; SmolLM2's 49k
tokens: ~0.15 s and ~20 MiB against ~0.2 s and ~30 MiB). Other tokenizers are read from tokenizer.json.

Why a worker thread: a decode step's token N is known before the step's model run starts, and the mask for the
logits that run produces depends only on tokens up to N. So while ONNX Runtime runs the step (it releases the
GIL), `MaskWorker` has each constrained sequence's matcher consume token N and write its mask for step N+1;
the scheduler waits for the masks only after the model run returns. A batch without constrained sequences
never touches the worker.

Errors carry no request text: llguidance's messages may quote the grammar (a client's schema), so they are
replaced by a generic one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import llguidance
import numpy as np
from llguidance.numpy import (
    allocate_token_bitmask, consume_token_par, fill_next_token_bitmask, fill_next_token_bitmask_par,
)

from cheapest.engine.loader import AddedTokens, Tokenizer
from cheapest.engine.types import Grammar, GrammarError

# Bounds on the work one grammar may cause (llguidance's defaults are for trusted grammars; these are a
# client's): Earley items per token, lexer states, and the fuel spent on one mask.
LIMITS = llguidance.LLParserLimits(max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
                                   step_max_items=50_000, max_lexer_states=50_000, max_grammar_size=500_000)


class LlgGrammar(Grammar):
    """A grammar llguidance has validated against this model's tokenizer."""

    __slots__ = ("serialized",)

    def __init__(self, serialized: str) -> None:
        self.serialized = serialized


class _CoreVocabulary:
    """What llguidance's `TokenizerWrapper` reads, from the core tokenizer: every token's bytes, the ids it treats
    as special (as its tokenizer.json reader does, toktrie_hf_tokenizers: added tokens marked special or written
    `<...>`), EOS, and the encoder (no BOS; added tokens in the text are recognized, as the `tokenizers` crate
    does). Tested to build the same view as that reader on the tiny models of both kinds and on Gemma 3."""

    def __init__(self, core: Tokenizer, tokens: list[bytes], added: list[int], eos: int) -> None:
        self.tokens = tokens
        self.special_token_ids = added
        self.eos_token_id = eos
        self.bos_token_id = None
        self._core = core

    def __call__(self, text: bytes) -> list[int]:
        return self._core.encode(text.decode("utf-8"), add_special_tokens=False)

    @classmethod
    def of(cls, core: Tokenizer, path: Path, eos: list[int]) -> _CoreVocabulary | None:
        """None where the core cannot give every token's bytes (the crate's other shapes), there is no EOS, or the
        encoder adds to a text (a SentencePiece space prefix: llguidance's own reader strips it from the pieces
        of text it tokenizes mid-generation, a plain encoder would not)."""
        if not eos:
            return None
        for probe in ("a", "Hello world", " x"):
            ids = core.encode(probe, add_special_tokens=False)
            if b"".join(core.token_bytes(i) or b"\0" for i in ids) != probe.encode():
                return None
        tokens: list[bytes] = []
        while True:
            try:
                raw = core.token_bytes(len(tokens))
            except ValueError:  # TokenizerError: past the vocabulary
                break
            if raw is None:
                return None
            tokens.append(raw)
        added = AddedTokens.read(path)
        special = sorted(t.id for t in added if t.special or (t.content.startswith("<") and t.content.endswith(">")))
        return cls(core, tokens, special, eos[0])


class GrammarCompiler:
    """One model's llguidance tokenizer (built on first use) and the grammars compiled against it."""

    def __init__(self, tokenizer_path: Path, vocab_size: int, eos_token_ids: Sequence[int],
                 core: Tokenizer | None = None) -> None:
        self.vocab_size = vocab_size
        self._path = tokenizer_path
        self._core = core
        self._eos = sorted(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._failed = False
        self._started = False
        self._start_lock = threading.Lock()
        self._ready = threading.Event()

    def _start(self) -> None:
        with self._start_lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._build, name="cheapest-grammar-tokenizer", daemon=True).start()

    async def ready(self) -> None:
        """Until the tokenizer is built (or failed), without holding the event loop."""
        if not self._ready.is_set():
            self._start()
            await asyncio.to_thread(self._ready.wait)

    def _build(self) -> None:
        try:
            vocabulary = None if self._core is None else _CoreVocabulary.of(self._core, self._path, self._eos)
            if vocabulary is not None:
                wrapper = llguidance.TokenizerWrapper(vocabulary)
                self._tokenizer = llguidance.LLTokenizer(wrapper, n_vocab=self.vocab_size, eos_token=self._eos)
                # llguidance copied every token's bytes into its trie; the lists (~15 MiB for Gemma 3) can go.
                wrapper.tokens = vocabulary.tokens = []
            else:
                tokenizer_json = self._path.read_text(encoding="utf-8")
                self._tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=self.vocab_size,
                                                         eos_token=self._eos or None)
        except Exception:  # noqa: BLE001 - a tokenizer llguidance cannot read: constrained requests are refused
            self._failed = True
        finally:
            self._ready.set()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if not self._ready.is_set():
            self._start()
            self._ready.wait()
        if self._tokenizer is None:
            raise GrammarError("constrained decoding is not available for this model's tokenizer")
        return self._tokenizer

    def compile(self, lark: str) -> LlgGrammar:
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer, limits=LIMITS)
        if error:
            raise GrammarError("the grammar engine cannot compile this constraint")
        return LlgGrammar(grammar)

    def constraint(self, grammar: LlgGrammar, eos_token: int) -> Constraint:
        matcher = llguidance.LLMatcher(self.tokenizer, grammar.serialized, log_level=0, limits=LIMITS)
        if matcher.is_error():
            raise GrammarError("the grammar engine cannot compile this constraint")
        return Constraint(matcher, eos_token)


class Constraint:
    """One sequence's matcher. The scheduler thread records each sampled token in `pending`; the mask worker
    feeds it to the matcher and writes the next mask into its slot of the worker's buffer."""

    __slots__ = ("matcher", "pending", "slot", "eos_token")

    def __init__(self, matcher: llguidance.LLMatcher, eos_token: int) -> None:
        self.matcher = matcher
        self.pending = -1  # the sampled token the matcher has not consumed yet
        self.slot = -1  # this step's row in MaskWorker.masks
        self.eos_token = eos_token  # what a sequence whose grammar allows nothing more ends with


class MaskWorker:
    """One thread that computes a batch's masks (llguidance's executor spreads them over its own threads)."""

    def __init__(self, vocab_size: int, rows: int) -> None:
        self.vocab_size = vocab_size
        self.masks = allocate_token_bitmask(rows, vocab_size)
        self._executor = llguidance.LLExecutor(num_threads=2)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cheapest-masks")

    def start(self, constraints: Sequence[Constraint]) -> Future[None]:
        """Consume each constraint's pending token and compute its next mask, in the worker thread."""
        if len(constraints) > self.masks.shape[0]:
            self.masks = allocate_token_bitmask(len(constraints), self.vocab_size)
        for slot, c in enumerate(constraints):
            c.slot = slot
        return self._pool.submit(self._compute, list(constraints))

    def _compute(self, constraints: list[Constraint]) -> None:
        if len(constraints) == 1:  # one matcher: llguidance's executor would only add a hand-off (~15 us)
            (c,) = constraints
            if c.pending >= 0:
                c.matcher.consume_token(c.pending)
                c.pending = -1
            fill_next_token_bitmask(c.matcher, self.masks, c.slot)
            return
        fed = [(c.matcher, c.pending) for c in constraints if c.pending >= 0]
        if fed:
            consume_token_par(self._executor, fed)
        for c in constraints:
            c.pending = -1
        fill_next_token_bitmask_par(self._executor, [(c.matcher, c.slot) for c in constraints], self.masks)

    def allowed(self, c: Constraint) -> np.ndarray:
        """The tokens c's grammar allows now: its bitmask row (int32 words, bit i%32 of word i//32), what
        `cheapest_core.Sampler.sample` takes as is."""
        mask: np.ndarray = self.masks[c.slot]
        return mask

    def close(self) -> None:
        self._pool.shutdown(wait=False)
