"""Fixtures for payments: a local EVM with an ERC-20 "USDC" (eth-tester + py-evm, compiled here by vyper), a
store whose ledger has the test accounts (on each backend: `ledger` runs a test once per backend), and for tests
through a real server: the chain behind a loopback JSON-RPC node, the loopback Stripe, and helpers that sign and
deliver webhooks, check out, and sign a top-up claim.

`chain` is module-scoped: compiling and deploying once per module keeps the suite fast. It holds `w3`, `tester`,
`usdc` and a `lookalike` token (same code, another address), `usdc18` (an 18-decimal stablecoin), a `payer` and
a `stranger` wallet (ETH and tokens of each), and the top-up `receiver` address.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from web3 import Web3
from web3.exceptions import TransactionNotFound

from cheapest.store import AccountRecord, Ledger, open_store
from fixtures_backends import Backend
from fixtures_server import ServerProcess
from stripe_fake import FakeStripe

ERC20 = Path(__file__).resolve().parent / "billing" / "erc20.vy"
# Accounts the payment tests credit or subscribe (a late Stripe event for an unknown account is "unmatched").
TEST_ACCOUNTS = ("acct_1", "acct_2", "acct_thief", *(f"acct_{n}" for n in range(8)))


@pytest.fixture(scope="module")
def chain() -> SimpleNamespace:
    from eth_account import Account
    from eth_utils import keccak
    from vyper.compiler import compile_code
    from web3 import EthereumTesterProvider, Web3

    compiled = compile_code(ERC20.read_text(), output_formats=["abi", "bytecode"])
    w3 = Web3(EthereumTesterProvider())
    tester = w3.provider.ethereum_tester  # type: ignore[attr-defined]
    bank = w3.eth.accounts[0]
    payer, stranger = (Account.from_key(keccak(text=name)) for name in ("payer", "stranger"))
    for acct in (payer, stranger):
        tester.add_account(acct.key.to_0x_hex())
        w3.eth.send_transaction({"from": bank, "to": acct.address, "value": 10**18})

    def deploy(name: str, decimals: int = 6):  # type: ignore[no-untyped-def]
        one = 10**decimals
        factory = w3.eth.contract(abi=compiled["abi"], bytecode=compiled["bytecode"])
        receipt = w3.eth.wait_for_transaction_receipt(
            factory.constructor(name, 10**9 * one, decimals).transact({"from": bank}))
        token = w3.eth.contract(address=receipt.contractAddress, abi=compiled["abi"])
        for acct in (payer, stranger):
            token.functions.transfer(acct.address, 10**6 * one).transact({"from": bank})
        return token

    usdc, lookalike, usdc18 = deploy("USD Coin"), deploy("USD Coin"), deploy("Dollar 18", 18)
    receiver = Account.from_key(keccak(text="receiver")).address
    return SimpleNamespace(w3=w3, tester=tester, usdc=usdc, lookalike=lookalike, usdc18=usdc18, payer=payer,
                           stranger=stranger, receiver=receiver)


def open_ledger_store(where: Path | Backend):  # type: ignore[no-untyped-def]
    """The store at `where` (an LMDB directory, or either backend's state), created with the test accounts."""
    store = where.open() if isinstance(where, Backend) else open_store(where, map_size=64 << 20)
    for account_id in TEST_ACCOUNTS:
        if store.get_account(account_id) is None:
            store.create_account(AccountRecord(id=account_id, email=f"{account_id}@example.test", created_at=0,
                                               plan="free"))
    return store


@pytest.fixture
def ledger(backend: Backend) -> Iterator[Ledger]:
    """The payment ledger of each backend (a test using it runs once per backend)."""
    store = open_ledger_store(backend)
    yield store.ledger
    store.close()


MODEL = "SmolLM2-135M-Instruct"
MSG = [{"role": "user", "content": "What is the capital of France?"}]
WEBHOOK_SECRET = "whsec_test_" + "r" * 32
STRIPE_KEY = "sk_test_routes"
PRICES = {"price_standard_m": 500, "price_pro_m": 2000}


# --- a chain node on loopback -------------------------------------------------------------------------------
def _wire(value: Any) -> Any:
    """web3's Python values back to JSON-RPC's wire form (quantities and bytes as 0x-hex)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return hex(value)
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    if isinstance(value, dict) or hasattr(value, "items"):
        return {k: _wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_wire(v) for v in value]
    raise TypeError(type(value).__name__)


class ChainNode:
    """HTTP JSON-RPC in front of eth-tester (py-evm), so the server's workers reach the chain as they would
    reach a Base node: through web3's HTTPProvider, in their own processes."""

    def __init__(self, w3: Web3) -> None:
        self.w3 = w3
        self.lock = threading.Lock()
        node = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                req = json.loads(self.rfile.read(int(self.headers["content-length"])))
                out = [node.call(r) for r in req] if isinstance(req, list) else node.call(req)
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def call(self, req: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            try:
                result = self.w3.manager.request_blocking(req["method"], req.get("params") or [])
            except TransactionNotFound:
                result = None
            except Exception as exc:
                return {"jsonrpc": "2.0", "id": req.get("id"), "error": {"code": -32000, "message": type(exc).__name__}}
        return {"jsonrpc": "2.0", "id": req.get("id"), "result": _wire(result)}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def node(chain: SimpleNamespace) -> Iterator[ChainNode]:
    """The module's chain behind a loopback JSON-RPC endpoint."""
    n = ChainNode(chain.w3)
    yield n
    n.close()


@pytest.fixture(scope="module")
def stripe() -> Iterator[FakeStripe]:
    """The loopback Stripe (tests/stripe_fake.py) with the plans' prices."""
    with FakeStripe(STRIPE_KEY, PRICES) as fake:
        yield fake


def auth_header(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sign_webhook(payload: bytes, timestamp: int, secret: str = WEBHOOK_SECRET) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def deliver_webhook(server: ServerProcess, event: dict, raw: bytes | None = None,
                    header: str | None = None) -> httpx.Response:
    raw = json.dumps(event).encode() if raw is None else raw
    header = sign_webhook(raw, int(time.time())) if header is None else header
    return httpx.post(server.base_url + "/webhooks/stripe", content=raw, timeout=10,
                      headers={"Stripe-Signature": header, "content-type": "application/json"})


def billing_status(server: ServerProcess, mk: str) -> dict:
    return dict(httpx.get(server.base_url + "/api/billing/status", headers=auth_header(mk), timeout=10).json())


def chat(server: ServerProcess, sk: str) -> httpx.Response:
    return httpx.post(server.v1 + "/chat/completions", json={"model": MODEL, "messages": MSG}, headers=auth_header(sk),
                      timeout=10)


def checkout(server: ServerProcess, stripe: FakeStripe, mk: str, plan: str, at: int | None = None) -> list[dict]:
    r = httpx.post(server.base_url + "/api/billing/checkout", json={"plan": plan}, headers=auth_header(mk), timeout=20)
    assert r.status_code == 200, r.text
    assert r.json()["url"].startswith("https://checkout.stripe.com/")
    return stripe.complete_session(r.json()["id"], int(time.time()) if at is None else at)


def claim_signature(chain: SimpleNamespace, quote: dict, tx_hash: str, signer: Any) -> str:
    message = quote["claim_message"].replace("{tx_hash}", tx_hash)
    return Account.sign_message(encode_defunct(text=message), signer.key).signature.to_0x_hex()


def billing_env(chain: SimpleNamespace, node: ChainNode, stripe: FakeStripe) -> dict[str, str]:
    """A server's settings for Stripe (the loopback fake) and USDC on the local chain."""
    return {
        "CHEAPEST_STRIPE_SECRET_KEY": STRIPE_KEY, "CHEAPEST_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "CHEAPEST_STRIPE_API_BASE": stripe.url, "CHEAPEST_STRIPE_PRICE_STANDARD": "price_standard_m",
        "CHEAPEST_STRIPE_PRICE_PRO": "price_pro_m", "CHEAPEST_BASE_RPC_URL": node.url,
        "CHEAPEST_USDC_CONTRACT": chain.usdc.address, "CHEAPEST_USDC_RECEIVER": chain.receiver,
        "CHEAPEST_CHAIN_ID": str(chain.w3.eth.chain_id), "CHEAPEST_USDC_CONFIRMATIONS": "3",
    }
