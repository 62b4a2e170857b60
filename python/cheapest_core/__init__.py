"""cheapest_core: token counting, API keys, rate limiting and SSE framing in Rust.

Everything here is re-exported from the compiled extension
``cheapest_core._cheapest_core``; see ``_cheapest_core.pyi`` for the API.
"""

from cheapest_core._cheapest_core import *  # noqa: F401,F403
from cheapest_core._cheapest_core import __version__  # noqa: F401
