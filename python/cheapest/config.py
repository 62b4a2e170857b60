"""Service settings: environment variables `CHEAPEST_*` over a TOML file named by `CHEAPEST_CONFIG`.

Settings are converted once, at start (`get_settings()` caches them); nothing reads the environment per request.

Environment variables (all optional; default in brackets):

    CHEAPEST_CONFIG                 path of a TOML file with any of the settings below            [none]
    CHEAPEST_DATA_DIR               data directory: LMDB store, models, rate-limit table, secrets [~/.local/share/cheapest]
    CHEAPEST_HOST / _PORT / _WORKERS   `cheapest serve` address and worker processes              [127.0.0.1 / 8000 / 1]
    CHEAPEST_MODEL_BACKEND          "onnx" (the converted model) or "fixed" (instant fixed output) [onnx]
    CHEAPEST_MODEL_DIR              model directory served by the onnx backend  [<data>/models/SmolLM2-135M-Instruct]
    CHEAPEST_MODEL_THREADS          ONNX Runtime intra-op threads (0 = its default)                [0]
    CHEAPEST_MODEL_SPIN_US          µs idle ORT pool threads spin before sleeping (0 = never; lower on busy hosts) [50]
    CHEAPEST_FIXED_TEXT             the fixed backend's completion text        ["The capital of France is Paris."]
    CHEAPEST_FIXED_TOKENS           fixed backend: completion length in words, cycling the text (0 = the text once) [0]
    CHEAPEST_FIXED_DELAY            fixed backend: seconds per generated word (to observe streaming)  [0]
    CHEAPEST_FIXED_FAIL_SEED        fixed backend (tests only): a request with this seed fails mid-generation [none]
    CHEAPEST_MAX_BODY_BYTES         request bodies above this get 413                              [1048576]
    CHEAPEST_DEFAULT_MAX_TOKENS     completion budget when a request sets none (clamped to context)[1024]
    CHEAPEST_USAGE_FLUSH_INTERVAL   seconds between usage flushes of a worker to LMDB              [1.0]
    CHEAPEST_KEY_PEPPER             server secret for key hashing (>= 16 bytes) [generated once into <data>/secrets/pepper]
    CHEAPEST_DEFAULT_PLAN           plan of new accounts                                           [free]
    CHEAPEST_LMDB_MAP_SIZE          LMDB map size in bytes                                         [1 GiB]
    CHEAPEST_RATELIMIT_CAPACITY     slots in the shared rate-limit table                           [65536]
    CHEAPEST_REQUEST_LOG            1/0: one JSON metadata line per request on stdout              [1]
    CHEAPEST_RETENTION_INTERVAL     seconds between in-server retention runs, one worker at a time (0 = off) [3600]

TOML-only tables (defaults shown):

    [plans.free]     rpm = 20,  tpm = 20000, price_usd_month = 0       (funding "free": no charge)
    [plans.standard] rpm = 60,  tpm = 3333,  price_usd_month = 5       (funding "subscription", via Stripe)
    [plans.pro]      rpm = 200, tpm = 13333, price_usd_month = 20      (funding "subscription", via Stripe)
    [plans.payg]     rpm = 60,  tpm = 10000, funding = "credits"       (each request's cost debits the balance)
    Any plan may also set budget_usd + budget_window ("5h"|"8h"|"1d"|"30d"): a per-key spend cap per window.
    [prices."SmolLM2-135M-Instruct"]  prompt_usd_per_mtok = 0.0, completion_usd_per_mtok = 0.0
"""

from __future__ import annotations

import os
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import msgspec

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


class PlanConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A plan's per-key limits and how it is paid for. `funding`: "free" (no charge), "subscription" (a Stripe
    subscription must be in good standing), "credits" (usage debits the account's credit balance; an empty
    balance is refused with 402). Unset: "subscription" when the plan has a monthly price, else "free"."""

    rpm: int
    tpm: int
    price_usd_month: float = 0.0
    budget_usd: float | None = None
    budget_window: Literal["5h", "8h", "1d", "30d"] | None = None
    funding: Literal["free", "subscription", "credits"] | None = None

    @property
    def funded_by(self) -> Literal["free", "subscription", "credits"]:
        if self.funding is not None:
            return self.funding
        return "subscription" if self.price_usd_month > 0 else "free"


class PriceConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """USD per million tokens, as providers quote them."""

    prompt_usd_per_mtok: float = 0.0
    completion_usd_per_mtok: float = 0.0

    def cost_micro(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Integer micro-dollars for one request, rounded up (1 USD per Mtok = 1 micro-dollar per token)."""
        pico = round(self.prompt_usd_per_mtok * 1_000_000) * prompt_tokens + round(
            self.completion_usd_per_mtok * 1_000_000
        ) * completion_tokens
        return -(-pico // 1_000_000)


DEFAULT_PLANS = {
    "free": PlanConfig(rpm=20, tpm=20_000),
    "standard": PlanConfig(rpm=60, tpm=3_333, price_usd_month=5.0),
    "pro": PlanConfig(rpm=200, tpm=13_333, price_usd_month=20.0),
    "payg": PlanConfig(rpm=60, tpm=10_000, funding="credits"),
}


# The default model's list price; an operator's `prices` table replaces the whole mapping.
DEFAULT_PRICES = {
    "SmolLM2-135M-Instruct": PriceConfig(prompt_usd_per_mtok=0.05, completion_usd_per_mtok=0.10),
}


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    data_dir: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    model_backend: str = "onnx"
    model_dir: str = ""
    model_threads: int = 0
    model_spin_us: int = 50
    fixed_text: str = "The capital of France is Paris."
    fixed_tokens: int = 0
    fixed_delay: float = 0.0
    fixed_fail_seed: int | None = None
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 1024
    usage_flush_interval: float = 1.0
    key_pepper: str = ""
    default_plan: str = "free"
    lmdb_map_size: int = 1 << 30
    ratelimit_capacity: int = 65536
    request_log: bool = True
    retention_interval: float = 3600.0
    plans: dict[str, PlanConfig] = msgspec.field(default_factory=lambda: dict(DEFAULT_PLANS))
    prices: dict[str, PriceConfig] = msgspec.field(default_factory=lambda: dict(DEFAULT_PRICES))

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def price(self, model: str) -> PriceConfig:
        return self.prices.get(model) or PriceConfig()

    def plan(self, name: str) -> PlanConfig:
        return self.plans.get(name) or self.plans.get(self.default_plan) or DEFAULT_PLANS["free"]


_SCALARS = {
    name: typ
    for name, typ in (
        ("data_dir", str), ("host", str), ("port", int), ("workers", int), ("model_backend", str),
        ("model_dir", str), ("model_threads", int), ("model_spin_us", int), ("fixed_text", str), ("fixed_tokens", int), ("fixed_delay", float), ("max_body_bytes", int),
        ("default_max_tokens", int), ("usage_flush_interval", float), ("key_pepper", str),
        ("default_plan", str), ("lmdb_map_size", int), ("ratelimit_capacity", int), ("request_log", bool),
        ("fixed_fail_seed", int), ("retention_interval", float),
    )
}


def _default_data_dir() -> str:
    try:  # the model-supply module owns the one definition of the data directory
        from cheapest.convert.pull import data_dir
    except ImportError:
        env = os.environ.get("CHEAPEST_DATA_DIR")
        return env or str(Path.home() / ".local" / "share" / "cheapest")
    return str(data_dir())


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Build Settings from a TOML file (CHEAPEST_CONFIG) overlaid with CHEAPEST_* variables."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    path = env.get("CHEAPEST_CONFIG")
    if path:
        with open(path, "rb") as f:
            raw.update(tomllib.load(f))
    for name in _SCALARS:
        value = env.get("CHEAPEST_" + name.upper())
        if value is not None and value != "":
            raw[name] = value
    if "plans" in raw:  # configured plans extend the defaults
        raw["plans"] = {**{k: msgspec.to_builtins(v) for k, v in DEFAULT_PLANS.items()}, **raw["plans"]}
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SystemExit(f"invalid configuration: {exc}") from None
    if not settings.data_dir:
        settings = msgspec.structs.replace(settings, data_dir=_default_data_dir())
    if not settings.model_dir:
        settings = msgspec.structs.replace(
            settings, model_dir=str(Path(settings.data_dir) / "models" / DEFAULT_MODEL)
        )
    if settings.model_backend not in ("onnx", "fixed"):
        raise SystemExit("invalid configuration: model_backend must be 'onnx' or 'fixed'")
    if settings.default_plan not in settings.plans:
        raise SystemExit("invalid configuration: default_plan names no configured plan")
    for name, plan in settings.plans.items():
        if (plan.budget_usd is None) != (plan.budget_window is None):
            raise SystemExit(f"invalid configuration: plan {name} needs both budget_usd and budget_window")
    return settings


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
