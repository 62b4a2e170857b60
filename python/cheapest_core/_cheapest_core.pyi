"""Type stubs for the compiled core; checked by `python -m mypy.stubtest`."""

import os
from typing import final

from typing_extensions import Self

__version__: str

# --- errors ---------------------------------------------------------------
class KeyFormatError(ValueError): ...
class TokenizerError(ValueError): ...
class RateLimiterError(OSError): ...
class SseError(ValueError): ...

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
    def decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def fast_path(self) -> bool:
        """True when counting uses the exact byte-level BPE fast path."""

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
    """GCRA limits in a memory-mapped table shared by every process opening ``path``."""
    def __new__(cls, path: str | os.PathLike[str], capacity: int = 65536) -> Self: ...
    @property
    def capacity(self) -> int: ...
    @property
    def path(self) -> str: ...
    def acquire(
        self, key: str, limit: int, period: float = 60.0, cost: int = 1, now: float | None = None
    ) -> RateDecision: ...
    def peek(self, key: str, limit: int, period: float = 60.0, now: float | None = None) -> RateDecision: ...
    def adjust(
        self, key: str, limit: int, period: float = 60.0, delta: int = 0, now: float | None = None
    ) -> None: ...
    def acquire_all(
        self, requests: list[tuple[str, int, float, int]], now: float | None = None
    ) -> list[RateDecision]:
        """All or nothing: if one limit refuses, none is charged and every decision is not allowed."""
    def reset(self, key: str) -> None: ...

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
