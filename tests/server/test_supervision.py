"""A crashed worker is not an outage: `cheapest serve` replaces it while the other worker keeps serving, a crash
loop backs off instead of stopping the server, and a stream cut by the crash is billed up to its last usage flush.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from cheapest.server.supervisor import CrashLoop
from cheapest.store import open_store
from fixtures_server import ServerProcess, free_port, serve_cli, server_env, worker_pid

MODEL = "SmolLM2-135M-Instruct"
MSG = [{"role": "user", "content": "Count to forty, slowly."}]
DELAY = 0.05  # seconds per token of the fixed engine
FLUSH = 0.5  # usage_flush_interval
KILLS = 3


def test_crash_loop_backs_off_and_forgets_old_crashes() -> None:
    loop = CrashLoop(window=60.0, first=0.5, most=30.0)
    assert loop.record(1, 1000.0) == (1, 0.0)  # a lone crash: at once
    assert loop.record(1, 1001.0) == (2, 0.5)
    assert loop.record(1, 1002.0) == (3, 1.0)
    assert [loop.record(1, 1003.0 + i)[1] for i in range(8)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert loop.record(2, 1100.0) == (2, 0.5)  # a minute later the old crashes no longer count; two at once


def _body(max_tokens: int, stream: bool) -> dict[str, object]:
    return {"model": MODEL, "messages": MSG, "max_tokens": max_tokens, "stream": stream}


def _other_worker(server: ServerProcess, avoid: set[int], deadline: float) -> tuple[httpx.Client, int]:
    """A connection to a worker whose pid is not in `avoid` (waiting for a replacement to come up)."""
    while True:
        client = httpx.Client(timeout=30)
        try:
            pid = worker_pid(server, client)
            if pid not in avoid:
                return client, pid
        except httpx.HTTPError:
            pass
        client.close()
        assert time.monotonic() < deadline, "no replacement worker came up"
        time.sleep(0.05)


def _stored(server: ServerProcess, key_id: str) -> tuple[int, int]:
    store = open_store(server.data_dir)
    try:
        rows = list(store.usage([key_id]))
    finally:
        store.close()
    return sum(r.counter.requests for r in rows), sum(r.counter.completion_tokens for r in rows)


@pytest.mark.slow  # a two-worker server, killed three times
def test_killed_worker_is_replaced_while_the_other_serves_and_its_stream_is_billed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    port = free_port()
    env = server_env(data) | {"CHEAPEST_MODEL_OPTION_DELAY": str(DELAY), "CHEAPEST_MODEL_OPTION_TOKENS": "40",
                              "CHEAPEST_USAGE_FLUSH_INTERVAL": str(FLUSH)}
    server = serve_cli(tmp_path, env, port, "--port", str(port), "--workers", "2", data=data, workers=2)
    try:
        _, mk = server.create_account(plan="pro")
        steady_key = str(server.create_key(mk, name="steady")["key"])
        cut = server.create_key(mk, name="cut")
        headers = {"Authorization": f"Bearer {steady_key}"}

        # Load on the surviving worker: one keep-alive connection, answers and streams back to back.
        survivor = httpx.Client(timeout=30)
        kept = worker_pid(server, survivor)
        served: list[int] = []
        failures: list[str] = []
        stop = threading.Event()

        def steady() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    r = survivor.post(server.v1 + "/chat/completions", json=_body(4, n % 2 == 0), headers=headers)
                    ok = r.status_code == 200 and (n % 2 == 1 or r.text.endswith("data: [DONE]\n\n"))
                    (served if ok else failures).append(r.status_code)
                except httpx.HTTPError as exc:
                    failures.append(type(exc).__name__)

        load = threading.Thread(target=steady)
        load.start()
        killed: set[int] = set()
        received = 0  # tokens the cut streams delivered before their worker died
        started = time.monotonic()
        for _ in range(KILLS):
            client, victim = _other_worker(server, killed | {kept}, time.monotonic() + 60)
            try:
                with client.stream("POST", server.v1 + "/chat/completions", json=_body(40, True),
                                   headers={"Authorization": f"Bearer {cut['key']}"}) as r:
                    assert r.status_code == 200
                    for line in r.iter_lines():
                        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                            received += 1
                            if received % 15 == 0:  # well into the stream
                                os.kill(victim, signal.SIGKILL)
                                killed.add(victim)
            except httpx.HTTPError:
                pass  # the cut stream: expected
            finally:
                client.close()
            assert victim in killed
        # The server answers after the kills, from a new worker as well as the old one.
        client, _ = _other_worker(server, killed | {kept}, time.monotonic() + 60)
        try:
            r = client.post(server.v1 + "/chat/completions", json=_body(4, False), headers=headers)
            assert r.status_code == 200, r.text
        finally:
            client.close()
        elapsed = time.monotonic() - started
        stop.set()
        load.join()
        assert httpx.get(server.base_url + "/readyz", timeout=10).status_code == 200
        assert failures == [] and len(served) > 10, (failures, len(served))
        assert worker_pid(server, survivor) == kept  # the survivor was never interrupted
        survivor.close()

        time.sleep(2 * FLUSH)
        requests, stored = _stored(server, str(cut["id"]))
        # Each cut stream was billed while it ran: what its dead worker had not flushed yet is lost, at most one
        # flush interval's tokens (FLUSH / DELAY) plus the one in flight, per kill.
        lost_bound = KILLS * (int(FLUSH / DELAY) + 1)
        print(f"\ncrash test: {KILLS} kills in {elapsed:.1f}s, {len(served)} requests served by the other worker, "
              f"0 failed; cut streams delivered {received} tokens, {stored} billed "
              f"(lost {max(0, received - stored)}, bound {lost_bound})")
        assert requests == KILLS
        assert received - lost_bound <= stored <= received + KILLS * 2
        log = server.output()
        assert log.count("exited unexpectedly") == KILLS, log[-3000:]
    finally:
        server.stop()
