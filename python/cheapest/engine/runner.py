"""One ONNX Runtime session and its KV cache, run as batch rows: prefill a row, decode all rows one step.

Rows are the scheduler's batch positions (0..n-1). Two cache layouts:

SharedBufferKv (graphs with GroupQueryAttention): one preallocated buffer per layer and K/V, shape
[max_batch, n_kv, capacity, head_dim], right-padded. Past and present are bound to the SAME memory, so GQA
appends the new position in place and nothing is copied per step (GQA detects the shared buffer by pointer
equality). Rows are the leading axis, so rows 0..n-1 are one contiguous view and a decode step of n rows binds
that view. Measured on SmolLM2-135M, 2 cores: see bench/bench_inference.py; the copying alternative (present ->
next past) costs O(total cache) per step and grows with context length.

ConcatKv (plain graphs, e.g. the fp32 reference or exports made elsewhere): the graph concatenates past and
new K/V; the batch is left-padded with attention_mask zeros and explicit position_ids. Joining and leaving
rows copies the cache; every step allocates the presents. It is the compatible path, not the fast one.
"""

from __future__ import annotations

import mmap
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from cheapest.engine.loader import ModelSpec, release_freed_heap
from cheapest.model_layout import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, past_names, present_names

_ORT_TO_NUMPY: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
}

# A prefill's activations grow with its prompt (a 500-token prompt: ~150 MiB on SmolLM2); decode steps need a
# small, steady amount. Shrinking the CPU arena after each prefill hands the prompt-sized peak back to the OS
# instead of holding it for the process's life.
_SHRINK_ARENA = ort.RunOptions()
_SHRINK_ARENA.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
# The custom operators' scratch of a long prefill is allocated on ONNX Runtime's pool threads, in glibc's
# per-thread heaps, which keep what is freed (their trim threshold grows with the largest block ever freed, and
# loading a tokenizer frees a large one): Gemma 3 held ~21 MiB of them after a 500-token prompt. A prefill of
# at least this many tokens (rows x longest) ends with malloc_trim: ~4 ms when there is something to hand back,
# ~0.3 ms when not, against >= ~150 ms for the prefill itself.
TRIM_AFTER_TOKENS = 256


def _zeroed(shape: tuple[int, ...], dtype: type[np.generic]) -> np.ndarray:
    """A zero array on its own anonymous memory map: only the pages rows actually write become resident.
    (np.zeros may reuse freed heap memory and clear all of it: measured +95 MiB resident for one sequence when
    the buffers grew to 1024 positions x 8 rows, against +24 MiB here.)"""
    size = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return np.frombuffer(mmap.mmap(-1, size), dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def _dtype(type_str: str) -> type[np.generic]:
    try:
        return _ORT_TO_NUMPY[type_str]
    except KeyError:
        raise ValueError(f"unsupported tensor type {type_str}") from None


class KvRunner(ABC):
    """`supports_move`: rows can be compacted (CPU memory); otherwise the scheduler leaves holes.
    `batched_prefill`: prefill_many runs several prompts in one graph run.
    `supports_copy`: a prefilled row's cache can be copied into another row (n sequences from one prompt)."""

    supports_move: bool = True
    batched_prefill: bool = False
    supports_copy: bool = False

    def __init__(self, session: ort.InferenceSession, spec: ModelSpec, max_batch: int) -> None:
        self.session = session
        self.spec = spec
        self.max_batch = max_batch
        self.lengths = np.zeros(max_batch, dtype=np.int64)  # tokens in each row's cache
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        self.input_names = set(inputs)
        self.kv_names = [past_names(i) for i in range(spec.num_layers)]
        self.present_names = [present_names(i) for i in range(spec.num_layers)]
        missing = [n for pair in self.kv_names for n in pair if n not in inputs]
        missing += [n for pair in self.present_names for n in pair if n not in outputs]
        if INPUT_IDS not in inputs or LOGITS not in outputs or missing:
            raise ValueError("the graph does not have the expected inputs and outputs")
        self.kv_dtype = _dtype(inputs[self.kv_names[0][0]].type)
        self.logits_dtype = _dtype(outputs[LOGITS].type)

    def _common_feeds(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {INPUT_IDS: ids}
        if ATTENTION_MASK in self.input_names:
            feeds[ATTENTION_MASK] = mask
        if POSITION_IDS in self.input_names:
            feeds[POSITION_IDS] = positions
        return feeds

    @abstractmethod
    def prefill(self, row: int, ids: Sequence[int]) -> np.ndarray:
        """Fill `row`'s cache with `ids`; the logits after the last one, float32 [vocab]."""

    def prefill_many(self, first_row: int, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Prefill consecutive rows first_row.. with one prompt each; float32 logits [len(prompts), vocab]."""
        return np.stack([self.prefill(first_row + i, ids) for i, ids in enumerate(prompts)])

    @abstractmethod
    def decode(self, tokens: Sequence[int]) -> np.ndarray:
        """Append tokens[i] to row i for i < len(tokens); float32 logits [len(tokens), vocab].
        A negative token marks a hole: the row computes a throwaway position 0 and keeps length 0.
        The result may be a view of the runner's logits buffer, valid until the next call."""

    @abstractmethod
    def move(self, src: int, dst: int) -> None:
        """Row src's cache becomes row dst's (src is then free)."""

    def copy(self, src: int, dst: int) -> None:
        """Row dst gets a copy of row src's cache (only where `supports_copy`)."""
        raise NotImplementedError

    def release(self, row: int) -> None:
        self.lengths[row] = 0

    def reset(self) -> None:
        self.lengths[:] = 0


class SharedBufferKv(KvRunner):
    def __init__(self, session: ort.InferenceSession, spec: ModelSpec, max_batch: int, *,
                 device: str = "cpu", initial_capacity: int = 256, share_buffer: bool = True) -> None:
        super().__init__(session, spec, max_batch)
        self.batched_prefill = True
        self.device = device
        self.supports_move = self.supports_copy = device == "cpu"
        # share_buffer=False is the copying alternative, kept to measure against (bench_inference.py
        # --kv copy): present goes to a second buffer set, GQA copies the whole past into it every step, and
        # the two sets swap roles.
        self.share_buffer = share_buffer or device != "cpu"
        # Device memory cannot be resized or compacted from Python, so it gets the full context at once.
        self.capacity = spec.context_length if device != "cpu" else min(initial_capacity, spec.context_length)
        self._logits = np.zeros((max_batch, 1, spec.vocab_size), dtype=self.logits_dtype)
        self._bindings = [session.io_binding(), session.io_binding()]
        self._allocate(self.capacity)

    def _new_buffers(self, capacity: int) -> list[tuple[np.ndarray | ort.OrtValue, np.ndarray | ort.OrtValue]]:
        shape = (self.max_batch, self.spec.num_kv_heads, capacity, self.spec.head_dim)
        if self.device == "cpu":
            return [(_zeroed(shape, self.kv_dtype), _zeroed(shape, self.kv_dtype)) for _ in range(self.spec.num_layers)]
        return [tuple(
            ort.OrtValue.ortvalue_from_shape_and_type(list(shape), self.kv_dtype, self.device, 0) for _ in range(2)
        ) for _ in range(self.spec.num_layers)]

    def _allocate(self, capacity: int) -> None:
        self._buffers = self._new_buffers(capacity)
        self._spare = self._buffers if self.share_buffer else self._new_buffers(capacity)
        self.capacity = capacity
        self._row_bytes = self.spec.num_kv_heads * capacity * self.spec.head_dim * np.dtype(self.kv_dtype).itemsize
        # (rows, capacity, buffer set) each decode binding was made for; two alternate in copy mode
        self._bound: list[tuple[int, int, int] | None] = [None, None]
        self._flip = 0

    def _grow(self, needed: int) -> None:
        if needed > self.spec.context_length:
            raise ValueError("sequence exceeds the context length")
        if self.device != "cpu":
            raise ValueError("device KV buffer is full")
        old = self._buffers
        self._allocate(min(self.spec.context_length, max(needed, 2 * self.capacity)))
        # Only rows in use, only their length: untouched pages of the new buffer (np.zeros) stay unallocated.
        for row in np.flatnonzero(self.lengths):
            n = int(self.lengths[row])
            for (ok, ov), (nk, nv) in zip(old, self._buffers):
                nk[row, :, :n] = ok[row, :, :n]
                nv[row, :, :n] = ov[row, :, :n]

    def _ptr(self, buffer: np.ndarray | ort.OrtValue, row: int) -> int:
        base = buffer.ctypes.data if isinstance(buffer, np.ndarray) else buffer.data_ptr()
        return int(base) + row * self._row_bytes

    def _bind_kv(self, binding: ort.IOBinding, first_row: int, rows: int, shared: bool = True) -> None:
        shape = [rows, self.spec.num_kv_heads, self.capacity, self.spec.head_dim]
        present = self._buffers if shared else self._spare
        for (past_k, past_v), (present_k, present_v), (kbuf, vbuf), (kout, vout) in zip(
            self.kv_names, self.present_names, self._buffers, present
        ):
            binding.bind_input(past_k, self.device, 0, self.kv_dtype, shape, self._ptr(kbuf, first_row))
            binding.bind_input(past_v, self.device, 0, self.kv_dtype, shape, self._ptr(vbuf, first_row))
            binding.bind_output(present_k, self.device, 0, self.kv_dtype, shape, self._ptr(kout, first_row))
            binding.bind_output(present_v, self.device, 0, self.kv_dtype, shape, self._ptr(vout, first_row))

    def prefill(self, row: int, ids: Sequence[int]) -> np.ndarray:
        return self.prefill_many(row, [ids])[0]

    def prefill_many(self, first_row: int, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """One run for several prompts (GQA accepts a right-padded batch when there is no past)."""
        rows, longest = len(prompts), max(len(p) for p in prompts)
        if longest > self.capacity:
            self._grow(longest)
        lengths = np.asarray([len(p) for p in prompts], dtype=np.int64)
        ids = np.zeros((rows, longest), np.int64)  # padding id: any, it is masked out
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = p
        mask = (np.arange(longest, dtype=np.int64)[None, :] < lengths[:, None]).astype(np.int64)
        positions = np.broadcast_to(np.arange(longest, dtype=np.int64), (rows, longest)).copy()
        binding = self.session.io_binding()
        for name, value in self._common_feeds(ids, mask, positions).items():
            binding.bind_cpu_input(name, value)
        binding.bind_output(LOGITS, "cpu")  # first output bound = get_outputs()[0]
        self._bind_kv(binding, first_row, rows)
        self.session.run_with_iobinding(binding, _SHRINK_ARENA)
        if rows * longest >= TRIM_AFTER_TOKENS:
            release_freed_heap()
        logits = binding.get_outputs()[0].numpy()
        self.lengths[first_row : first_row + rows] = lengths
        if logits.shape[1] == 1:  # graphs that emit the last real token's logits only
            return np.asarray(logits[:, 0], dtype=np.float32)
        return np.asarray(logits[np.arange(rows), lengths - 1], dtype=np.float32)

    def decode(self, tokens: Sequence[int]) -> np.ndarray:
        rows = len(tokens)
        lengths = self.lengths[:rows]
        total = int(lengths.max()) + 1
        if total > self.capacity:
            self._grow(total)
        parity = self._flip
        binding = self._bindings[parity]
        key = (rows, self.capacity, id(self._buffers))
        if self._bound[parity] != key:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            self._bind_kv(binding, 0, rows, shared=self.share_buffer)
            binding.bind_output(
                LOGITS, "cpu", 0, self.logits_dtype, [rows, 1, self.spec.vocab_size], self._logits.ctypes.data
            )
            self._bound[parity] = key
        ids = np.asarray(tokens, dtype=np.int64)[:, None]
        live = ids[:, 0] >= 0
        mask = (np.arange(total, dtype=np.int64)[None, :] <= lengths[:, None]).astype(np.int64)
        feeds = self._common_feeds(np.maximum(ids, 0), mask, lengths[:, None].copy())
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        self.session.run_with_iobinding(binding)
        if not self.share_buffer:
            self._buffers, self._spare = self._spare, self._buffers
            self._flip ^= 1
        self.lengths[:rows] += live
        return np.asarray(self._logits[:rows, 0], dtype=np.float32)

    def copy(self, src: int, dst: int) -> None:
        """Row dst gets a copy of row src's cache (src keeps its own)."""
        n = int(self.lengths[src])
        for kbuf, vbuf in self._buffers:
            assert isinstance(kbuf, np.ndarray) and isinstance(vbuf, np.ndarray)
            kbuf[dst, :, :n] = kbuf[src, :, :n]
            vbuf[dst, :, :n] = vbuf[src, :, :n]
        self.lengths[dst] = n

    def move(self, src: int, dst: int) -> None:
        self.copy(src, dst)
        self.lengths[src] = 0


class ConcatKv(KvRunner):
    def __init__(self, session: ort.InferenceSession, spec: ModelSpec, max_batch: int) -> None:
        super().__init__(session, spec, max_batch)
        self.rows = 0
        self._kv: list[np.ndarray] = []  # per layer, key then value: [rows, n_kv, width, head_dim], left-padded
        self._mask = np.zeros((0, 0), np.int64)

    def _empty(self, rows: int, width: int) -> np.ndarray:
        return np.zeros((rows, self.spec.num_kv_heads, width, self.spec.head_dim), self.kv_dtype)

    def _run(self, feeds: dict[str, np.ndarray], past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        for (k, v), i in zip(self.kv_names, range(0, 2 * len(self.kv_names), 2)):
            feeds[k], feeds[v] = past[i], past[i + 1]
        names = [LOGITS] + [n for pair in self.present_names for n in pair]
        logits, *presents = self.session.run(names, feeds)
        return logits, presents

    def prefill(self, row: int, ids: Sequence[int]) -> np.ndarray:
        if row != self.rows:
            raise ValueError("rows join at the end of the batch")
        n = len(ids)
        feeds = self._common_feeds(
            np.asarray([ids], dtype=np.int64), np.ones((1, n), np.int64), np.arange(n, dtype=np.int64)[None, :]
        )
        logits, presents = self._run(feeds, [self._empty(1, 0)] * (2 * self.spec.num_layers))
        width = self._mask.shape[1]
        if self.rows == 0:
            self._kv, self._mask = presents, np.ones((1, n), np.int64)
        else:
            pad_old, pad_new = max(0, n - width), max(0, width - n)
            self._kv = [
                np.concatenate([self._pad_left(old, pad_old), self._pad_left(new, pad_new)], axis=0)
                for old, new in zip(self._kv, presents)
            ]
            new_mask = np.concatenate([np.zeros((1, pad_new), np.int64), np.ones((1, n), np.int64)], axis=1)
            self._mask = np.concatenate([np.pad(self._mask, ((0, 0), (pad_old, 0))), new_mask], axis=0)
        self.rows += 1
        self.lengths[row] = n
        return np.asarray(logits[0, -1], dtype=np.float32)

    @staticmethod
    def _pad_left(kv: np.ndarray, pad: int) -> np.ndarray:
        return np.pad(kv, ((0, 0), (0, 0), (pad, 0), (0, 0))) if pad else kv

    def decode(self, tokens: Sequence[int]) -> np.ndarray:
        rows = len(tokens)
        if rows != self.rows:
            raise ValueError("decode covers every row")
        mask = np.concatenate([self._mask, np.ones((rows, 1), np.int64)], axis=1)
        positions = self.lengths[:rows, None].copy()
        feeds = self._common_feeds(np.asarray(tokens, dtype=np.int64)[:, None], mask, positions)
        logits, self._kv = self._run(feeds, self._kv)
        self._mask = mask
        self.lengths[:rows] += 1
        return np.asarray(logits[:, -1], dtype=np.float32)

    def move(self, src: int, dst: int) -> None:
        for kv in self._kv:
            kv[dst] = kv[src]
        self._mask[dst] = self._mask[src]
        self.lengths[dst] = self.lengths[src]
        self.lengths[src] = 0

    def release(self, row: int) -> None:
        """Only the last row can leave (the scheduler moves it there first); left padding shared by all rows
        is trimmed."""
        if row != self.rows - 1:
            raise ValueError("only the last row leaves")
        self.rows -= 1
        self.lengths[row] = 0
        if self.rows == 0:
            self._kv, self._mask = [], np.zeros((0, 0), np.int64)
            return
        mask = self._mask[: self.rows]
        drop = int(np.argmax(mask.any(axis=0)))  # leading columns that are padding in every row
        self._mask = mask[:, drop:].copy()
        self._kv = [kv[: self.rows, :, drop:].copy() for kv in self._kv]

    def reset(self) -> None:
        super().reset()
        self.rows = 0
        self._kv, self._mask = [], np.zeros((0, 0), np.int64)
