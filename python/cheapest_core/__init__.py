"""cheapest_core: the per-request hot work of cheapest, in Rust.

API keys, token counting, rate limiting, SSE framing, stop strings and sampling (and the switch for
the model operators' huge-page weights). Every name is re-exported from the compiled extension
``cheapest_core._cheapest_core``; ``_cheapest_core.pyi`` documents them.
"""

from cheapest_core import _cheapest_core
from cheapest_core._cheapest_core import (
    IncrementalDecoder,
    KeyFormatError,
    RateDecision,
    RateLimiter,
    RateLimiterError,
    RateLimiterFull,
    Sampler,
    SamplerError,
    SseError,
    SseFramer,
    StopMatcher,
    StopStringError,
    Tokenizer,
    TokenizerError,
    __version__,
    check_key,
    generate_key,
    hash_key,
    huge_page_weights,
    json_escape,
    key_hint,
    key_kind,
    set_huge_page_weights,
    verify_key,
)

# The extension lists every export (stubtest holds the stub to the same list); the imports above name
# them for readers and type checkers, and tests/core/test_exports.py keeps the two in step.
__all__ = _cheapest_core.__all__
