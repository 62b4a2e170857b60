"""What one worker process holds: store, pepper, rate limiter, usage meter, engine. Opened after fork."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import cheapest_core

from cheapest.config import PriceConfig, Settings
from cheapest.engine.types import Engine
from cheapest.privacy.retention import PeriodicRetention
from cheapest.store import Store, open_store
from cheapest.store.metering import UsageMeter
from cheapest.store.secrets import load_pepper

log = logging.getLogger("cheapest.http")


def load_configured_engine(settings: Settings) -> Engine:
    if settings.model_backend == "fixed":
        from cheapest.config import DEFAULT_MODEL
        from cheapest.inference.fixed import FixedEngine

        return FixedEngine(Path(settings.model_dir).name or DEFAULT_MODEL, settings.fixed_text,
                           tokens=settings.fixed_tokens, delay=settings.fixed_delay,
                           fail_seed=settings.fixed_fail_seed)
    from cheapest.engine.onnx_engine import load_engine

    return load_engine(settings.model_dir, threads=settings.model_threads or None, spin_us=settings.model_spin_us)


def _operator_log() -> None:
    """Send the service's own metadata-only log lines (model loaded, provider, failures by type) to stderr.

    Granian configures only its own loggers; without this, `cheapest.*` INFO lines would vanish. Request
    metadata lines go to stdout separately (http/accesslog.py)."""
    logger = logging.getLogger("cheapest")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(levelname)s] %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class WorkerState:
    def __init__(self, settings: Settings) -> None:
        from cheapest.privacy.hardening import disable_core_dumps

        disable_core_dumps()  # this process will hold prompts and completions in memory
        _operator_log()
        self.settings = settings
        data = settings.data_path
        data.mkdir(parents=True, exist_ok=True)
        self.store: Store = open_store(data, settings.lmdb_map_size)
        self.pepper = load_pepper(data, settings.key_pepper)
        self.limiter = cheapest_core.RateLimiter(str(data / "ratelimit.bin"), settings.ratelimit_capacity)
        self.meter = UsageMeter(self.store, settings.usage_flush_interval)
        self.meter.start()
        self.retention = PeriodicRetention(self.store, data, settings.retention_interval)
        self.retention.start()
        self.engine: Engine | None = None
        self.engine_failed = False
        self._prices: dict[str, PriceConfig] = {}
        self._engine_lock = threading.Lock()

    def cost_micro(self, model: str, prompt_tokens: int, completion_tokens: int) -> int:
        """The request's cost from the model's configured price (looked up once per model)."""
        price = self._prices.get(model)
        if price is None:
            price = self._prices[model] = self.settings.price(model)
        return price.cost_micro(prompt_tokens, completion_tokens)

    def load_engine(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Load the engine (fixed: now; onnx: in a thread, /readyz says when it is ready)."""
        if self.settings.model_backend == "fixed" or loop is None:
            self._load()
        else:
            loop.run_in_executor(None, self._load)

    def _load(self) -> None:
        with self._engine_lock:
            if self.engine is not None:
                return
            try:
                self.engine = load_configured_engine(self.settings)
            except Exception as exc:
                self.engine_failed = True
                log.error("model failed to load: %s", type(exc).__name__)
                raise

    def close(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        from cheapest.http.accesslog import flush_request_log

        flush_request_log()
        self.retention.stop()
        self.meter.stop()
        if self.engine is not None and loop is not None and not loop.is_closed():
            try:
                loop.run_until_complete(self.engine.close())
            except Exception:
                log.exception("engine close failed")
        self.store.close()
