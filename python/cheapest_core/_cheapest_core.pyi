"""Type stubs for the compiled core; checked by `python -m mypy.stubtest`."""

__version__: str

# --- errors ---------------------------------------------------------------
class KeyFormatError(ValueError): ...
class TokenizerError(ValueError): ...
class RateLimiterError(OSError): ...
class SseError(ValueError): ...

# --- keys (keys.rs) ---------------------------------------------------------

# --- tokens (tokens.rs) -----------------------------------------------------

# --- rate limiting (ratelimit.rs) -------------------------------------------

# --- SSE framing (sse.rs) ---------------------------------------------------
