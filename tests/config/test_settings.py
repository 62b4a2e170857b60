"""`load_settings`: sections and flat names, environment over file over defaults, clear errors naming the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from cheapest.config import (
    ENV_TABLES, FILE_ONLY, FLAT, LISTS, SECTIONS, ConfigError, PriceConfig, Settings, env_name, load_settings,
)
from cheapest.store import StoreSettings, open_configured_store
from cheapest.store.settings import RATELIMIT_FILE

RECEIVER = "0x2B5AD5c4795c026514f8317c7a215E218DcCD6cF"
# A value other than the default for every scalar setting (each README variable but CHEAPEST_CONFIG).
SAMPLE: dict[str, Any] = {
    "host": "0.0.0.0", "port": 9100, "workers": 3, "max_body_bytes": 4096, "default_max_tokens": 7, "max_choices": 4,
    "request_log": False, "embedding_max_inputs": 16, "embedding_max_tokens": 64, "embedding_truncate": True,
    "metrics": False, "metrics_port": 9200, "metrics_token": "m" * 20, "metrics_dir": "/run/cheapest-metrics",
    "data_dir": "/srv/cheapest", "lmdb_map_size": 1 << 26, "ratelimit_capacity": 1024,
    "key_pepper": "p" * 24, "usage_flush_interval": 0.5, "retention_interval": 60.0,
    "store_url": "postgresql://cheapest@db.example.test/cheapest", "limiter_url": "redis://cache.example.test:6379/0",
    "model_backend": "fixed_engine:load", "model_dir": "/srv/models/M", "model_threads": 2, "model_spin_us": 0, "model_huge_pages": False,
    "default_plan": "pro", "stripe_secret_key": "sk_test_x", "stripe_webhook_secret": "whsec_x",
    "stripe_api_base": "http://127.0.0.1:1", "public_url": "https://example.test",
    "stripe_success_url": "https://example.test/ok", "stripe_cancel_url": "https://example.test/no",
    "base_rpc_url": "http://127.0.0.1:2", "usdc_contract": RECEIVER, "usdc_receiver": RECEIVER,
    "chain_id": 84532, "usdc_confirmations": 5, "usdc_min_topup_usd": 2.5, "usdc_max_topup_usd": 500.0,
    "usdc_finality": "finalized",
}


def _toml(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def _load(tmp_path: Path, text: str, **env: str) -> Settings:
    cfg = tmp_path / "cheapest.toml"
    cfg.write_text(text)
    return load_settings({"CHEAPEST_CONFIG": str(cfg), **env})


def _field(settings: Settings, name: str) -> Any:
    return getattr(getattr(settings, FLAT[name][0]), name)


def test_every_scalar_setting_has_a_sample() -> None:
    assert set(SAMPLE) == set(FLAT) - set(ENV_TABLES) - FILE_ONLY - LISTS


def test_models_to_serve_are_directories_or_names_under_the_data_directory(tmp_path: Path) -> None:
    default = load_settings({"CHEAPEST_DATA_DIR": str(tmp_path)})
    assert default.engine.models == [str(tmp_path / "models" / "SmolLM2-135M-Instruct")]  # model_dir alone
    own = load_settings({"CHEAPEST_DATA_DIR": str(tmp_path), "CHEAPEST_MODEL_DIR": "/srv/m/Mine"})
    assert own.engine.models == ["/srv/m/Mine"]
    listed = "SmolLM2-135M-Instruct, gemma-3-270m,/srv/m/Other"
    from_env = load_settings({"CHEAPEST_DATA_DIR": str(tmp_path), "CHEAPEST_MODELS": listed})
    from_file = _load(tmp_path, '[engine]\nmodels = ["SmolLM2-135M-Instruct", "gemma-3-270m", "/srv/m/Other"]\n'
                                '[engine.chat_templates]\n"gemma-3-270m" = "{{ messages[0].content }}"\n',
                      CHEAPEST_DATA_DIR=str(tmp_path))
    expected = [str(tmp_path / "models" / "SmolLM2-135M-Instruct"), str(tmp_path / "models" / "gemma-3-270m"),
                "/srv/m/Other"]
    assert from_env.engine.models == from_file.engine.models == expected
    assert from_file.engine.chat_templates == {"gemma-3-270m": "{{ messages[0].content }}"}
    assert msgspec.structs.replace(from_file, serving=from_file.serving).engine.models == expected  # idempotent
    assert Settings().price("gemma-3-270m").completion_usd_per_mtok > 0  # each shipped model has a price
    with pytest.raises(ConfigError, match="twice"):
        load_settings({"CHEAPEST_MODELS": "gemma-3-270m,/elsewhere/gemma-3-270m"})


@pytest.mark.parametrize("name", sorted(SAMPLE))
def test_each_setting_in_its_section_at_top_level_and_in_the_environment(tmp_path: Path, name: str) -> None:
    section, value = FLAT[name][0], SAMPLE[name]
    in_section = _load(tmp_path, f"[{section}]\n{name} = {_toml(value)}\n")
    flat = _load(tmp_path, f"{name} = {_toml(value)}\n")
    from_env = load_settings({env_name(name): str(value).lower() if isinstance(value, bool) else str(value)})
    assert _field(in_section, name) == _field(flat, name) == _field(from_env, name) == value
    assert _field(Settings(), name) != value  # the sample differs from the default, so this proves an effect


def test_environment_wins_over_the_file_and_the_file_over_defaults(tmp_path: Path) -> None:
    s = _load(tmp_path, '[serving]\nport = 9000\nworkers = 3\n[plans.team]\nrpm = 500\ntpm = 90000\n'
                        '[prices."M"]\nprompt_usd_per_mtok = 0.5\ncompletion_usd_per_mtok = 2.0\n',
              CHEAPEST_PORT="9100", CHEAPEST_DATA_DIR=str(tmp_path), CHEAPEST_REQUEST_LOG="0")
    assert (s.serving.port, s.serving.workers, s.serving.request_log) == (9100, 3, False)
    assert s.plans["team"].rpm == 500 and s.plans["free"].rpm > 0  # defaults kept
    assert s.engine.model_dir == str(tmp_path / "models" / "SmolLM2-135M-Instruct")
    assert (s.models_path, s.cache_path) == (tmp_path / "models", tmp_path / "cache")
    # 1000 prompt tokens at $0.5/Mtok = 500 micro-dollars; 3 completion tokens at $2/Mtok = 6.
    assert s.price("M").cost_micro(1000, 3) == 506
    assert s.price("other") == PriceConfig() and PriceConfig().cost_micro(10, 10) == 0
    assert PriceConfig(0.1, 0.0).cost_micro(1, 0) == 1  # rounds up, never down to free


def test_tables_from_the_file_and_prefixed_variables(tmp_path: Path) -> None:
    s = _load(tmp_path, '[billing.stripe_prices]\nstandard = "price_s"\n[engine.model_options]\ntokens = 4\n',
              CHEAPEST_STRIPE_PRICE_PRO="price_9", CHEAPEST_MODEL_OPTION_TEXT="hello there")
    assert s.billing.stripe_prices == {"standard": "price_s", "pro": "price_9"}
    assert s.billing.plan_for_price == {"price_s": "standard", "price_9": "pro"}
    assert s.engine.model_options == {"tokens": 4, "text": "hello there"}


def test_derived_values() -> None:
    s = load_settings({"CHEAPEST_USDC_RECEIVER": RECEIVER.lower(), "CHEAPEST_USDC_MIN_TOPUP_USD": "2.5",
                       "CHEAPEST_PUBLIC_URL": "https://pay.example.test/"})
    b = s.billing
    assert b.usdc_receiver == RECEIVER and b.usdc_contract == "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
    assert (b.usdc_min_topup_micro, b.usdc_max_topup_micro) == (2_500_000, 10_000_000_000)
    assert b.stripe_success_url == "https://pay.example.test/billing/success?session_id={CHECKOUT_SESSION_ID}"
    assert b.stripe_cancel_url == "https://pay.example.test/billing/cancel"


@pytest.mark.parametrize(("text", "named"), [
    ("prot = 8000\n", "`prot`"),
    ("[serving]\nprot = 8000\n", "`serving.prot`"),
    ("[servng]\nport = 8000\n", "`servng`"),
    ("[plans.team]\nrpm = 1\ntpm = 2\nburst = 3\n", "`plans.team.burst`"),
    ('port = "8000"\n', "`serving.port`"),
    ('[serving]\nport = "8000"\n', "`serving.port`"),
    ("request_log = 1\n", "`serving.request_log`"),
    ('[plans.team]\nrpm = "many"\ntpm = 2\n', "`plans.team.rpm`"),
    ("serving = 3\n", "`serving`"),
    ("port = 8000\n[serving]\nport = 8001\n", "`serving.port` is set twice"),
    ('default_plan = "gold"\n', "default_plan"),
    ('usdc_receiver = "0x1234"\n', "usdc_receiver"),
    ("usdc_confirmations = 0\n", "usdc_confirmations"),
    ('key_pepper = "short"\n', "key_pepper"),
    ('metrics_allow = ["10.0.0.0/8", "example.test"]\n', "metrics_allow"),
    ('metrics_token = "short"\n', "metrics_token"),
    ("port = 9000\nmetrics_port = 9000\n", "metrics_port"),
    ('model_backend = "fixed"\n', "model_backend"),
    ('store_url = "mysql://db/x"\n', "store_url"),
    ('limiter_url = "http://cache"\n', "limiter_url"),
    ("[plans.team]\nrpm = 1\ntpm = 2\nbudget_usd = 5.0\n", "plans.team"),
    ("[store\n", "is not valid TOML"),
])
def test_a_bad_file_is_a_clear_error_naming_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text)
    assert named in str(err.value)


def test_secrets_never_appear_in_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, 'key_pepper = "sekrit"\n')
    assert "sekrit" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, 'store_url = "pg://admin:hunter2@db/x"\n')
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize(("env", "named"), [
    ({"CHEAPEST_PORT": "not-a-number"}, "CHEAPEST_PORT"),
    ({"CHEAPEST_CHAIN_ID": "base"}, "CHEAPEST_CHAIN_ID"),
    ({"CHEAPEST_REQUEST_LOG": "maybe"}, "CHEAPEST_REQUEST_LOG"),
    ({"CHEAPEST_CONFIG": "/nonexistent/cheapest.toml"}, "/nonexistent/cheapest.toml"),
])
def test_a_bad_variable_is_a_clear_error_naming_it(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(env)
    assert named in str(err.value)


def test_metrics_allow_is_a_list_in_the_file_and_comma_separated_in_the_environment(tmp_path: Path) -> None:
    assert Settings().serving.metrics_allow == ["127.0.0.0/8", "::1"]  # loopback only
    from_file = _load(tmp_path, '[serving]\nmetrics_allow = ["10.0.0.5", "fd00::/8"]\n')
    from_env = load_settings({"CHEAPEST_METRICS_ALLOW": "10.0.0.5, fd00::/8"})
    assert from_file.serving.metrics_allow == from_env.serving.metrics_allow == ["10.0.0.5", "fd00::/8"]
    assert from_env.metrics_path == from_env.data_path / "metrics"
    assert load_settings({"CHEAPEST_METRICS_DIR": "/run/m"}).metrics_path == Path("/run/m")


def test_empty_variables_are_unset() -> None:
    assert load_settings({"CHEAPEST_PORT": "", "CHEAPEST_STRIPE_PRICE_PRO": ""}) == load_settings({})


def test_sections_are_the_documented_ones() -> None:
    assert list(SECTIONS) == ["serving", "store", "engine", "billing"]
    assert {f.name for f in msgspec.structs.fields(Settings)} == {*SECTIONS, "plans", "prices"}


def test_the_store_opens_with_its_configured_map_size(tmp_path: Path) -> None:
    store = open_configured_store(StoreSettings(data_dir=str(tmp_path), lmdb_map_size=1 << 26))
    try:
        assert store.env.info()["map_size"] == 1 << 26  # type: ignore[attr-defined]
    finally:
        store.close()


def test_the_configured_postgres_store_and_redis_limiter_open(tmp_path: Path, pg_url: str, redis_url: str) -> None:
    from cheapest.store.limiter import SharedMemoryLimiter, open_configured_limiter
    from cheapest.store.postgres import PostgresStore
    from cheapest.store.redis import RedisChanges, RedisLimiter

    many = StoreSettings(data_dir=str(tmp_path), store_url=pg_url, limiter_url=redis_url)
    store, limiter = open_configured_store(many), open_configured_limiter(many)
    try:
        assert isinstance(store, PostgresStore) and isinstance(store.feed, RedisChanges)
        assert isinstance(limiter, RedisLimiter)
    finally:
        store.close()
        limiter.close()
    one = open_configured_limiter(StoreSettings(data_dir=str(tmp_path)))
    assert isinstance(one, SharedMemoryLimiter) and (tmp_path / RATELIMIT_FILE).exists()
