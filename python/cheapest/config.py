"""The service's one configuration: `Settings`, read once at start from a TOML file and `CHEAPEST_*` variables.

`load_settings()` is the only place in the service that reads the environment for configuration; every command
(`serve`, `model`, `accounts`, `retention`) and the server's `App(settings)` get the result passed in.

Settings come in sections - `[serving]`, `[store]`, `[engine]`, `[billing]` - plus the `[plans.NAME]` and
`[prices."MODEL"]` tables. Every scalar setting also has one flat name, unique across sections: the environment
variable is `CHEAPEST_<FLAT NAME>` (upper case), and the TOML file may give it at top level under that name
(`port = 8000` is `[serving] port = 8000`), the form older files use. Precedence: environment, then the file, then
the default. An unknown key, a wrong type, a setting given twice in the file or an invalid value is a
`ConfigError` naming the key, raised at start.

Two settings are tables filled from prefixed variables: `billing.stripe_prices` (`CHEAPEST_STRIPE_PRICE_<PLAN>`,
the Stripe price id of each plan) and `engine.model_options` (`CHEAPEST_MODEL_OPTION_<NAME>`, options for an
engine plugin named by `model_backend`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from cheapest.store.settings import StoreSettings
from cheapest.vocabulary import MICRO_PER_USD, BudgetWindow, Funding, usd_to_micro

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
BASE_USDC = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"  # USDC on Base mainnet
ENV_PREFIX = "CHEAPEST_"
MIN_METRICS_TOKEN = 16


class ConfigError(ValueError):
    """The configuration is invalid; the message names the setting (never its value: it may be a secret)."""


class PlanConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A plan's limits, for the whole account across all its keys (rpm, tpm, budget_usd per budget_window; a
    key's own limits apply inside them), how many live keys the account may hold, and how it is paid for.
    `funding`: "free" (no charge), "subscription" (a Stripe subscription must be in good standing), "credits"
    (usage debits the account's credit balance; an empty balance is refused with 402). Unset: "subscription"
    when the plan has a monthly price, else "free"."""

    rpm: int
    tpm: int
    price_usd_month: float = 0.0
    budget_usd: float | None = None
    budget_window: BudgetWindow | None = None
    funding: Funding | None = None
    max_keys: int = 1000  # live keys (inference and management) an account may hold

    def __post_init__(self) -> None:
        if self.rpm < 1 or self.tpm < 1 or self.max_keys < 1:
            raise ValueError("rpm, tpm and max_keys must be at least 1")

    @property
    def funded_by(self) -> Funding:
        if self.funding is not None:
            return self.funding
        return "subscription" if self.price_usd_month > 0 else "free"


class PriceConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """USD per million tokens, as providers quote them."""

    prompt_usd_per_mtok: float = 0.0
    completion_usd_per_mtok: float = 0.0

    def cost_micro(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Integer micro-dollars for one request, rounded up (1 USD per Mtok = 1 micro-dollar per token)."""
        pico = round(self.prompt_usd_per_mtok * MICRO_PER_USD) * prompt_tokens + round(
            self.completion_usd_per_mtok * MICRO_PER_USD
        ) * completion_tokens
        return -(-pico // MICRO_PER_USD)


DEFAULT_PLANS = {
    "free": PlanConfig(rpm=20, tpm=20_000),
    "standard": PlanConfig(rpm=60, tpm=3_333, price_usd_month=5.0),
    "pro": PlanConfig(rpm=200, tpm=13_333, price_usd_month=20.0),
    "payg": PlanConfig(rpm=60, tpm=10_000, funding="credits"),
}

# The shipped models' list prices; an operator's `prices` table replaces the whole mapping.
DEFAULT_PRICES = {
    "SmolLM2-135M-Instruct": PriceConfig(prompt_usd_per_mtok=0.05, completion_usd_per_mtok=0.10),
    "gemma-3-270m": PriceConfig(prompt_usd_per_mtok=0.08, completion_usd_per_mtok=0.16),
    "all-MiniLM-L6-v2": PriceConfig(prompt_usd_per_mtok=0.01),
}


class ServingSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`cheapest serve` and what every request may carry."""

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    max_body_bytes: int = 1 << 20  # larger bodies get 413
    default_max_tokens: int = 1024  # completion budget when a request sets none (clamped to the context)
    max_choices: int = 8  # the most sequences one request may ask for (n, best_of, prompts x n)
    request_log: bool = True  # one JSON metadata line per request on stdout
    embedding_max_inputs: int = 2048  # inputs in one /v1/embeddings request
    embedding_max_tokens: int = 0  # tokens per embedding input (0 = the model's own limit; never above it)
    embedding_truncate: bool = False  # cut a longer input to the limit instead of refusing it (400)
    # Prometheus metrics for operators (metrics/): collected by every worker, served on /metrics, or only on
    # 127.0.0.1:metrics_port when that is set (`cheapest serve`); to clients in `metrics_allow` (addresses or
    # networks) that also give `metrics_token` as a bearer token when one is set.
    metrics: bool = True
    metrics_port: int = 0
    metrics_allow: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.0/8", "::1"])
    metrics_token: str = ""
    metrics_dir: str = ""  # the workers' metric files; "" = <data>/metrics

    def __post_init__(self) -> None:
        if self.embedding_max_inputs < 1 or self.embedding_max_tokens < 0:
            raise ValueError("embedding_max_inputs must be at least 1 and embedding_max_tokens at least 0")
        if not 0 <= self.metrics_port <= 65535 or self.metrics_port == self.port:
            raise ValueError("metrics_port must be 0 (off) or a port other than `port`")
        for entry in self.metrics_allow:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError("metrics_allow holds an entry that is not an IP address or network") from None
        if self.metrics_token and len(self.metrics_token) < MIN_METRICS_TOKEN:
            raise ValueError(f"metrics_token must be at least {MIN_METRICS_TOKEN} characters")


class EngineSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The models a worker serves. `model_backend`: "onnx" (model directories in the Hugging Face ONNX layout),
    or "module:callable", an engine factory `(EngineSettings, add_route) -> Engine` importable in the worker
    (the tests' fixed-output engine is one), called once per model with that model's `model_dir`;
    `model_options` are that factory's own options.

    `models`: the models to serve, each a model directory or a name under <data>/models (a catalogue name such as
    "gemma-3-270m"); in the environment, comma-separated. Empty: `model_dir` alone. After loading the settings,
    `models` holds directories only. `chat_templates`: model id -> a Jinja chat template for a model that ships
    none (a base model) or whose own should be replaced (file only: model ids are not variable names)."""

    model_backend: str = "onnx"
    model_dir: str = ""  # "" = <data>/models/SmolLM2-135M-Instruct
    models: list[str] = []
    chat_templates: dict[str, str] = {}
    model_threads: int = 0  # ONNX Runtime intra-op threads (0 = its default)
    model_spin_us: int = 50  # µs idle ORT pool threads spin before sleeping (0 = never)
    model_huge_pages: bool = True  # weights copied into transparent huge pages (false: workers share the file's)
    model_options: dict[str, str | int | float | bool] = {}

    def __post_init__(self) -> None:
        if self.model_backend != "onnx" and not re.fullmatch(r"[\w.]+:[\w.]+", self.model_backend):
            raise ValueError("model_backend must be 'onnx' or an import path 'module:callable'")


class BillingSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Plans of new accounts, Stripe and USDC on Base. A payment method whose secrets are missing is simply
    unavailable (its routes answer 503)."""

    default_plan: str = "free"
    stripe_secret_key: str | None = None
    stripe_webhook_secret: str | None = None
    stripe_prices: dict[str, str] = {}  # plan -> Stripe price id
    stripe_api_base: str = "https://api.stripe.com"
    public_url: str = "http://127.0.0.1:8000"  # where Checkout's success and cancel pages default to
    stripe_success_url: str = ""  # "" = <public_url>/billing/success?session_id={CHECKOUT_SESSION_ID}
    stripe_cancel_url: str = ""  # "" = <public_url>/billing/cancel
    base_rpc_url: str = "https://mainnet.base.org"
    usdc_contract: str = BASE_USDC
    usdc_receiver: str | None = None
    chain_id: int = 8453
    usdc_confirmations: int = 12  # blocks on top of the transfer's, inclusive, up to the `usdc_finality` block
    usdc_finality: Literal["safe", "finalized", "latest"] = "safe"  # the newest block that counts (see billing)
    usdc_min_topup_usd: float = 1.0
    usdc_max_topup_usd: float = 10_000.0

    def __post_init__(self) -> None:
        from eth_utils import is_address, to_checksum_address

        for name in ("usdc_contract", "usdc_receiver"):
            value = getattr(self, name)
            if value is None:
                continue
            if not is_address(value):
                raise ValueError(f"{name} is not an EVM address")
            # Frozen Struct: normalise once here so comparisons later are plain string equality.
            msgspec.structs.force_setattr(self, name, to_checksum_address(value))
        if self.usdc_confirmations < 1:
            raise ValueError("usdc_confirmations must be at least 1")
        for name in ("usdc_min_topup_usd", "usdc_max_topup_usd"):
            try:
                usd_to_micro(getattr(self, name))
            except ValueError:
                raise ValueError(f"{name} must be a dollar amount with at most 6 decimals") from None
        if not 0 < self.usdc_min_topup_micro <= self.usdc_max_topup_micro:
            raise ValueError("top-up bounds must satisfy 0 < usdc_min_topup_usd <= usdc_max_topup_usd")
        public = self.public_url.rstrip("/")
        msgspec.structs.force_setattr(self, "stripe_api_base", self.stripe_api_base.rstrip("/"))
        if not self.stripe_success_url:
            msgspec.structs.force_setattr(self, "stripe_success_url",
                                          public + "/billing/success?session_id={CHECKOUT_SESSION_ID}")
        if not self.stripe_cancel_url:
            msgspec.structs.force_setattr(self, "stripe_cancel_url", public + "/billing/cancel")

    @property
    def usdc_min_topup_micro(self) -> int:
        return usd_to_micro(self.usdc_min_topup_usd)

    @property
    def usdc_max_topup_micro(self) -> int:
        return usd_to_micro(self.usdc_max_topup_usd)

    @property
    def plan_for_price(self) -> dict[str, str]:
        return {price: plan for plan, price in self.stripe_prices.items()}


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    serving: ServingSettings = ServingSettings()
    store: StoreSettings = StoreSettings()
    engine: EngineSettings = EngineSettings()
    billing: BillingSettings = BillingSettings()
    plans: dict[str, PlanConfig] = msgspec.field(default_factory=lambda: dict(DEFAULT_PLANS))
    prices: dict[str, PriceConfig] = msgspec.field(default_factory=lambda: dict(DEFAULT_PRICES))

    def __post_init__(self) -> None:
        engine = self.engine
        if not engine.model_dir:
            engine = msgspec.structs.replace(engine, model_dir=str(self.models_path / DEFAULT_MODEL))
        dirs = [self._model_path(m) for m in engine.models] or [engine.model_dir]
        names = [Path(d).name for d in dirs]
        if len(set(names)) != len(names):
            raise ValueError("engine.models names one model twice")
        msgspec.structs.force_setattr(self, "engine", msgspec.structs.replace(engine, models=dirs))
        if self.billing.default_plan not in self.plans:
            raise ValueError("billing.default_plan names no configured plan")
        for name, plan in self.plans.items():
            if (plan.budget_usd is None) != (plan.budget_window is None):
                raise ValueError(f"plans.{name} needs both budget_usd and budget_window")

    def _model_path(self, entry: str) -> str:
        """A directory as given, or a bare name (no path separator) under <data>/models."""
        if not entry.strip():
            raise ValueError("engine.models has an empty entry")
        return entry if os.sep in entry or entry.startswith(".") else str(self.models_path / entry)

    @property
    def data_path(self) -> Path:
        return self.store.data_path

    @property
    def models_path(self) -> Path:
        """Converted model directories, one per model id (`cheapest model pull` writes here)."""
        return self.data_path / "models"

    @property
    def metrics_path(self) -> Path:
        """The workers' metric files (prometheus-client's multiprocess files; metrics/files.py)."""
        return Path(self.serving.metrics_dir) if self.serving.metrics_dir else self.data_path / "metrics"

    @property
    def cache_path(self) -> Path:
        """Downloaded wheels and extracted GGUFs."""
        return self.data_path / "cache"

    def price(self, model: str) -> PriceConfig:
        return self.prices.get(model) or PriceConfig()

    def plan(self, name: str) -> PlanConfig:
        return self.plans.get(name) or self.plans.get(self.billing.default_plan) or DEFAULT_PLANS["free"]


SECTIONS: dict[str, type[msgspec.Struct]] = {
    "serving": ServingSettings, "store": StoreSettings, "engine": EngineSettings, "billing": BillingSettings,
}
TABLES = ("plans", "prices")
FILE_ONLY = frozenset({"chat_templates"})  # settings the environment cannot give
LISTS = frozenset({"models", "metrics_allow"})  # comma-separated in the environment
# Table-valued settings filled from prefixed variables: name -> (section, variable prefix).
ENV_TABLES = {"stripe_prices": ("billing", "CHEAPEST_STRIPE_PRICE_"),
              "model_options": ("engine", "CHEAPEST_MODEL_OPTION_")}
# Every setting's flat name -> (its section, its type).
FLAT: dict[str, tuple[str, Any]] = {
    f.name: (section, f.type) for section, cls in SECTIONS.items() for f in msgspec.structs.fields(cls)
}
assert len(FLAT) == sum(len(msgspec.structs.fields(c)) for c in SECTIONS.values()), "flat names must be unique"


def env_name(flat: str) -> str:
    return ENV_PREFIX + flat.upper()


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def _from_file(doc: dict[str, Any]) -> dict[str, Any]:
    """The file's settings arranged by section; flat top-level names are moved into theirs."""
    raw: dict[str, Any] = {name: {} for name in SECTIONS}
    for key, value in doc.items():
        if key in SECTIONS or key in TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"`{key}` must be a table ([{key}])")
            if key in TABLES:
                raw[key] = value
                continue
            fields = {f.name for f in msgspec.structs.fields(SECTIONS[key])}
            for name, item in value.items():
                if name not in fields:
                    raise ConfigError(f"unknown setting `{key}.{name}`")
                if name in raw[key]:
                    raise ConfigError(f"`{key}.{name}` is set twice (also as `{name}` at top level)")
                raw[key][name] = item
        elif key in FLAT:
            section = FLAT[key][0]
            if key in raw[section]:
                raise ConfigError(f"`{section}.{key}` is set twice (also as `{key}` at top level)")
            raw[section][key] = value
        else:
            raise ConfigError(f"unknown setting `{key}`")
    return raw


_AT = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")  # where msgspec says the error is


def _from_env(env: Mapping[str, str], raw: dict[str, Any]) -> None:
    """Overlay CHEAPEST_* variables (strings, converted to each setting's type) on the file's settings."""
    for flat, (section, typ) in FLAT.items():
        if flat in ENV_TABLES:
            prefix = ENV_TABLES[flat][1]
            table = {k[len(prefix):].lower(): v for k, v in env.items() if k.startswith(prefix) and v}
            if table:
                raw[section][flat] = {**raw[section].get(flat, {}), **table}
            continue
        value = env.get(env_name(flat))
        if flat in FILE_ONLY or value is None or value == "":
            continue
        if flat in LISTS:
            raw[section][flat] = [item.strip() for item in value.split(",") if item.strip()]
            continue
        try:
            raw[section][flat] = msgspec.convert(value, typ, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{env_name(flat)}: {_reason(exc)}") from None


def _reason(exc: msgspec.ValidationError) -> str:
    return _AT.sub("", str(exc))


def _checked(raw: Any, typ: Any, where: str) -> Any:
    """`raw` converted strictly to `typ`; a failure is a ConfigError naming the key under `where`."""
    try:
        return msgspec.convert(raw, typ, strict=True)
    except msgspec.ValidationError as exc:
        text = str(exc)
        m = _AT.search(text)
        key = ".".join(p for p in (where, m.group("path") if m else "") if p)
        unknown = re.match(r"Object contains unknown field `(?P<name>[^`]+)`", text)
        if unknown:
            raise ConfigError(f"unknown setting `{key}.{unknown.group('name')}`") from None
        reason = text[: m.start()] if m else text
        raise ConfigError(f"`{key}`: {reason}" if key else reason) from None


def _convert(raw: dict[str, Any]) -> Settings:
    # Tables are checked entry by entry so that an error names the plan or model it is about.
    plans = {**DEFAULT_PLANS, **{name: _checked(table, PlanConfig, f"plans.{name}")
                                 for name, table in raw.pop("plans", {}).items()}}  # configured plans extend
    if "prices" in raw:  # configured prices replace the defaults
        raw["prices"] = {name: _checked(table, PriceConfig, f"prices.{name}")
                         for name, table in raw["prices"].items()}
    return _checked({**raw, "plans": plans}, Settings, "")


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the TOML file named by CHEAPEST_CONFIG, overlaid with CHEAPEST_* variables."""
    env = os.environ if environ is None else environ
    path = env.get("CHEAPEST_CONFIG")
    raw = _from_file(_read_file(path) if path else {})
    _from_env(env, raw)
    return _convert(raw)
