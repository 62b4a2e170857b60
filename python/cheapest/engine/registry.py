"""The models one worker serves: each loads in its own thread at start, and each is found by its id.

A model is `loading` until its engine is built, then `ready` (or `failed`, for good: a broken directory does not
mend itself). Requests for a loading model are told to retry; /readyz reports every model's state.

Resident memory per model: the worker's resident set size (VmRSS) grows while a model loads; that growth is the
model's figure. Models loading at the same moment share that window, so their figures overlap; a model loaded
alone is measured exactly (bench/bench_models_memory.py measures each alone and all together). After the loads,
freed heap left over from parsing (tokenizer.json, graph protos) is handed back to the OS (glibc's malloc_trim).

Only metadata is logged: the model id, its state, load time and resident bytes.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Generic, Literal, Protocol, TypeVar

from cheapest.metrics import metrics

log = logging.getLogger("cheapest.engine")

ModelState = Literal["loading", "ready", "failed"]


class Served(Protocol):
    """What the registry needs of an engine (a generating one or an embedding one)."""

    @property
    def model_id(self) -> str: ...

    async def close(self) -> None: ...


E = TypeVar("E", bound=Served)


def resident_bytes() -> int | None:
    """This process's resident set size (Linux); None where /proc is not there."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    import resource

    return pages * resource.getpagesize()


def release_free_heap() -> None:
    """Give freed heap back to the OS (glibc only; elsewhere nothing happens)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class ModelSlot(Generic[E]):
    """One configured model: its name (the directory's, which is the model id of converted directories) until
    it is loaded, then its engine."""

    __slots__ = ("name", "state", "engine", "resident_bytes", "load_seconds")

    def __init__(self, name: str) -> None:
        self.name = name
        self.state: ModelState = "loading"
        self.engine: E | None = None
        self.resident_bytes: int | None = None
        self.load_seconds: float | None = None


class ServedModels(Generic[E]):
    """Slots by name; `load(...)` builds every engine, in parallel threads or (without `parallel`) in turn."""

    def __init__(self, loaders: Iterable[tuple[str, Callable[[], E]]]) -> None:
        self._loaders = list(loaders)
        self.slots: list[ModelSlot[E]] = [ModelSlot(name) for name, _ in self._loaders]
        self._by_name: dict[str, ModelSlot[E]] = {slot.name: slot for slot in self.slots}
        for slot in self.slots:
            metrics.model_state(slot.name, slot.state)
        self._lock = threading.Lock()
        self._pending = len(self.slots)
        self._threads: list[threading.Thread] = []
        self._started = False

    def _claim(self) -> bool:
        """True for the one caller that gets to load the models."""
        with self._lock:
            first, self._started = not self._started, True
        return first

    def start(self) -> None:
        """Load every model, each in its own thread; returns at once (the slots say when each is ready)."""
        if not self._claim():
            return
        for slot, (_, loader) in zip(self.slots, self._loaders):
            thread = threading.Thread(target=self._load, args=(slot, loader), name=f"cheapest-load-{slot.name}",
                                      daemon=True)
            self._threads.append(thread)
            thread.start()

    def load_now(self) -> None:
        """Load every model in this thread, in turn (a caller without an event loop); raises the first failure."""
        if not self._claim():
            return
        for slot, (_, loader) in zip(self.slots, self._loaders):
            self._load(slot, loader, reraise=True)

    def join(self, timeout: float | None = None) -> None:
        for thread in self._threads:
            thread.join(timeout)

    def _load(self, slot: ModelSlot[E], loader: Callable[[], E], reraise: bool = False) -> None:
        before, started = resident_bytes(), time.perf_counter()
        try:
            engine = loader()
        except Exception as exc:
            slot.state = "failed"
            metrics.model_state(slot.name, slot.state)
            log.error("model %s failed to load: %s", slot.name, type(exc).__name__)
            self._loaded()
            if reraise:
                raise
            return
        after = resident_bytes()
        slot.load_seconds = round(time.perf_counter() - started, 3)
        slot.resident_bytes = after - before if after is not None and before is not None else None
        model_id = engine.model_id
        with self._lock:
            slot.engine = engine
            slot.state = "ready"
            metrics.model_state(slot.name, slot.state)
            if model_id != slot.name:  # an export whose config names another id: found by both
                self._by_name.setdefault(model_id, slot)
        log.info("model ready: id=%s seconds=%s resident_mib=%s", model_id, slot.load_seconds,
                 None if slot.resident_bytes is None else round(slot.resident_bytes / 2**20, 1))
        self._loaded()

    def _loaded(self) -> None:
        with self._lock:
            self._pending -= 1
            last = self._pending == 0
        if last:
            release_free_heap()

    def find(self, model: str) -> ModelSlot[E] | None:
        return self._by_name.get(model)

    def ready(self) -> list[E]:
        return [slot.engine for slot in self.slots if slot.engine is not None]

    async def close(self) -> None:
        for engine in self.ready():
            await engine.close()
