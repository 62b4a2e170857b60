"""USDC top-ups on Base, verified on-chain with web3 and credited exactly once.

A top-up has two steps, both of which block (the chain node, the ledger):

`topup_quote(settings, account_id, amount_usd, decimals)` -> `TopupQuote` {address, chain: "base", chain_id,
token, amount_units (in the token's own units: `decimals` from `token_decimals`), claim_message}. The client sends `amount_units` of `token` to `address`, then replaces the literal
"{tx_hash}" in `claim_message` with the transaction hash (0x + 64 hex, lower case) and signs the result with the
SENDING wallet (EIP-191 `personal_sign`). Raises `TopupRejected("bad_amount")` or `BillingNotConfigured` (no
receiver configured).

`verify_topup(settings, ledger, w3, account_id=, tx_hash=, signature=)`:
    -> `TopupCredited`: `credited_units` credited by this call (0 and `already_credited` true when this account
       had claimed it before), `balance_micro` after.
    -> raises `TopupPending` (`retry_after` seconds): the transaction is not mined yet or has fewer than the
       configured confirmations; nothing was credited, call again later.
    -> raises `TopupRejected(reason_code)` (a ValueError), nothing credited: malformed_tx_hash,
       malformed_signature, wrong_chain (the node is not on the configured chain), tx_not_found, reverted
       (receipt status 0), no_transfer (no Transfer log emitted BY the configured USDC contract to the
       configured receiver: look-alike tokens emit identical events from other addresses, and web3's
       process_receipt does not check that), bad_signature (the claim is not signed by a Transfer's sender: a
       public tx hash alone claims nothing), already_claimed (another account holds it).

Credited amount = the amount transferred, per Transfer log, in micro-dollars: the token's `decimals()` is read
from the configured contract (USDC has 6: 1 unit = 1 micro-dollar; a token with more is rounded down to whole
micro-dollars). Each (chain id, tx hash, log index) once, ever. Transfers routed through a smart-contract wallet
have the contract as sender and cannot sign (EIP-1271 is not supported).

Confirmations are counted up to the node's `safe` block (`usdc_finality`: "safe", "finalized" or "latest"): a
block the chain may still reorganize away is not counted. A node that does not know the tag is asked for its
latest block instead, and the confirmations required on top of it stand in for finality.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable

import msgspec
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import keccak
from web3 import Web3
from web3.exceptions import TransactionNotFound, Web3Exception

from cheapest.billing import BillingNotConfigured
from cheapest.config import BillingSettings
from cheapest.store.base import Ledger
from cheapest.store.payments import ChainClaim, JournalEntry, TransferClaim
from cheapest.vocabulary import usd_to_micro

__all__ = [
    "TopupCredited", "TopupPending", "TopupQuote", "TopupRejected", "claim_message", "make_web3", "topup_quote",
    "verify_topup",
]

BLOCK_TIME_S = 2.0  # Base produces a block every 2 s; sizes Retry-After while confirming
TRANSFER_TOPIC = keccak(text="Transfer(address,address,uint256)")
_TRANSFER_ABI = [{
    "type": "event", "name": "Transfer", "anonymous": False,
    "inputs": [
        {"name": "from", "type": "address", "indexed": True},
        {"name": "to", "type": "address", "indexed": True},
        {"name": "value", "type": "uint256", "indexed": False},
    ],
}]
_DECIMALS_ABI = [{"type": "function", "name": "decimals", "stateMutability": "view", "inputs": [],
                  "outputs": [{"name": "", "type": "uint8"}]}]
_TX_HASH = re.compile(r"0x[0-9a-fA-F]{64}")
_SIGNATURE = re.compile(r"(0x)?[0-9a-fA-F]{130}")


class TopupRejected(ValueError):
    def __init__(self, reason_code: str) -> None:
        super().__init__(reason_code)
        self.reason_code = reason_code


class TopupPending(Exception):
    """Not credited yet; try again after `retry_after` seconds."""

    def __init__(self, retry_after: int, confirmations: int, required: int) -> None:
        super().__init__(f"waiting for confirmations ({confirmations}/{required})")
        self.retry_after = retry_after
        self.confirmations = confirmations
        self.required = required


class TopupQuote(msgspec.Struct, frozen=True):
    address: str
    chain: str
    chain_id: int
    token: str
    amount_units: int
    claim_message: str


class TopupCredited(msgspec.Struct, frozen=True):
    tx_hash: str
    chain_id: int
    credited_units: int  # micro-dollars credited by this call (a USDC unit is one)
    already_credited: bool
    log_indexes: list[int]
    balance_micro: int


def claim_message(account_id: str, chain_id: int, tx_hash: str) -> str:
    """The text the sender signs: it names the account so a signature cannot be moved to another one."""
    return f"cheapest USDC top-up claim\naccount: {account_id}\nchain: {chain_id}\ntx: {tx_hash}"


def topup_quote(settings: BillingSettings, account_id: str, amount_usd: object,
                decimals: Callable[[], int] = lambda: 6) -> TopupQuote:
    """`decimals` reads the token's (e.g. `token_decimals`); it is called only for a valid request."""
    if settings.usdc_receiver is None:
        raise BillingNotConfigured("usdc_receiver is not set")
    try:
        micro = usd_to_micro(amount_usd)
    except ValueError:
        raise TopupRejected("bad_amount") from None
    if not settings.usdc_min_topup_micro <= micro <= settings.usdc_max_topup_micro:
        raise TopupRejected("bad_amount")
    # The token's units for that many micro-dollars, rounded up so the transfer covers the amount.
    places = decimals()
    units = micro * 10 ** (places - 6) if places >= 6 else -(-micro // 10 ** (6 - places))
    return TopupQuote(address=settings.usdc_receiver, chain="base" if settings.chain_id == 8453 else "evm",
                      chain_id=settings.chain_id, token=settings.usdc_contract, amount_units=units,
                      claim_message=claim_message(account_id, settings.chain_id, "{tx_hash}"))


def token_decimals(w3: Web3, settings: BillingSettings) -> int:
    """The configured token contract's `decimals()` (a worker reads it once and keeps it)."""
    token = w3.eth.contract(address=Web3.to_checksum_address(settings.usdc_contract), abi=_DECIMALS_ABI)
    return int(token.functions.decimals().call())


def to_micro(units: int, decimals: int) -> int:
    """Token units -> micro-dollars (1 token = 1 USD), rounded down."""
    return units // 10 ** (decimals - 6) if decimals >= 6 else units * 10 ** (6 - decimals)


def confirmed_head(w3: Web3, finality: str) -> int:
    """The number of the newest block that counts: the node's `finality` block ("safe", "finalized"), or its
    latest block when the node does not know that tag (or `finality` is "latest")."""
    if finality != "latest":
        try:
            return int(w3.eth.get_block(finality)["number"])  # type: ignore[arg-type]
        except (Web3Exception, ValueError, KeyError):  # an older node: no such block tag
            pass
    return int(w3.eth.block_number)


def make_web3(settings: BillingSettings, timeout_s: float = 10.0) -> Web3:
    """The configured node; make one per worker process and reuse it."""
    return Web3(Web3.HTTPProvider(settings.base_rpc_url, request_kwargs={"timeout": timeout_s}))


def verify_topup(settings: BillingSettings, ledger: Ledger, w3: Web3, *, account_id: str, tx_hash: str,
                 signature: str, decimals: int | None = None) -> TopupCredited:
    """`decimals`: the token's, when the caller already read them (`token_decimals`)."""
    if settings.usdc_receiver is None:
        raise BillingNotConfigured("usdc_receiver is not set")
    if not isinstance(tx_hash, str) or not _TX_HASH.fullmatch(tx_hash):
        raise TopupRejected("malformed_tx_hash")
    if not isinstance(signature, str) or not _SIGNATURE.fullmatch(signature):
        raise TopupRejected("malformed_signature")
    tx_hash = tx_hash.lower()
    chain_id = settings.chain_id
    try:
        signer = Account.recover_message(encode_defunct(text=claim_message(account_id, chain_id, tx_hash)),
                                         signature=signature)
    except Exception:  # eth_keys refuses out-of-range v/r/s in several ways
        raise TopupRejected("malformed_signature") from None

    if w3.eth.chain_id != chain_id:
        raise TopupRejected("wrong_chain")
    try:
        receipt = w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
    except TransactionNotFound:
        try:
            w3.eth.get_transaction(tx_hash)  # type: ignore[arg-type]
        except TransactionNotFound:
            raise TopupRejected("tx_not_found") from None
        raise TopupPending(_retry_after(settings.usdc_confirmations), 0,
                           settings.usdc_confirmations) from None
    if receipt["status"] != 1:
        raise TopupRejected("reverted")

    if decimals is None:
        decimals = token_decimals(w3, settings)
    paid = [(i, sender, units, micro) for i, sender, units in _transfers_to_receiver(w3, settings, receipt)
            if (micro := to_micro(units, decimals)) > 0]
    if not paid:
        raise TopupRejected("no_transfer")
    mine = [(index, units, micro) for index, sender, units, micro in paid if sender == signer]
    if not mine:
        raise TopupRejected("bad_signature")

    confirmations = confirmed_head(w3, settings.usdc_finality) - receipt["blockNumber"] + 1
    if confirmations < settings.usdc_confirmations:
        missing = settings.usdc_confirmations - confirmations
        raise TopupPending(_retry_after(missing), confirmations, settings.usdc_confirmations)

    now = int(time.time())
    block = receipt["blockNumber"]
    outcome = ledger.claim_transfers(account_id, [
        TransferClaim(chain_id, tx_hash, index,
                      ChainClaim(account_id=account_id, amount_units=units, sender=signer, block_number=block,
                                 claimed_at=now),
                      JournalEntry(ref=f"usdc:{chain_id}:{tx_hash}:{index}", kind="usdc_topup", at=now,
                                   micro_usd=micro))
        for index, units, micro in mine])
    if outcome.credited_micro == 0 and outcome.held_by_others == len(mine):
        raise TopupRejected("already_claimed")
    return TopupCredited(tx_hash=tx_hash, chain_id=chain_id, credited_units=outcome.credited_micro,
                         already_credited=outcome.credited_micro == 0, log_indexes=[i for i, _, _ in mine],
                         balance_micro=outcome.balance_micro)


def _transfers_to_receiver(w3: Web3, settings: BillingSettings, receipt: object) -> list[tuple[int, str, int]]:
    """(log index, sender, value) of each Transfer emitted by the configured token to the receiver."""
    event = w3.eth.contract(abi=_TRANSFER_ABI).events.Transfer()
    out = []
    for log in receipt["logs"]:  # type: ignore[index]
        # The emitting contract is the token: only its address tells USDC from a look-alike.
        if log["address"] != settings.usdc_contract:
            continue
        topics = log["topics"]
        if len(topics) != 3 or bytes(topics[0]) != TRANSFER_TOPIC:
            continue
        args = event.process_log(log)["args"]
        if args["to"] == settings.usdc_receiver and args["value"] > 0:
            out.append((int(log["logIndex"]), args["from"], int(args["value"])))
    return out


def _retry_after(blocks: int) -> int:
    return max(1, math.ceil(blocks * BLOCK_TIME_S))
