"""The sentence-embedding engine: a converted encoder (cheapest.convert.bert) served by one batching thread.

Every input of every request waiting when the thread wakes goes into one pool; the pool is sorted by length and
cut into ONNX runs of at most BATCH_TOKENS padded tokens, where no row is padded to more than twice its own
length (+ PAD_SLACK tokens), so a short sentence never pays for a long one's padding. Concurrent requests
therefore share runs, and the inputs of one request are batched by length. `embed` awaits its vectors on the
request's event loop; the ONNX runs happen in the engine's thread (ONNX Runtime releases the GIL), so the loop
never blocks. A request that goes away is dropped from the pool before its next run.

Text lives only in the request: the engine sees token ids, and errors carry counts, never text.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import msgspec
import numpy as np
import onnxruntime as ort

from cheapest.engine.loader import CPU, SPIN_US, choose_graph, choose_providers, load_tokenizer, session_options
from cheapest.engine.types import EngineError
from cheapest.metrics import metrics
from cheapest.model_layout import (
    ATTENTION_MASK, CONFIG, INPUT_IDS, SENTENCE_CONFIG, SENTENCE_EMBEDDING, TOKEN_TYPE_IDS, SentenceConfig,
)

log = logging.getLogger("cheapest.engine")

BATCH_TOKENS = 8192  # padded tokens in one run (32 inputs of 256 tokens; attention scores ~100 MB)
PAD_SLACK = 8  # a row may be padded to 2 x its length + this


class _EncoderConfig(msgspec.Struct, frozen=True):
    hidden_size: int
    vocab_size: int


class _Job:
    """One request's inputs and where their vectors go."""

    __slots__ = ("vectors", "left", "loop", "future", "cancelled")

    def __init__(self, count: int, dims: int, loop: asyncio.AbstractEventLoop) -> None:
        self.vectors = np.empty((count, dims), np.float32)
        self.left = count
        self.loop = loop
        self.future: asyncio.Future[np.ndarray] = loop.create_future()
        self.cancelled = False


def _resolve(future: asyncio.Future[np.ndarray], value: np.ndarray | BaseException) -> None:
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


def plan_batches(lengths: Sequence[int], budget: int = BATCH_TOKENS) -> list[list[int]]:
    """Indices into `lengths` grouped into runs: by length, each run within `budget` padded tokens, no row padded
    past twice its length + PAD_SLACK."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    runs: list[list[int]] = []
    run: list[int] = []
    for i in order:
        if run:
            shortest, longest = lengths[run[0]], lengths[i]  # ascending: the newcomer is the longest
            if longest * (len(run) + 1) > budget or longest > 2 * shortest + PAD_SLACK:
                runs.append(run)
                run = []
        run.append(i)
    if run:
        runs.append(run)
    return runs


class EmbeddingEngine:
    """An encoder model directory: `tokenize` (the model's tokenizer, with its special tokens), `wrap` (token ids
    given by a client get the same special tokens), `embed` (vectors, batched with everyone else's)."""

    provider: str

    def __init__(self, model_dir: str | os.PathLike[str], *, threads: int | None = None, spin_us: int = SPIN_US,
                 shared_arena: bool = False, providers: Sequence[str] | None = None, huge_pages: bool = True) -> None:
        model_dir = Path(model_dir)
        try:
            config = msgspec.json.decode((model_dir / CONFIG).read_bytes(), type=_EncoderConfig)
            sentence = msgspec.json.decode((model_dir / SENTENCE_CONFIG).read_bytes(), type=SentenceConfig)
        except (OSError, msgspec.DecodeError) as e:
            raise EngineError("the embedding model directory lacks its config files") from e
        self.model_id = model_dir.name
        self.dimensions = config.hidden_size
        self.vocab_size = config.vocab_size
        self.context_length = sentence.max_seq_length  # tokens per input, special tokens included
        self.tokenizer = load_tokenizer(model_dir)
        # The special tokens the tokenizer puts around a text ([CLS] ... [SEP]): around an empty one, the first
        # is the prefix and the rest the suffix (single-sequence templates).
        around = list(self.tokenizer.encode("", add_special_tokens=True))
        self._prefix, self._suffix = around[:1], around[1:]
        chosen = choose_providers(list(providers) if providers is not None else None)
        graph = choose_graph(model_dir)
        try:
            self._session = ort.InferenceSession(
                str(graph), providers=chosen,
                sess_options=session_options(threads, spin_us=spin_us, shared_arena=shared_arena and chosen == [CPU],
                                             huge_pages=huge_pages))
        except Exception as e:  # ORT's own exception types
            raise EngineError("the embedding graph could not be loaded") from e
        self.provider = self._session.get_providers()[0]
        self._types = TOKEN_TYPE_IDS in {i.name for i in self._session.get_inputs()}
        self._pool: list[tuple[_Job, int, list[int]]] = []
        self._cv = threading.Condition()
        self._closing = False
        self.runs = 0  # ONNX runs so far (tests and benchmarks)
        self._series = metrics.scheduler(self.model_id)  # queue and run sizes (a no-op when metrics are off)
        self._thread = threading.Thread(target=self._loop, name="cheapest-embedding", daemon=True)
        self._thread.start()
        log.info("embedding model loaded: id=%s provider=%s dims=%d graph=%s", self.model_id, self.provider,
                 self.dimensions, graph.name)

    # --- tokens -------------------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def wrap(self, ids: Sequence[int]) -> list[int]:
        """Client token ids (a text's tokens, without special tokens) as the model reads them."""
        return [*self._prefix, *ids, *self._suffix]

    def truncate(self, ids: list[int], limit: int) -> list[int]:
        """The first tokens of a wrapped input, its closing special tokens kept, in `limit` tokens."""
        keep = max(limit - len(self._suffix), len(self._prefix))
        return ids[:keep] + self._suffix

    # --- vectors ------------------------------------------------------------------------------------------------

    async def embed(self, inputs: Sequence[list[int]]) -> np.ndarray:
        """float32 [len(inputs), dimensions] for wrapped token ids (each within the context length)."""
        if any(not 0 <= t < self.vocab_size for ids in inputs for t in ids):
            raise EngineError("input token id out of range")
        job = _Job(len(inputs), self.dimensions, asyncio.get_running_loop())
        if not inputs:
            return job.vectors
        with self._cv:
            if self._closing:
                raise EngineError("the engine is closed")
            self._pool.extend((job, i, list(ids)) for i, ids in enumerate(inputs))
            self._cv.notify()
        try:
            return await job.future
        finally:
            job.cancelled = True  # a request that went away: its inputs are skipped

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closing and not self._pool:
                    self._cv.wait()
                if self._closing:
                    break
                pool, self._pool = [p for p in self._pool if not p[0].cancelled], []
            self._series.queue(0, len(pool))
            for run in plan_batches([len(ids) for _, _, ids in pool]):
                items = [pool[i] for i in run if not pool[i][0].cancelled]
                if items:
                    self._run(items)
            self._series.queue(len(self._pool), 0)
        for job, _, _ in self._pool:
            job.loop.call_soon_threadsafe(_resolve, job.future, EngineError("the engine is closed"))

    def _run(self, items: list[tuple[_Job, int, list[int]]]) -> None:
        longest = max(len(ids) for _, _, ids in items)
        ids = np.zeros((len(items), longest), np.int64)
        mask = np.zeros((len(items), longest), np.int64)
        for row, (_, _, tokens) in enumerate(items):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        feeds = {INPUT_IDS: ids, ATTENTION_MASK: mask}
        if self._types:
            feeds[TOKEN_TYPE_IDS] = np.zeros_like(ids)
        try:
            vectors = self._session.run([SENTENCE_EMBEDDING], feeds)[0]
        except Exception as e:  # noqa: BLE001 - the run's requests fail; the thread goes on
            log.error("embedding run failed: %s", type(e).__name__)
            for job in {id(j): j for j, _, _ in items}.values():
                job.loop.call_soon_threadsafe(_resolve, job.future, EngineError("inference failed"))
            return
        self.runs += 1
        self._series.step(len(items))
        for row, (job, index, _) in enumerate(items):
            job.vectors[index] = vectors[row]
            job.left -= 1
            if job.left == 0:
                try:
                    job.loop.call_soon_threadsafe(_resolve, job.future, job.vectors)
                except RuntimeError:  # its event loop is gone: nobody is waiting
                    pass

    async def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        await asyncio.to_thread(self._thread.join)


def is_embedding_model(model_dir: str | os.PathLike[str]) -> bool:
    """A directory in the sentence-embedding layout (its sentence_bert_config.json says so)."""
    return (Path(model_dir) / SENTENCE_CONFIG).is_file()
