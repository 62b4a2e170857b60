"""The metrics package in one process: the hooks' series (the scheduler's on the tiny real model, the usage flush,
refusals, store and limiter errors), bounded labels, the directory's bookkeeping and the scrape policy."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest
from cheapest_core import RateLimiterError, RateLimiterFull

from cheapest.config import Settings, load_settings
from cheapest.engine.onnx_engine import load_engine
from cheapest.engine.types import Delta, SamplingParams
from cheapest.gateway import Refusal
from cheapest.metrics import metrics
from cheapest.metrics.exposition import NO_TOKEN, NOT_ALLOWED, ScrapeAccess, render
from cheapest.metrics.files import alive, prepare, process_ident, reap
from cheapest.server.routes import ROUTES
from cheapest.store import StoreError
from cheapest.store.metering import UsageMeter
from metrics_text import Samples, parse, value

CHAT = next(r for r in ROUTES if r.path == "/v1/chat/completions")
KEYS = next(r for r in ROUTES if r.path == "/api/keys" and r.method == "POST")


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Settings]:
    """This process's metrics started in a fresh data directory, stopped after the test."""
    settings = load_settings({"CHEAPEST_DATA_DIR": str(tmp_path / "data")})
    metrics.start(settings)
    yield settings
    metrics.stop()


def _samples() -> Samples:
    directory = metrics.collect()
    assert directory is not None
    return parse(render(directory, None)[0].decode())


def test_scheduler_series_on_the_tiny_model(live: Settings, tiny_model_dir: Path) -> None:
    engine = load_engine(tiny_model_dir, threads=1, max_batch=4)
    model = engine.model_id

    async def one(seed: int) -> int:
        n = 0
        async for item in engine.generate([1, 2, 3, 4 + seed], SamplingParams(max_tokens=6, temperature=0.8,
                                                                              seed=seed)):
            n = item.completion_tokens if isinstance(item, Delta) else n
        return n

    async def main() -> list[int]:
        try:
            return list(await asyncio.gather(*(one(seed) for seed in range(3))))
        finally:
            await engine.close()

    tokens = asyncio.run(main())
    s = _samples()
    assert value(s, "cheapest_time_to_first_token_seconds_count", model=model) == 3
    assert value(s, "cheapest_inter_token_latency_seconds_count", model=model) == sum(tokens) - 3
    assert value(s, "cheapest_batch_size_count", model=model) == engine.decode_steps
    assert 1 <= value(s, "cheapest_batch_size_sum", model=model) / engine.decode_steps <= 3
    assert value(s, "cheapest_queue_depth", model=model) == 0  # all done
    assert value(s, "cheapest_running_sequences", model=model) == 0
    assert value(s, "cheapest_time_to_first_token_seconds_sum", model=model) > 0


def test_usage_flush_lag_and_failures(live: Settings) -> None:
    class FlakyStore:
        fail = True

        def add_usage(self, pending: object, debits: object, flush_id: str | None = None, owners: object = None) -> None:
            if self.fail:
                raise StoreError("the store refused")

    store = FlakyStore()
    meter = UsageMeter(store, interval=60)  # type: ignore[arg-type]
    meter.record("key_a", "m", 3, 4, 0)
    with pytest.raises(StoreError):
        meter.flush()
    time.sleep(0.2)
    store.fail = False
    meter.flush()  # the kept usage, 0.2 s older than it was at the first try
    s = _samples()
    assert value(s, "cheapest_usage_flush_failures_total") == 1
    assert value(s, "cheapest_errors_total", component="store") == 1
    assert value(s, "cheapest_usage_flush_lag_seconds") >= 0.2


def test_refusals_by_kind_and_errors_by_component(live: Settings) -> None:
    for refusal in (Refusal("rate_limited", "x", code="rate_limit_exceeded", type="requests"),
                    Refusal("rate_limited", "x", code="rate_limit_exceeded", type="tokens"),
                    Refusal("rate_limited", "x", code="budget_exceeded", type="insufficient_quota"),
                    Refusal("payment_required", "x", code="insufficient_quota"),
                    Refusal("forbidden", "x", code="subscription_inactive"),
                    Refusal("not_found", "x", code="model_not_found"),  # not a refusal of this kind: not counted
                    Refusal("invalid_request", "x", code="invalid_value")):
        metrics.refused(refusal)
    for exc in (RateLimiterFull("full"), RateLimiterError("broken"), lmdb.MapFullError("full"),
                StoreError("refused"), ValueError("not ours"), KeyError("x")):
        metrics.failed(exc)
    s = _samples()
    kinds = {dict(labels)["kind"]: v for (name, labels), v in s.items() if name == "cheapest_refusals_total"}
    assert kinds == {"rpm": 1, "tpm": 1, "budget": 1, "credits": 1, "subscription": 1}
    components = {dict(labels)["component"]: v for (name, labels), v in s.items() if name == "cheapest_errors_total"}
    assert components == {"limiter": 2, "store": 2}


def test_request_labels_come_from_the_route_table_and_the_served_models(live: Settings) -> None:
    metrics.model_state("served-model", "ready")
    for i in range(500):  # a client-chosen model name that reached the hook would be a new series each time
        metrics.request("POST", CHAT, f"not-served-{i}", 404, 0.001, 0, 0)
        metrics.request(f"VERB{i}", None, None, 404, 0.001, 0, 0)
    metrics.request("POST", CHAT, "served-model", 200, 0.002, 5, 7)
    metrics.request("POST", CHAT, None, 400, 0.001, 0, 0)  # failed before a model was resolved
    metrics.request("POST", KEYS, None, 201, 0.001, 0, 0)
    metrics.request("GET", None, None, 999, 0.001, 0, 0)
    s = _samples()
    requests = {frozenset(dict(labels).items()): v for (name, labels), v in s.items()
                if name == "cheapest_requests_total"}
    assert requests == {
        frozenset({"route": CHAT.path, "method": "POST", "model": "unknown", "status": "404"}.items()): 500,
        frozenset({"route": "unmatched", "method": "other", "model": "none", "status": "404"}.items()): 500,
        frozenset({"route": CHAT.path, "method": "POST", "model": "served-model", "status": "200"}.items()): 1,
        frozenset({"route": CHAT.path, "method": "POST", "model": "unknown", "status": "400"}.items()): 1,
        frozenset({"route": "/api/keys", "method": "POST", "model": "none", "status": "201"}.items()): 1,
        frozenset({"route": "unmatched", "method": "GET", "model": "none", "status": "other"}.items()): 1,
    }
    assert value(s, "cheapest_prompt_tokens_total") == 5 and value(s, "cheapest_completion_tokens_total") == 7
    assert {dict(labels)["model"] for (name, labels) in s if name == "cheapest_prompt_tokens_total"} == \
        {"served-model"}
    assert value(s, "cheapest_model_state", model="served-model", state="ready") == 1
    assert value(s, "cheapest_model_state", model="served-model", state="loading") == 0


def test_hooks_do_nothing_until_a_worker_starts_them(tmp_path: Path) -> None:
    assert metrics.collect() is None
    metrics.request("POST", CHAT, "m", 200, 0.1, 1, 1)
    metrics.usage_flushed(1.0)
    assert metrics.scheduler("m").token(1.5, True) == 1.5
    off = load_settings({"CHEAPEST_DATA_DIR": str(tmp_path), "CHEAPEST_METRICS": "0"})
    metrics.start(off)
    assert metrics.collect() is None and not (tmp_path / "metrics").exists()


def test_directory_is_emptied_for_a_new_server_only(tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    prepare(directory, "server-1")
    (directory / "counter_123-4.db").write_bytes(b"old")
    prepare(directory, "server-1")  # a worker (re)starting under the same server
    assert (directory / "counter_123-4.db").exists()
    prepare(directory, "server-2")
    assert not list(directory.glob("*.db"))
    assert (directory / "server").read_text() == "server-2"


def test_dead_workers_are_reaped_once(tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    prepare(directory, "s")
    for ident in ("100-1", "200-2"):
        (directory / f"gauge_livesum_{ident}.db").write_bytes(b"")
        (directory / f"counter_{ident}.db").write_bytes(b"")
    assert reap(directory, lambda ident: ident == "200-2") == 1
    assert reap(directory, lambda ident: ident == "200-2") == 0
    assert sorted(p.name for p in directory.glob("*.db")) == ["counter_100-1.db", "counter_200-2.db",
                                                             "gauge_livesum_200-2.db"]


def test_a_process_ident_outlives_its_pid() -> None:
    me = process_ident()
    assert alive(me)
    pid, _, start = me.partition("-")
    assert not alive(f"{pid}-{int(start) + 1}")  # the same pid, another process
    child = subprocess.Popen(["sleep", "30"])
    ident = process_ident(child.pid)
    assert alive(ident)
    child.kill()
    child.wait()
    assert not alive(ident)


@pytest.mark.parametrize(("client", "authorization", "forwarded", "allowed"), [
    ("127.0.0.1:5000", None, False, True),
    ("127.8.9.10", None, False, True),
    ("[::1]:5000", None, False, True),
    ("::ffff:127.0.0.1", None, False, True),
    ("10.1.2.3:80", None, False, False),
    ("[2001:db8::1]:80", None, False, False),
    ("not an address", None, False, False),
    ("127.0.0.1:5000", None, True, False),  # relayed by a proxy on this host: the address says nothing
])
def test_scrape_policy_by_address(client: str, authorization: str | None, forwarded: bool, allowed: bool) -> None:
    denied = ScrapeAccess(["127.0.0.0/8", "::1"]).denied(client, authorization, forwarded)
    assert denied is (None if allowed else NOT_ALLOWED)


def test_scrape_policy_with_a_token() -> None:
    access = ScrapeAccess(["10.0.0.0/8"], "s3cret-metrics-token")
    assert access.denied("10.0.0.7:1", "Bearer s3cret-metrics-token", False) is None
    assert access.denied("10.0.0.7:1", None, False) is NO_TOKEN
    assert access.denied("10.0.0.7:1", "Bearer s3cret-metrics-toke", False) is NO_TOKEN
    assert access.denied("10.0.0.7:1", "Bearer s3cret-metrics-token\u00e9", False) is NO_TOKEN
    assert access.denied("192.0.2.1:1", "Bearer s3cret-metrics-token", False) is NOT_ALLOWED
    assert access.denied("127.0.0.1:1", "Bearer s3cret-metrics-token", True) is None  # relayed: the token


def test_the_request_hook_counts_as_the_library_would(live: Settings) -> None:
    from prometheus_client import Histogram

    from cheapest.metrics.series import REQUEST_SECONDS

    reference = Histogram("reference_seconds", "observe()'s own result", registry=None, buckets=REQUEST_SECONDS)
    durations = [0.0, 0.0005, 0.001, 0.0010001, 0.005, 0.7, 120.0, 121.0, 5000.0, *REQUEST_SECONDS]
    metrics.model_state("m", "ready")
    for seconds in durations:
        metrics.request("POST", CHAT, "m", 200, seconds, 2, 3)
        reference.observe(seconds)
    s = _samples()
    ours = {dict(labels)["le"]: v for (name, labels), v in s.items()
            if name == "cheapest_request_duration_seconds_bucket"}
    theirs = {dict(labels)["le"]: v for (name, labels), v in s.items() if name == "reference_seconds_bucket"}
    assert ours == theirs and len(ours) == len(REQUEST_SECONDS) + 1
    assert value(s, "cheapest_request_duration_seconds_sum") == pytest.approx(value(s, "reference_seconds_sum"))
    assert value(s, "cheapest_request_duration_seconds_count") == len(durations)
    assert value(s, "cheapest_requests_total", model="m") == len(durations)
    assert value(s, "cheapest_prompt_tokens_total", model="m") == 2 * len(durations)
