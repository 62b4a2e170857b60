"""The store's settings (the `[store]` section of the configuration): where the host's state lives and how it
is kept - the data directory, the LMDB map size, the shared rate-limit table, the key pepper, flush and
retention intervals, and for many hosts the PostgreSQL store and the Redis limiter."""

from __future__ import annotations

from pathlib import Path

import msgspec

from cheapest.store.secrets import MIN_PEPPER_BYTES


class StoreSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    data_dir: str = ""  # "" = ~/.local/share/cheapest
    lmdb_map_size: int = 1 << 30
    ratelimit_capacity: int = 65536  # distinct keys the shared rate-limit table holds
    key_pepper: str = ""  # "" = generated once into <data>/secrets/pepper
    usage_flush_interval: float = 1.0  # seconds between a worker's usage flushes (the most `kill -9` can lose)
    retention_interval: float = 3600.0  # seconds between in-server retention runs (0 = off)
    store_url: str = ""  # "postgresql://...": PostgreSQL is the store (many hosts); "" = LMDB in data_dir
    limiter_url: str = ""  # "redis://..." (Redis or Valkey): rate limits and the change epoch; "" = this host's table

    def __post_init__(self) -> None:
        data = self.data_dir or str(Path.home() / ".local" / "share" / "cheapest")
        msgspec.structs.force_setattr(self, "data_dir", str(Path(data).expanduser()))
        if self.key_pepper and len(self.key_pepper.encode()) < MIN_PEPPER_BYTES:
            raise ValueError(f"key_pepper must be at least {MIN_PEPPER_BYTES} bytes")
        if self.store_url and not self.store_url.startswith(("postgresql://", "postgres://")):
            raise ValueError("store_url must be a postgresql:// URL")
        if self.limiter_url and not self.limiter_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("limiter_url must be a redis://, rediss:// or unix:// URL")

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def ratelimit_path(self) -> Path:
        """The host's shared rate-limit table. The name carries the table's format version: a table of an older
        version is refused by the core, and it held nothing but a few minutes of rate state, so a new file is
        simply started beside it (`OLD_RATELIMIT_FILES` are removed at start) - no worker ever has to delete a
        file another one may be opening."""
        return self.data_path / RATELIMIT_FILE


RATELIMIT_FILE = "ratelimit-v2.bin"
OLD_RATELIMIT_FILES = ("ratelimit.bin",)
