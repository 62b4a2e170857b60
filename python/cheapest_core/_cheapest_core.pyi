"""Type stubs for the compiled core; checked by `python -m mypy.stubtest`."""

import os
from collections.abc import Sequence
from typing import ClassVar, final

from typing_extensions import Buffer, Self

# PyO3 fills the module's __all__ with every export; stubtest checks this list against it.
__all__ = [
    "IncrementalDecoder",
    "KeyFormatError",
    "RateDecision",
    "RateLimiter",
    "RateLimiterError",
    "RateLimiterFull",
    "Sampler",
    "SamplerError",
    "SseError",
    "SseFramer",
    "StopMatcher",
    "StopStringError",
    "Tokenizer",
    "TokenizerError",
    "__version__",
    "check_key",
    "generate_key",
    "hash_key",
    "huge_page_weights",
    "json_escape",
    "key_hint",
    "key_kind",
    "set_huge_page_weights",
    "verify_key",
]

__version__: str

# --- errors ---------------------------------------------------------------
class KeyFormatError(ValueError): ...
class TokenizerError(ValueError): ...
class RateLimiterError(OSError): ...
class RateLimiterFull(RateLimiterError):
    """Every slot of the rate-limit table the key may use holds a live limit (answer 503)."""
class SseError(ValueError): ...
class StopStringError(ValueError):
    """Too many or too long stop strings, or text with a lone surrogate; never quotes the text."""
class SamplerError(ValueError):
    """A bad sampling parameter or logits/mask buffer (wrong dtype or shape, NaN, nothing allowed)."""

# --- keys (keys.rs) ---------------------------------------------------------
def generate_key(kind: str) -> str:
    """A fresh key: ``"sk_"``/``"mk_"``, 30 base62 chars from the OS CSPRNG, 6-char base62 CRC32."""

def check_key(key: str, *, kind: str | None = None) -> bool:
    """Prefix, length, alphabet and checksum (no lookup); ``kind`` restricts the prefix."""

def key_kind(key: str) -> str | None:
    """``"sk"`` or ``"mk"`` for a well-formed key, else None."""

def hash_key(key: str, pepper: bytes) -> bytes:
    """HMAC-SHA256(pepper, key), 32 bytes: what the store keeps. Pepper >= 16 bytes."""

def verify_key(key: str, pepper: bytes, expected_hash: bytes) -> bool:
    """Whether ``hash_key(key, pepper) == expected_hash``, compared in constant time."""

def key_hint(key: str) -> str:
    """Display form ``sk_…a1B2`` of a well-formed key."""

# --- tokens (tokens.rs) -----------------------------------------------------

@final
class Tokenizer:
    """A Hugging Face ``tokenizer.json``. ``count(text)`` equals the
    ``tokenizers`` package's ``len(Tokenizer.encode(text).ids)`` exactly."""

    @staticmethod
    def from_file(path: str | os.PathLike[str]) -> Tokenizer: ...
    @staticmethod
    def from_str(json: str) -> Tokenizer: ...
    def count(self, text: str) -> int: ...
    def count_batch(self, texts: list[str]) -> list[int]:
        """Counts of every text; the GIL is released and large batches run in parallel."""
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, id: int) -> str | None: ...
    def token_bytes(self, id: int) -> bytes | None:
        """The bytes one token stands for in decoded text (what logprobs report per token), where the
        tokenizer's shape says so exactly: byte-level BPE and SentencePiece BPE (``▁`` as a space, ``<0xNN>`` as
        its byte; the decoder's leading-space strip applies to a whole text, not to one token). None for other
        shapes; raises TokenizerError for an id outside the vocabulary."""
    def decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def fast_path(self) -> bool:
        """True when counting uses one of the exact fast paths (byte-level BPE as in GPT-2 and SmolLM2, or
        SentencePiece BPE as in Gemma 3 and Llama 2, read without the ``tokenizers`` crate) rather than the
        crate."""

@final
class IncrementalDecoder:
    """Streaming detokenization that never emits half of a UTF-8 character:
    the ``push`` results plus ``flush()`` equal ``decode`` of all the ids."""

    def push(self, id: int) -> str: ...
    def push_many(self, ids: list[int]) -> str: ...
    def flush(self) -> str: ...

# --- rate limiting (ratelimit.rs) -------------------------------------------
@final
class RateDecision:
    """The outcome of one rate-limit check."""
    @property
    def allowed(self) -> bool: ...
    @property
    def limit(self) -> int: ...
    @property
    def remaining(self) -> int: ...
    @property
    def reset_after(self) -> float:
        """Seconds until the limit is fully replenished."""
    @property
    def retry_after(self) -> float:
        """Seconds until this request would be allowed; 0.0 if allowed, inf if never."""

@final
class RateLimiter:
    """GCRA limits in a memory-mapped table shared by every process opening ``path``.

    The file and any directory created for it are owner-only (0600/0700). A key's slot is
    taken by its first charge and serves another key once its limit has been idle for
    ``reclaim_after`` seconds past refill, or at once after ``forget``. A table of another
    format version is refused (``RateLimiterError``; it holds only rate-limit state: remove it).
    """
    def __new__(cls, path: str | os.PathLike[str], capacity: int = 65536) -> Self: ...
    @property
    def capacity(self) -> int: ...
    @property
    def path(self) -> str: ...
    @property
    def reclaim_after(self) -> float:
        """Seconds past a key's theoretical arrival time after which its slot may serve another key."""
    def acquire(
        self, key: str, limit: int, period: float = 60.0, cost: int = 1, now: float | None = None
    ) -> RateDecision:
        """Spends ``cost`` units if they fit. Raises ``RateLimiterFull`` when the key has no slot and
        every slot it may use holds a live limit."""
    def peek(self, key: str, limit: int, period: float = 60.0, now: float | None = None) -> RateDecision: ...
    def adjust(
        self, key: str, limit: int, period: float = 60.0, delta: int = 0, now: float | None = None
    ) -> None: ...
    def acquire_all(
        self, requests: list[tuple[str, int, float, int]], now: float | None = None
    ) -> list[RateDecision]:
        """All or nothing: if one limit refuses, none is charged and every decision is not allowed.
        ``RateLimiterFull`` (before anything is charged) when a key finds no slot."""
    def forget(self, key: str) -> bool:
        """Frees the key's slot at once (a revoked or deleted key); its spending is forgotten.
        Whether it had one."""
    def occupancy(self, now: float | None = None) -> tuple[int, int]:
        """(slots in use, of which reclaimable at ``now``): a scan of the whole table, for metrics."""

# --- SSE framing (sse.rs) ---------------------------------------------------
@final
class SseFramer:
    """OpenAI streaming events of one response, as ``data: {...}\\n\\n`` bytes."""
    def __new__(cls, id: str, model: str, created: int, object: str = "chat.completion.chunk") -> Self: ...
    @property
    def object(self) -> str: ...
    def role(self) -> bytes: ...
    def delta(self, text: str) -> bytes: ...
    def finish(self, reason: str) -> bytes: ...
    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes: ...
    @staticmethod
    def done() -> bytes: ...
    def error(self, message: str, type: str, code: str | None = None) -> bytes: ...

def json_escape(text: str) -> str:
    """The JSON string literal (quotes included) the framer writes for ``text``."""

# --- stop strings (stops.rs) ------------------------------------------------
@final
class StopMatcher:
    """One completion's stop strings over its streamed text, in time linear in the text.

    ``push`` returns the text safe to emit, withholding any suffix that may be the start of a
    stop string, and whether a stop string appeared; on a match everything from the earliest
    stop on is dropped and the matcher starts afresh. ``flush`` returns the withheld text.
    Empty stop strings are ignored. At most ``MAX_STOPS`` stops of at most ``MAX_STOP_CHARS``
    characters each, else ``StopStringError``.
    """

    MAX_STOPS: ClassVar[int]
    MAX_STOP_CHARS: ClassVar[int]
    def __new__(cls, stops: Sequence[str]) -> Self: ...
    def push(self, text: str) -> tuple[str, bool]: ...
    @property
    def matched(self) -> str | None:
        """The latest stop string found (the earliest in the text; of several starting there, the
        first to end), or None."""
    def flush(self) -> str: ...

# --- sampling (sampling.rs) ---------------------------------------------------
@final
class Sampler:
    """Next-token choice for one sequence. Greedy when ``temperature`` is 0 or ``top_k`` is 1
    (the first argmax); otherwise temperature, then top_k, then top_p (ties to the lower id).
    ``seed`` makes the draws reproducible (ChaCha8); ``None`` seeds from the OS."""

    def __new__(cls, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> Self: ...
    @property
    def greedy(self) -> bool: ...
    def sample(self, logits: Buffer, allowed: Buffer | None = None) -> int:
        """The next token id. ``logits``: contiguous 1-D float32; ``allowed``: 32-bit words (uint32
        or int32), bit ``i % 32`` of word ``i // 32`` allows token ``i`` (tokens past it are not
        allowed). The GIL is released; do not write the buffers meanwhile."""
    def logprobs(self, logits: Buffer, token: int, top_n: int = 0) -> tuple[float, list[tuple[int, float]]]:
        """``log_softmax(logits)[token]`` and the ``top_n`` most likely ``(id, logprob)``, best first:
        the raw distribution (before temperature, top_k, top_p and the mask), as OpenAI reports.
        A ``-inf`` logit gives ``-inf``."""

# --- ONNX Runtime operators (ortops) ----------------------------------------------
def set_huge_page_weights(on: bool) -> None:
    """Whether the core's operators created from now on copy their weights into transparent huge pages
    (process-wide; faster decode, but worker processes no longer share the model file's pages)."""

def huge_page_weights() -> bool:
    """Whether weights are copied into huge pages: asked for, and the kernel's THP mode allows it."""
