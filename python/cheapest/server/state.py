"""What one worker process holds, opened after it starts (never in a server master, never across a fork): the
store, the rate limiter (this host's table or Redis), the usage meter, the retention job, the gateway (with its
caches and payment clients), the engine, the response-id buffer, the request log and the documents it serves.

Each configured model (`engine.models`) gets an engine from the factory named by `model_backend`: "onnx" (the
built-in ONNX Runtime engine) or "module:callable", `factory(settings: EngineSettings, add_route) -> Engine`,
imported in the worker and called once per model with that model's `model_dir`. The models load in parallel
threads (engine/registry.py); each engine has its own scheduler. A factory may add routes of its own to this
worker's router through `add_route` (they are not in the OpenAPI document).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable
from pathlib import Path

import msgspec

from cheapest.config import EngineSettings, Settings
from cheapest.gateway import Gateway
from cheapest.engine.registry import ServedModels
from cheapest.engine.types import Embedder, Engine
from cheapest.metrics import metrics
from cheapest.privacy.retention import PeriodicRetention
from cheapest.server.accesslog import RequestLog
from cheapest.server.ids import ResponseIds
from cheapest.server.routes import Route
from cheapest.store import Store, open_configured_store
from cheapest.store.limiter import open_configured_limiter
from cheapest.store.metering import UsageMeter
from cheapest.store.secrets import load_pepper
from cheapest.store.settings import OLD_RATELIMIT_FILES

log = logging.getLogger("cheapest.server")

AddRoute = Callable[[Route], None]
EngineFactory = Callable[[EngineSettings, AddRoute], Engine | Embedder]


def load_onnx_engine(settings: EngineSettings, add_route: AddRoute) -> Engine | Embedder:
    """The built-in backend ("onnx"): a model directory in the Hugging Face ONNX layout (a generating model, or a
    sentence-embedding one)."""
    from cheapest.engine.embedding import EmbeddingEngine, is_embedding_model
    from cheapest.engine.onnx_engine import load_engine

    if is_embedding_model(settings.model_dir):
        return EmbeddingEngine(settings.model_dir, threads=settings.model_threads or None,
                               spin_us=settings.model_spin_us, shared_arena=len(settings.models) > 1,
                               huge_pages=settings.model_huge_pages)
    return load_engine(settings.model_dir, threads=settings.model_threads or None, spin_us=settings.model_spin_us,
                       chat_templates=settings.chat_templates, shared_arena=len(settings.models) > 1,
                       huge_pages=settings.model_huge_pages)


def engine_factory(settings: EngineSettings) -> EngineFactory:
    """`model_backend`: "onnx", or "module:callable" naming another factory (imported here, in the worker)."""
    if settings.model_backend == "onnx":
        return load_onnx_engine
    module, _, name = settings.model_backend.partition(":")
    factory: EngineFactory = getattr(importlib.import_module(module), name)
    return factory


def operator_log() -> None:
    """Send the service's own metadata-only log lines (model loaded, provider, failures by type) to stderr.

    Granian configures only its own loggers; without this, `cheapest.*` INFO lines would vanish. Request
    metadata lines go to stdout separately (accesslog.RequestLog)."""
    logger = logging.getLogger("cheapest")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(levelname)s] %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class WorkerState:
    def __init__(self, settings: Settings, add_route: AddRoute) -> None:
        from cheapest.privacy.hardening import disable_core_dumps, owner_only_dir, owner_only_files

        disable_core_dumps()  # this process will hold prompts and completions in memory
        owner_only_files()  # whatever this worker (or a library it calls) creates is the owner's alone
        operator_log()
        metrics.start(settings)
        self.settings = settings
        data = settings.data_path
        owner_only_dir(data)
        self.store: Store = open_configured_store(settings.store)
        self.meter = UsageMeter(self.store, settings.store.usage_flush_interval)
        self.meter.start()
        self.retention = PeriodicRetention(self.store, data, settings.store.retention_interval)
        self.retention.start()
        for old in OLD_RATELIMIT_FILES:  # an older format's table: transient state only, superseded (see settings)
            (data / old).unlink(missing_ok=True)
        self.limiter = open_configured_limiter(settings.store)
        self.gateway = Gateway(settings, self.store, load_pepper(data, settings.store.key_pepper), self.limiter,
                               self.meter)
        self.ids = ResponseIds()
        self.request_log = RequestLog()
        self.openapi: bytes | None = None  # the OpenAPI document, encoded on first request
        self.plans: bytes | None = None  # the public plan catalog, encoded on first request
        self._add_route = add_route
        engine = settings.engine
        factory = engine_factory(engine)
        self.models: ServedModels[Engine | Embedder] = ServedModels(
            (Path(model_dir).name, self._loader(factory, msgspec.structs.replace(engine, model_dir=model_dir)))
            for model_dir in engine.models)

    def _loader(self, factory: EngineFactory, settings: EngineSettings) -> Callable[[], Engine | Embedder]:
        return lambda: factory(settings, self._add_route)

    def load_engine(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Load every model, each in its own thread (/readyz says which are ready); without a loop, now."""
        if loop is None:
            self.models.load_now()
        else:
            self.models.start()

    def close(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.request_log.flush()
        self.retention.stop()
        self.gateway.payments.close()
        self.meter.stop()
        if loop is not None and not loop.is_closed():
            try:
                loop.run_until_complete(self.models.close())
            except Exception:
                log.exception("engine close failed")
        self.limiter.close()
        self.store.close()
        metrics.stop()
