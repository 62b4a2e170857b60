"""Fixtures for payments: a local EVM with an ERC-20 "USDC" (eth-tester + py-evm, compiled here by vyper), and
a store whose ledger has the test accounts.

`chain` is module-scoped: compiling and deploying once per module keeps the suite fast. It holds `w3`, `tester`,
`usdc` and a `lookalike` token (same code, another address), `usdc18` (an 18-decimal stablecoin), a `payer` and
a `stranger` wallet (ETH and tokens of each), and the top-up `receiver` address.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from cheapest.store import AccountRecord, Ledger, open_store

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


def open_ledger_store(path: Path):  # type: ignore[no-untyped-def]
    """The store at `path` (created with the test accounts if new)."""
    store = open_store(path, map_size=64 << 20)
    for account_id in TEST_ACCOUNTS:
        if store.get_account(account_id) is None:
            store.create_account(AccountRecord(id=account_id, email=f"{account_id}@example.test", created_at=0,
                                               plan="free"))
    return store


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    store = open_ledger_store(tmp_path)
    yield store.ledger
    store.close()
