"""Every Prometheus series the service exports, and the named hooks the rest of the service calls to feed them.

Metadata only, by construction: a label value is a route template from the route table (or "unmatched"), an HTTP
method from a fixed set, a served model's id (a model the request named but no worker serves is "unknown"; a
route that takes no model, "none"), a status code, or a word from a fixed list below. Nothing a client sends ever
becomes a label, so the number of series is bounded by the route table, the configured models and those lists.

One `Metrics` object per process (`cheapest.metrics.metrics`): prometheus-client's values live per process, and
the scheduler threads, the usage flusher and the request path of one worker all report into the same files. Until
a worker calls `start()` (or when the `metrics` setting is off) every hook returns at once.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import msgspec
from cheapest_core import RateLimiterError
from prometheus_client import Counter, Gauge, Histogram

from cheapest.metrics.files import BufferedValue, ProcessValues, prepare, process_ident, reap

if TYPE_CHECKING:
    from cheapest.config import Settings
    from cheapest.gateway.errors import Refusal

# Bucket bounds. Requests run from a millisecond (a key lookup) to minutes (a long generation).
REQUEST_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
FIRST_TOKEN_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
BATCH_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MODEL_STATES = ("loading", "ready", "failed")
# Refusals counted by kind: a refusal's code (and, for rate limits, which limit) -> the `kind` label.
REFUSAL_KINDS = {"budget_exceeded": "budget", "insufficient_quota": "credits",
                 "subscription_inactive": "subscription"}
# Failures counted by component: the core's rate-limiter errors, the store's own (cheapest.store), and those of
# the libraries behind the store and the limiter, by their top-level package.
Component = Literal["store", "limiter"]
ERROR_SOURCES: dict[str, Component] = {"lmdb": "store", "psycopg": "store", "redis": "limiter"}
UNMATCHED, UNKNOWN, NONE, OTHER = "unmatched", "unknown", "none", "other"


class RouteLike(Protocol):
    """What a label needs of a route (server/routes.py's Route)."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def request(self) -> type | None: ...


class SchedulerSeries:
    """One model scheduler's series (queue, batch, token timings). This base records nothing: metrics are off."""

    __slots__ = ()

    def token(self, since: float, first: bool) -> float:
        """A sequence's token, `since` (perf_counter) it was submitted (its first token) or its previous token
        came; returns the time to count its next token from."""
        return since

    def step(self, rows: int) -> None:
        """A batched run (a decode step, an embedding run) of `rows` sequences or inputs."""

    def queue(self, waiting: int, running: int) -> None:
        """Now `waiting` wait to join a batch and `running` hold a row."""


class _Series:
    """The series themselves (created once the worker's value class is installed)."""

    def __init__(self) -> None:
        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, labels, registry=None)

        def histogram(name: str, doc: str, buckets: tuple[float, ...], *labels: str) -> Histogram:
            return Histogram(name, doc, labels, registry=None, buckets=buckets)

        def gauge(name: str, doc: str, mode: str, *labels: str) -> Gauge:
            return Gauge(name, doc, labels, registry=None, multiprocess_mode=mode)  # type: ignore[arg-type]

        self.requests = counter("cheapest_requests", "Requests answered, by route template, method, model and "
                                "status (499: the client left first)", "route", "method", "model", "status")
        self.duration = histogram("cheapest_request_duration_seconds", "Time from a request's arrival to its last "
                                  "byte (a stream's included)", REQUEST_SECONDS, "route", "model")
        self.prompt_tokens = counter("cheapest_prompt_tokens", "Prompt (input) tokens metered, by model", "model")
        self.completion_tokens = counter("cheapest_completion_tokens", "Completion tokens metered, by model",
                                         "model")
        self.first_token = histogram("cheapest_time_to_first_token_seconds", "Time from a sequence joining its "
                                     "model's scheduler to its first token", FIRST_TOKEN_SECONDS, "model")
        self.inter_token = histogram("cheapest_inter_token_latency_seconds", "Time between a sequence's "
                                     "consecutive tokens", TOKEN_SECONDS, "model")
        self.batch = histogram("cheapest_batch_size", "Sequences in each decode step (inputs in each embedding "
                               "run)", BATCH_ROWS, "model")
        self.waiting = gauge("cheapest_queue_depth", "Sequences (embedding inputs) waiting to join a batch, all "
                             "workers", "livesum", "model")
        self.running = gauge("cheapest_running_sequences", "Sequences holding a batch row, all workers", "livesum",
                             "model")
        self.refusals = counter("cheapest_refusals", "Requests refused by a rate limit (rpm, tpm), a spent budget, "
                                "an empty credit balance or a lapsed subscription", "kind")
        self.errors = counter("cheapest_errors", "Failures of the store or the rate limiter on the request path "
                              "or in the usage flush", "component")
        self.flush_lag = gauge("cheapest_usage_flush_lag_seconds", "Age of the oldest usage a worker's last "
                               "successful flush wrote (worst worker)", "livemax")
        self.flush_failures = counter("cheapest_usage_flush_failures", "Usage flushes the store refused (kept "
                                      "and retried)")
        self.model_state = gauge("cheapest_model_state", "Workers whose model is in this state (loading, ready, "
                                 "failed)", "livesum", "model", "state")
        self.workers = gauge("cheapest_workers", "Worker processes running", "livesum")
        self.starts = counter("cheapest_worker_starts", "Worker processes started since the server started")
        self.restarts = counter("cheapest_worker_restarts", "Worker processes that ended without shutting down "
                                "(crashed or killed); the server starts another")


class _LiveScheduler(SchedulerSeries):
    __slots__ = ("_first", "_next", "_batch", "_waiting", "_running")

    def __init__(self, s: _Series, model: str) -> None:
        self._first = s.first_token.labels(model)
        self._next = s.inter_token.labels(model)
        self._batch = s.batch.labels(model)
        self._waiting = s.waiting.labels(model)
        self._running = s.running.labels(model)

    def token(self, since: float, first: bool) -> float:
        now = time.perf_counter()
        (self._first if first else self._next).observe(now - since)
        return now

    def step(self, rows: int) -> None:
        self._batch.observe(rows)

    def queue(self, waiting: int, running: int) -> None:
        self._waiting.set(waiting)
        self._running.set(running)


class _RequestValues:
    """The values one kind of request (route, method, model, status) adds to, updated together under the process's
    one lock. The request path is the hottest caller, and prometheus-client's inc() and observe() cost several times
    the additions themselves (checks, exemplars, a lock each), so this writes a labelled child's values directly: a
    counter keeps its value in `_value`, a histogram in `_sum` and `_buckets` over `_upper_bounds`, the library's
    layout since its first releases. tests/metrics/test_series.py checks the text against observe()'s."""

    __slots__ = ("lock", "count", "sum", "buckets", "bounds", "prompt", "completion")

    def __init__(self, requests: Counter, duration: Histogram, prompt: Counter | None,
                 completion: Counter | None) -> None:
        self.count: BufferedValue = requests._value
        self.lock = self.count._lock
        self.sum: BufferedValue = duration._sum
        self.buckets: list[BufferedValue] = duration._buckets
        self.bounds: list[float] = duration._upper_bounds  # ends with +Inf
        self.prompt: BufferedValue | None = None if prompt is None else prompt._value
        self.completion: BufferedValue | None = None if completion is None else completion._value

    def add(self, seconds: float, prompt_tokens: int, completion_tokens: int) -> None:
        with self.lock:
            self.count.value += 1
            self.sum.value += seconds
            self.buckets[bisect_left(self.bounds, seconds)].value += 1  # the first bound >= seconds, as observe()
            if prompt_tokens and self.prompt is not None:
                self.prompt.value += prompt_tokens
            if completion_tokens and self.completion is not None:
                self.completion.value += completion_tokens


_OFF = SchedulerSeries()


class Metrics:
    def __init__(self) -> None:
        self._s: _Series | None = None
        self._values: ProcessValues | None = None
        self._models: set[str] = set()  # the served models' ids: the only model labels a request can get
        self._requests: dict[tuple[str, str, str | None, int], _RequestValues] = {}
        self._takes_model: dict[tuple[str, str], bool] = {}

    @property
    def directory(self) -> Path | None:
        return None if self._values is None else self._values.directory

    # --- the worker's lifecycle -----------------------------------------------------------------------------------

    def start(self, settings: Settings) -> None:
        """Record this worker's series in the host's metrics directory (`settings.metrics_path`), if metrics are on.
        A process started by `cheapest serve` or Granian belongs to its parent's server; the first of a new server
        empties the directory."""
        if not settings.serving.metrics or self._s is not None:
            return
        directory = settings.metrics_path
        prepare(directory, process_ident(os.getppid()))
        values = ProcessValues(directory)
        values.install()
        s = _Series()
        crashed = reap(directory)
        s.workers.set(1)
        s.starts.inc()
        if crashed:
            s.restarts.inc(crashed)
        values.start()  # written at once: a crash from now on is seen
        self._values, self._s = values, s

    def stop(self) -> None:
        """A clean shutdown: the last values written, this worker's live gauges out of the sums."""
        values, self._values, self._s = self._values, None, None
        self._requests.clear()
        if values is not None:
            values.close()

    def collect(self) -> Path | None:
        """Before a scrape: this worker's values written now, dead workers reaped; the directory to read."""
        values, s = self._values, self._s
        if values is None or s is None:
            return None
        crashed = reap(values.directory)
        if crashed:
            s.restarts.inc(crashed)
        values.sync()
        return values.directory

    # --- hooks ----------------------------------------------------------------------------------------------------

    def request(self, method: str, route: RouteLike | None, model: str | None, status: int, seconds: float,
                prompt_tokens: int, completion_tokens: int) -> None:
        """One answered request (server/application.py): counted, timed, its metered tokens added."""
        if self._s is None:
            return
        key = (route.method, route.path, model, status) if route is not None else ("", "", model, status)
        c = self._requests.get(key)
        if c is None:
            c = self._bind(key, method, route, model, status)
        c.add(seconds, prompt_tokens, completion_tokens)

    def _bind(self, key: tuple[str, str, str | None, int], method: str, route: RouteLike | None, model: str | None,
              status: int) -> _RequestValues:
        s = self._s
        assert s is not None
        if route is None:
            path, method = UNMATCHED, method if method in METHODS else OTHER
        else:
            path, method = route.path, route.method
        served = model is not None and model in self._models
        if served:
            label = model
        elif model is None and (route is None or not self._route_takes_model(route)):
            label = NONE
        else:
            label = UNKNOWN
        code = str(status) if 100 <= status <= 599 else OTHER
        c = _RequestValues(s.requests.labels(path, method, label, code), s.duration.labels(path, label),
                           s.prompt_tokens.labels(label) if served else None,  # tokens: served models only
                           s.completion_tokens.labels(label) if served else None)
        if served or model is None:  # only bounded keys are kept
            self._requests[key] = c
        return c

    def _route_takes_model(self, route: RouteLike) -> bool:
        key = (route.method, route.path)
        takes = self._takes_model.get(key)
        if takes is None:
            body = route.request
            fields = msgspec.structs.fields(body) if body is not None and issubclass(body, msgspec.Struct) else ()
            takes = self._takes_model[key] = "{model}" in route.path or any(f.name == "model" for f in fields)
        return takes

    def refused(self, refusal: Refusal) -> None:
        """A refusal on its way out (server/application.py); rate limits, budgets, credits and standing count."""
        if self._s is None:
            return
        if refusal.code == "rate_limit_exceeded":
            kind = "rpm" if refusal.type == "requests" else "tpm"
        elif refusal.code in REFUSAL_KINDS:
            kind = REFUSAL_KINDS[refusal.code]
        elif refusal.kind in ("rate_limited", "payment_required"):
            kind = OTHER
        else:
            return
        self._s.refusals.labels(kind).inc()

    def failed(self, exc: BaseException) -> None:
        """An unexpected exception on the request path: counted when the store or the rate limiter raised it."""
        if self._s is None:
            return
        if isinstance(exc, RateLimiterError):
            component: Component | None = "limiter"
        else:
            component = ERROR_SOURCES.get(type(exc).__module__.partition(".")[0])
            if component is None and type(exc).__module__.startswith("cheapest.store"):
                component = "store"
        if component is not None:
            self._s.errors.labels(component).inc()

    def error(self, component: Component) -> None:
        """The store or the rate limiter failed where the caller copes (a 503, a limiter's local fallback)."""
        if self._s is not None:
            self._s.errors.labels(component).inc()

    def usage_flushed(self, lag: float) -> None:
        """A usage flush reached the store; `lag`: seconds its oldest usage waited (store/metering.py)."""
        if self._s is not None:
            self._s.flush_lag.set(lag)

    def usage_flush_failed(self) -> None:
        if self._s is not None:
            self._s.flush_failures.inc()
            self.error("store")

    def model_state(self, model: str, state: str) -> None:
        """A configured model is loading, ready or failed in this worker (engine/registry.py)."""
        self._models.add(model)
        s = self._s
        if s is not None:
            for each in MODEL_STATES:
                s.model_state.labels(model, each).set(1 if each == state else 0)

    def scheduler(self, model: str) -> SchedulerSeries:
        """The series of a model's scheduler (engine/batching.py, engine/embedding.py): `model` is the loaded
        model's own id, from the model directory (none: a scheduler made outside a worker, recorded nowhere)."""
        if not model or self._s is None:
            return _OFF
        self._models.add(model)
        return _LiveScheduler(self._s, model)
