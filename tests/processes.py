"""The two-process harness: the same work started in N processes at once, to show that the store's once-only
records and counters hold across workers (each process opens its own store, as a server worker does)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from typing import Any


def _run(target: Callable[..., Any], args: Sequence[Any], barrier: Any, out: Any) -> None:
    try:
        out.put(("ok", target(lambda: barrier.wait(timeout=60), *args)))
    except BaseException as exc:  # report, so the test fails at once instead of waiting on the queue
        out.put(("error", repr(exc)))


def in_processes(target: Callable[..., Any], *args: Any, n: int = 2, method: str = "spawn",
                 timeout: float = 120.0) -> list[Any]:
    """Run `target(start, *args)` in `n` processes and return their results. Each calls `start()` once it is
    ready (store opened), so all of them race from the same moment. `method="fork"` shares objects that cannot
    be pickled (a local chain) with the children."""
    ctx = multiprocessing.get_context(method)
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_run, args=(target, args, barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    errors = [value for status, value in results if status == "error"]
    assert not errors, errors
    return [value for _, value in results]
