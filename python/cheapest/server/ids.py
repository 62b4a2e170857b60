"""Response ids (`chatcmpl-...`, `cmpl-...`): 12 random bytes each, drawn from a buffer refilled 512 ids at a
time - one getrandom(2) per request was a tenth of the handler's time. Each worker holds its own buffer, made
after it started, so two workers never hand out the same ids."""

from __future__ import annotations

import os

BATCH = 512


class ResponseIds:
    def __init__(self) -> None:
        self._ids: list[str] = []

    def new(self, prefix: str) -> str:
        if not self._ids:
            hexed = os.urandom(12 * BATCH).hex()
            self._ids.extend(hexed[i:i + 24] for i in range(0, len(hexed), 24))
        return prefix + self._ids.pop()
