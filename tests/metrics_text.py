"""Reading a server's /metrics in tests: the samples, parsed by prometheus-client's own parser, and the promise
that they hold metadata only."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable

import httpx
from prometheus_client.parser import text_string_to_metric_families

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(base_url: str, headers: dict[str, str] | None = None) -> Samples:
    r = httpx.get(base_url + "/metrics", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the samples of `name` whose labels include `labels` (0 when there are none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def scrape_until(base_url: str, ready: Callable[[Samples], bool], timeout: float = 10.0) -> Samples:
    """Scrape until `ready` holds: the other workers write their values twice a second."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(base_url)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


# Any id the store makes (accounts.new_id: a prefix and 16 hex digits), any key secret, any email address.
IDENTIFIERS = re.compile(r"\b(?:[a-z]+_[0-9a-f]{16}|[sm]k_[0-9A-Za-z]{20,})\b|@")


def assert_metadata_only(text: str, forbidden: Iterable[bytes | str]) -> None:
    """No forbidden string (a canary, a key id, an account id) and no identifier at all in the scraped text."""
    raw = text.encode()
    for item in forbidden:
        needle = item if isinstance(item, bytes) else item.encode()
        assert needle not in raw, needle
    found = IDENTIFIERS.search(text)
    assert found is None, found
