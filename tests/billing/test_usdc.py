"""USDC top-ups verified on a real local EVM (eth-tester + py-evm) with an ERC-20 compiled here by vyper."""

from __future__ import annotations

from pathlib import Path

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from web3 import EthereumTesterProvider

from cheapest.billing import BillingNotConfigured
from cheapest.config import BillingSettings
from cheapest.billing.usdc import (
    TopupPending, TopupRejected, claim_message, token_decimals, topup_quote, verify_topup,
)
from fixtures_payments import open_ledger_store
from fixtures_backends import Backend
from processes import in_processes

USD = 1_000_000


@pytest.fixture
def cfg(chain) -> BillingSettings:
    return BillingSettings(usdc_contract=chain.usdc.address, usdc_receiver=chain.receiver,
                           chain_id=chain.w3.eth.chain_id, usdc_confirmations=3)


def pay(chain, units: int, *, token=None, to=None, sender=None) -> str:
    token = chain.usdc if token is None else token
    sender = chain.payer if sender is None else sender
    tx = token.functions.transfer(chain.receiver if to is None else to, units).transact({"from": sender.address})
    return tx.to_0x_hex()


def mine(chain, blocks: int) -> None:
    chain.tester.mine_blocks(blocks)


def signed_claim(cfg: BillingSettings, account_id: str, tx_hash: str, signer) -> str:
    """What a client does with the quote: fill in the hash, sign with the sending wallet (EIP-191)."""
    template = topup_quote(cfg, account_id, "5").claim_message
    message = template.replace("{tx_hash}", tx_hash)
    return Account.sign_message(encode_defunct(text=message), signer.key).signature.to_0x_hex()


def verify(chain, cfg, ledger, account_id: str, tx_hash: str, signer=None, w3=None):
    sig = signed_claim(cfg, account_id, tx_hash, chain.payer if signer is None else signer)
    return verify_topup(cfg, ledger, chain.w3 if w3 is None else w3, account_id=account_id, tx_hash=tx_hash,
                        signature=sig)


def rejected(chain, cfg, ledger, account_id, tx_hash, signer=None) -> str:
    with pytest.raises(TopupRejected) as err:
        verify(chain, cfg, ledger, account_id, tx_hash, signer)
    assert ledger.balance(account_id) == 0 and ledger.journal(account_id) == []
    return err.value.reason_code


# -- quote ---------------------------------------------------------------------------------------------
def test_quote(cfg, chain):
    q = topup_quote(cfg, "acct_1", "12.5")
    assert (q.address, q.token, q.amount_units) == (chain.receiver, chain.usdc.address, 12_500_000)
    assert q.chain_id == chain.w3.eth.chain_id
    assert q.claim_message == claim_message("acct_1", q.chain_id, "{tx_hash}")
    base = topup_quote(BillingSettings(usdc_receiver=chain.receiver), "acct_1", 20)
    assert (base.chain, base.chain_id, base.token, base.amount_units) == (
        "base", 8453, "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", 20 * USD)
    for bad in ("0", "-5", "1.0000001", "abc", "nan", "inf", 10_001, 0.5):
        with pytest.raises(TopupRejected) as err:
            topup_quote(cfg, "acct_1", bad)
        assert err.value.reason_code == "bad_amount"
    with pytest.raises(BillingNotConfigured):
        topup_quote(BillingSettings(), "acct_1", 5)


# -- verify-topup --------------------------------------------------------------------------------------
def test_valid_topup_credits_the_amount_transferred(chain, cfg, ledger):
    tx = pay(chain, 7_250_000)  # not the quoted 5 USD: what arrived is what counts
    mine(chain, 2)
    result = verify(chain, cfg, ledger, "acct_1", tx)
    assert (result.credited_units, result.already_credited, result.balance_micro) == (7_250_000, False, 7_250_000)
    assert ledger.balance("acct_1") == 7_250_000
    (entry,) = ledger.journal("acct_1")
    assert (entry.kind, entry.micro_usd) == ("usdc_topup", 7_250_000)
    assert entry.ref == f"usdc:{cfg.chain_id}:{tx}:{result.log_indexes[0]}"
    claim = ledger.chain_claim(cfg.chain_id, tx, result.log_indexes[0])
    assert claim is not None and (claim.account_id, claim.sender) == ("acct_1", chain.payer.address)


def test_each_transfer_log_in_a_transaction_is_credited(chain, cfg, ledger):
    tx = chain.usdc.functions.transfer_split(chain.receiver, 1 * USD, 2 * USD).transact(
        {"from": chain.payer.address}).to_0x_hex()
    mine(chain, 2)
    sig = signed_claim(cfg, "acct_1", tx, chain.payer)  # the message names the hash in lower case...
    shouting = "0x" + tx[2:].upper()  # ...whatever case the client submits it in
    result = verify_topup(cfg, ledger, chain.w3, account_id="acct_1", tx_hash=shouting, signature=sig)
    assert result.credited_units == 3 * USD and len(result.log_indexes) == 2
    assert len(ledger.journal("acct_1")) == 2


def test_lookalike_token_is_refused(chain, cfg, ledger):
    tx = pay(chain, 5 * USD, token=chain.lookalike)
    mine(chain, 5)
    receipt = chain.w3.eth.get_transaction_receipt(tx)
    # web3 decodes the look-alike's log as a perfectly good USDC Transfer: only the address differs.
    (decoded,) = chain.usdc.events.Transfer().process_receipt(receipt)
    assert decoded.args.receiver == chain.receiver and decoded.address != chain.usdc.address
    assert rejected(chain, cfg, ledger, "acct_1", tx) == "no_transfer"


def test_wrong_receiver_is_refused(chain, cfg, ledger):
    tx = pay(chain, 5 * USD, to=chain.stranger.address)
    mine(chain, 5)
    assert rejected(chain, cfg, ledger, "acct_1", tx) == "no_transfer"


def test_reverted_transaction_is_refused(chain, cfg, ledger):
    tx = chain.usdc.functions.transfer(chain.receiver, 10**18).transact(
        {"from": chain.payer.address, "gas": 200_000}).to_0x_hex()
    mine(chain, 5)
    assert chain.w3.eth.get_transaction_receipt(tx).status == 0
    assert rejected(chain, cfg, ledger, "acct_1", tx) == "reverted"


def test_too_few_confirmations_then_enough(chain, ledger):
    cfg = BillingSettings(usdc_contract=chain.usdc.address, usdc_receiver=chain.receiver,
                          chain_id=chain.w3.eth.chain_id)  # the default: 12
    assert cfg.usdc_confirmations == 12
    tx = pay(chain, 3 * USD)
    with pytest.raises(TopupPending) as err:
        verify(chain, cfg, ledger, "acct_1", tx)
    assert (err.value.confirmations, err.value.required, err.value.retry_after) == (1, 12, 22)
    mine(chain, 10)
    with pytest.raises(TopupPending) as err:
        verify(chain, cfg, ledger, "acct_1", tx)
    assert (err.value.confirmations, err.value.retry_after) == (11, 2)
    assert ledger.balance("acct_1") == 0 and ledger.chain_claim(cfg.chain_id, tx, 0) is None
    mine(chain, 1)
    assert verify(chain, cfg, ledger, "acct_1", tx).credited_units == 3 * USD


def test_replay_credits_nothing_more(chain, cfg, ledger):
    tx = pay(chain, 4 * USD)
    mine(chain, 3)
    assert verify(chain, cfg, ledger, "acct_1", tx).credited_units == 4 * USD
    again = verify(chain, cfg, ledger, "acct_1", tx)
    assert (again.credited_units, again.already_credited, again.balance_micro) == (0, True, 4 * USD)
    # The payer signs the same transfer over to a second account: it was already spent.
    with pytest.raises(TopupRejected) as err:
        verify(chain, cfg, ledger, "acct_2", tx)
    assert err.value.reason_code == "already_claimed"
    assert ledger.balance("acct_1") == 4 * USD and ledger.balance("acct_2") == 0
    assert len(ledger.journal("acct_1")) == 1


def test_claim_signed_by_another_wallet_is_refused(chain, cfg, ledger):
    tx = pay(chain, 5 * USD)
    mine(chain, 3)
    assert rejected(chain, cfg, ledger, "acct_thief", tx, signer=chain.stranger) == "bad_signature"
    # A genuine signature for one account does not carry over to another.
    sig = signed_claim(cfg, "acct_1", tx, chain.payer)
    with pytest.raises(TopupRejected) as err:
        verify_topup(cfg, ledger, chain.w3, account_id="acct_thief", tx_hash=tx, signature=sig)
    assert err.value.reason_code == "bad_signature"
    assert verify(chain, cfg, ledger, "acct_1", tx).credited_units == 5 * USD


def test_wrong_chain_id_is_refused(chain, cfg, ledger):
    tx = pay(chain, 5 * USD)
    mine(chain, 3)
    base = BillingSettings(usdc_contract=chain.usdc.address, usdc_receiver=chain.receiver, chain_id=8453,
                           usdc_confirmations=3)
    with pytest.raises(TopupRejected) as err:
        verify(chain, base, ledger, "acct_1", tx)
    assert err.value.reason_code == "wrong_chain"
    assert ledger.balance("acct_1") == 0


def test_unknown_transaction(chain, cfg, ledger):
    assert rejected(chain, cfg, ledger, "acct_1", "0x" + "ab" * 32) == "tx_not_found"


@pytest.mark.parametrize("tx_hash", ["0x1234", "ab" * 32, "0x" + "zz" * 32, "0x" + "ab" * 33, "", " 0x" + "ab" * 32])
def test_malformed_hash(chain, cfg, ledger, tx_hash):
    with pytest.raises(TopupRejected) as err:
        verify_topup(cfg, ledger, chain.w3, account_id="a", tx_hash=tx_hash, signature="0x" + "11" * 65)
    assert err.value.reason_code == "malformed_tx_hash"


@pytest.mark.parametrize("signature", [
    "", "0x", "0x1234", "0x" + "11" * 64, "0x" + "11" * 66, "0x" + "zz" * 65,
    "0x" + "11" * 64 + "05",  # v out of range
    "0x" + "ff" * 64 + "1b",  # r, s beyond the curve order
])
def test_malformed_signature(chain, cfg, ledger, signature):
    tx = pay(chain, 1 * USD)
    mine(chain, 3)
    with pytest.raises(TopupRejected) as err:
        verify_topup(cfg, ledger, chain.w3, account_id="acct_1", tx_hash=tx, signature=signature)
    assert err.value.reason_code == "malformed_signature"
    assert ledger.balance("acct_1") == 0


# -- Concurrency: two worker processes, one store ----------------------------------------------------
def _claim_worker(start, backend: Backend, cfg: BillingSettings, chain, claims: list[tuple[str, str]]) -> list[int]:
    store = open_ledger_store(backend)  # opened in the worker, after fork
    start()
    try:
        return [verify_topup(cfg, store.ledger, chain.w3, account_id="acct_1", tx_hash=tx, signature=sig)
                .credited_units for tx, sig in claims]
    finally:
        store.close()


def test_two_processes_claiming_the_same_transfer_credit_once(chain, cfg, backend):
    txs = [pay(chain, (n + 1) * USD) for n in range(6)]
    mine(chain, 3)
    claims = [(tx, signed_claim(cfg, "acct_1", tx, chain.payer)) for tx in txs]
    open_ledger_store(backend).close()
    # fork: each worker gets the same local chain (the node they would share over RPC in production).
    a, b = in_processes(_claim_worker, backend, cfg, chain, claims, method="fork")
    for n, (ca, cb) in enumerate(zip(a, b)):
        assert sorted([ca, cb]) == [0, (n + 1) * USD]
    store = open_ledger_store(backend)
    try:
        assert store.ledger.balance("acct_1") == sum(range(1, 7)) * USD
        assert len(store.ledger.journal("acct_1")) == 6
    finally:
        store.close()


# -- finality and the token's decimals -----------------------------------------------------------------------
class FinalityNode(EthereumTesterProvider):
    """The local chain behind a node whose `safe` block trails its latest by `lag` blocks, or that does not know
    the tag at all (`lag=None`, as older nodes answer)."""

    def __init__(self, tester, lag: int | None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(ethereum_tester=tester)
        self.lag = lag
        self.tags: list[str] = []

    def make_request(self, method, params):  # type: ignore[no-untyped-def]
        if method == "eth_getBlockByNumber" and params[0] in ("safe", "finalized"):
            self.tags.append(params[0])
            if self.lag is None:
                return {"jsonrpc": "2.0", "id": 1, "error": {"code": -32602, "message": "invalid block tag"}}
            latest = super().make_request("eth_blockNumber", [])["result"]  # an int from eth-tester
            params = [latest - self.lag, *params[1:]]
        return super().make_request(method, params)


def test_confirmations_count_up_to_the_safe_block(chain, cfg, ledger):
    from web3 import Web3

    node = FinalityNode(chain.tester, lag=5)
    w3 = Web3(node)
    tx = pay(chain, 2 * USD)
    mine(chain, 5)  # 6 blocks on the latest head, but the safe head is 5 behind: 1 confirmation
    with pytest.raises(TopupPending) as err:
        verify(chain, cfg, ledger, "acct_1", tx, w3=w3)
    assert (err.value.confirmations, err.value.required) == (1, 3) and node.tags == ["safe"]
    mine(chain, 2)
    assert verify(chain, cfg, ledger, "acct_1", tx, w3=w3).credited_units == 2 * USD
    finalized = BillingSettings(**{**{f: getattr(cfg, f) for f in cfg.__struct_fields__},
                                   "usdc_finality": "finalized"})
    tx = pay(chain, USD)
    mine(chain, 9)
    assert verify(chain, finalized, ledger, "acct_1", tx, w3=w3).credited_units == USD
    assert node.tags[-1] == "finalized"


def test_a_node_without_the_safe_tag_counts_from_its_latest_block(chain, cfg, ledger):
    from web3 import Web3

    node = FinalityNode(chain.tester, lag=None)
    tx = pay(chain, 3 * USD)
    mine(chain, 2)
    assert verify(chain, cfg, ledger, "acct_1", tx, w3=Web3(node)).credited_units == 3 * USD
    assert node.tags == ["safe"]  # asked, refused, fell back


def test_the_tokens_decimals_are_read_from_its_contract(chain, ledger):
    cfg = BillingSettings(usdc_contract=chain.usdc18.address, usdc_receiver=chain.receiver,
                          chain_id=chain.w3.eth.chain_id, usdc_confirmations=1)
    assert token_decimals(chain.w3, cfg) == 18
    quote = topup_quote(cfg, "acct_1", "2.5", lambda: token_decimals(chain.w3, cfg))
    assert quote.amount_units == 2_500_000 * 10**12
    tx = pay(chain, quote.amount_units + 999, token=chain.usdc18)  # dust below a micro-dollar
    result = verify(chain, cfg, ledger, "acct_1", tx)
    assert result.credited_units == 2_500_000 and ledger.balance("acct_1") == 2_500_000  # not 2.5e18
    claim = ledger.chain_claim(cfg.chain_id, tx, result.log_indexes[0])
    assert claim is not None and claim.amount_units == quote.amount_units + 999  # what was sent, in token units
    dust = pay(chain, 10**11, token=chain.usdc18)  # a tenth of a micro-dollar credits nothing
    assert rejected(chain, cfg, ledger, "acct_2", dust) == "no_transfer"
