"""The gateway without HTTP: authentication (and its epoch-checked cache), the one admission decision (standing,
budgets, credits, rate limits), settlement exactly once, and a whole generation collected and metered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
from cheapest_core import RateLimiter

from cheapest.config import PlanConfig, PriceConfig, Settings
from cheapest.gateway import Gateway
from cheapest.gateway.completions import Plan, collect
from cheapest.gateway.errors import Refusal
from cheapest.engine.types import SamplingParams
from cheapest.store import KeyLimits, accounts, open_store
from cheapest.store.limiter import SharedMemoryLimiter
from cheapest.store.metering import UsageMeter
from fixed_engine import FixedEngine

PEPPER = b"p" * 32
MODEL = "m"
run = asyncio.run  # the gateway awaits its limiter


@pytest.fixture
def world(tmp_path: Path) -> Iterator[SimpleNamespace]:
    plans = {"free": PlanConfig(rpm=2, tpm=100), "sub": PlanConfig(rpm=10, tpm=1000, price_usd_month=5.0),
             "payg": PlanConfig(rpm=10, tpm=1000, funding="credits"),
             "capped": PlanConfig(rpm=10, tpm=1000, budget_usd=0.000002, budget_window="1d")}
    settings = Settings(plans=plans, prices={MODEL: PriceConfig(prompt_usd_per_mtok=1.0, completion_usd_per_mtok=1.0)})
    store = open_store(tmp_path)
    meter = UsageMeter(store, interval=3600)  # flushed by hand
    limiter = SharedMemoryLimiter(RateLimiter(str(tmp_path / "ratelimit.bin"), 1024))

    def gateway() -> Gateway:  # another worker: its own caches over the same store and limiter
        return Gateway(settings, store, PEPPER, limiter, meter)

    def account(plan: str = "free", **key: object) -> tuple[str, str, str]:
        acct, mk = accounts.create_account(store, f"{time.monotonic_ns()}@example.test", plan, PEPPER)
        record, sk = accounts.create_key(store, acct.id, "sk", "k", PEPPER, **key)  # type: ignore[arg-type]
        return acct.id, f"Bearer {sk}", f"Bearer {mk}"

    yield SimpleNamespace(settings=settings, store=store, meter=meter, gateway=gateway, account=account)
    store.close()


def test_authentication_refusals(world: SimpleNamespace) -> None:
    gw = world.gateway()
    acct, sk, mk = world.account()
    typo = "Bearer " + sk[7:-1] + ("y" if sk.endswith("x") else "x")  # one character off: the checksum fails
    for header in (None, "", "Basic abc", "Bearer ", "Bearer sk_notakey", typo):
        with pytest.raises(Refusal) as err:
            gw.authenticate(header, "sk")
        assert (err.value.kind, err.value.code) == ("unauthenticated", "invalid_api_key")
    with pytest.raises(Refusal) as wrong:
        gw.authenticate(mk, "sk")
    assert (wrong.value.kind, wrong.value.code) == ("forbidden", "wrong_key_kind")
    assert "inference key" in wrong.value.message and wrong.value.type == "permission_error"
    caller = gw.authenticate(sk, "sk")
    assert caller.account.id == acct and (caller.limits.rpm, caller.limits.tpm) == (2, 100)
    assert gw.authenticate(sk, "sk") is caller  # cached: the same object while nothing changed


def test_every_change_is_seen_on_the_next_call_through_the_epoch(world: SimpleNamespace) -> None:
    a, b = world.gateway(), world.gateway()  # two workers
    acct, sk, _ = world.account()
    key = a.authenticate(sk, "sk").key
    b.authenticate(sk, "sk")
    world.store.update_key(key.id, acct, lambda k: msgspec.structs.replace(k, limits=KeyLimits(rpm=1)))
    assert b.authenticate(sk, "sk").limits.rpm == 1  # the other worker, on its very next call
    accounts.set_status(world.store, acct, "disabled")
    with pytest.raises(Refusal) as err:
        b.authenticate(sk, "sk")
    assert (err.value.kind, err.value.code) == ("forbidden", "account_disabled")
    accounts.set_status(world.store, acct, "active")
    world.store.delete_key(key.id)
    with pytest.raises(Refusal) as revoked:
        a.authenticate(sk, "sk")
    assert revoked.value.kind == "unauthenticated"
    acct2, sk2, _ = world.account(expires_at=int(time.time()) - 1)
    with pytest.raises(Refusal) as expired:
        a.authenticate(sk2, "sk")
    assert expired.value.code == "key_expired"


def test_rate_limits_are_one_decision_with_the_state_to_report(world: SimpleNamespace) -> None:
    gw = world.gateway()
    _, sk, _ = world.account()
    caller = gw.authenticate(sk, "sk")
    read = run(gw.admit(caller))  # a read: standing only, nothing charged
    assert read.rate[0].remaining == 2 and read.settled
    first = run(gw.admit(caller, MODEL, 10, 20))
    assert first.charged_tokens == 30 and first.rate[1].remaining == 70
    run(gw.admit(caller, MODEL, 1, 1))
    with pytest.raises(Refusal) as err:
        run(gw.admit(caller, MODEL, 1, 1))
    assert (err.value.kind, err.value.type, err.value.code) == ("rate_limited", "requests", "rate_limit_exceeded")
    assert err.value.rate is not None and err.value.rate[0].remaining == 0 and err.value.retry_after
    with pytest.raises(Refusal) as big:
        run(gw.admit(caller, MODEL, 101, 1))
    assert big.value.type == "tokens" and big.value.retry_after is None  # never fits: no point retrying


def test_settlement_corrects_tokens_and_meters_once(world: SimpleNamespace) -> None:
    gw = world.gateway()
    _, sk, _ = world.account()
    caller = gw.authenticate(sk, "sk")
    admission = run(gw.admit(caller, MODEL, 10, 50))
    assert run(gw.rate_state(caller))[1].remaining == 40
    admission.completion_tokens = 5
    gw.settle(admission)
    gw.settle(admission)  # however many times the caller's cleanup runs
    assert run(gw.rate_state(caller))[1].remaining == 85  # 15 really used
    world.meter.flush()
    (row,) = world.store.usage([caller.key.id])
    assert (row.counter.requests, row.counter.prompt_tokens, row.counter.completion_tokens) == (1, 10, 5)
    assert row.counter.cost_micro == 15  # $1/Mtok each way


def test_standing_budgets_and_credits(world: SimpleNamespace) -> None:
    gw = world.gateway()
    acct, sk, _ = world.account("sub")
    caller = gw.authenticate(sk, "sk")
    run(gw.admit(caller))  # assigned by the operator: no subscription to be in standing
    world.store.ledger.merge_subscription(acct, {"plan": "sub", "status": "canceled"}, 10)
    with pytest.raises(Refusal) as lapsed:
        run(gw.admit(gw.authenticate(sk, "sk")))
    assert (lapsed.value.kind, lapsed.value.code) == ("forbidden", "subscription_inactive")

    _, capped, _ = world.account("capped")
    caller = gw.authenticate(capped, "sk")
    admission = run(gw.admit(caller, MODEL, 1, 1))
    admission.completion_tokens = 1
    gw.settle(admission)  # $0.000002 spent: the day's budget is used up, flushed or not
    with pytest.raises(Refusal) as spent:
        run(gw.admit(caller, MODEL, 1, 1))
    assert (spent.value.kind, spent.value.code) == ("rate_limited", "budget_exceeded")
    assert spent.value.reset_at is not None
    assert spent.value.reset_at % 86_400 == 0 and 0 < spent.value.retry_after <= 86_400  # type: ignore[operator]

    payg, paying, _ = world.account("payg")
    caller = gw.authenticate(paying, "sk")
    with pytest.raises(Refusal) as empty:
        run(gw.admit(caller, MODEL, 1, 1))
    assert (empty.value.kind, empty.value.code, empty.value.type) == ("payment_required", "insufficient_quota",
                                                                      "insufficient_quota")
    world.store.ledger.credit(payg, 3, "grant:test")
    admission = run(gw.admit(caller, MODEL, 1, 1))
    assert admission.debit_to == payg
    admission.completion_tokens = 2
    gw.settle(admission)  # costs 3: the balance this worker sees is spent before any flush
    with pytest.raises(Refusal) as spent_again:
        run(gw.admit(caller, MODEL, 1, 1))
    assert spent_again.value.kind == "payment_required"
    world.meter.flush()
    assert world.store.ledger.balance(payg) == 0


def test_plan_limits_and_budget_bind_the_account_across_its_keys(world: SimpleNamespace) -> None:
    gw = world.gateway()
    acct, sk, mk = world.account()  # free: 2 requests and 100 tokens a minute, for the whole account
    _, sk2 = accounts.create_key(world.store, acct, "sk", "second", PEPPER)
    one, two = gw.authenticate(sk, "sk"), gw.authenticate(f"Bearer {sk2}", "sk")
    run(gw.admit(one, MODEL, 10, 50))
    with pytest.raises(Refusal) as tokens:  # 60 of the account's 100 tokens are held by the first key
        run(gw.admit(two, MODEL, 10, 40))
    assert tokens.value.type == "tokens" and "free plan's limit of 100 tokens" in tokens.value.message
    run(gw.admit(two, MODEL, 10, 20))
    with pytest.raises(Refusal) as requests:  # the account's 2 requests are spent, by two different keys
        run(gw.admit(two, MODEL, 1, 1))
    assert requests.value.type == "requests" and "free plan's limit of 2 requests" in requests.value.message

    capped, first, _ = world.account("capped")  # $0.000002 a day for the account
    _, second = accounts.create_key(world.store, capped, "sk", "second", PEPPER)
    admission = run(gw.admit(gw.authenticate(first, "sk"), MODEL, 1, 1))
    admission.completion_tokens = 1
    gw.settle(admission)
    world.meter.flush()  # flushed too: the account's spend is in the store
    with pytest.raises(Refusal) as spent:
        run(gw.admit(gw.authenticate(f"Bearer {second}", "sk"), MODEL, 1, 1))
    assert spent.value.code == "budget_exceeded" and "capped plan's budget" in spent.value.message
    assert world.store.window_spend(capped, "1d", int(time.time()) // 86_400 * 86_400) == 2


def test_a_keys_own_limits_apply_inside_the_plans_all_or_nothing(world: SimpleNamespace) -> None:
    gw = world.gateway()
    acct, sk, _ = world.account("sub", limits=KeyLimits(tpm=30))  # the plan: 10 rpm, 1000 tpm
    _, other = accounts.create_key(world.store, acct, "sk", "other", PEPPER)
    tight, free = gw.authenticate(sk, "sk"), gw.authenticate(f"Bearer {other}", "sk")
    assert (tight.limits.rpm, tight.limits.tpm) == (10, 30)
    run(gw.admit(tight, MODEL, 10, 10))
    begun = run(gw.begin(tight))  # as the server does: the request first, its tokens once the prompt is known
    with pytest.raises(Refusal) as own:
        run(gw.admit(tight, MODEL, 10, 10, begun=begun))
    assert own.value.type == "tokens" and "this key's limit of 30 tokens" in own.value.message
    assert own.value.rate is not None and own.value.rate[0] is begun
    # The refused tokens charged the account nothing (its other key has 1000 - 20 left); the request counted.
    assert run(gw.rate_state(free))[1].remaining == 980 and run(gw.rate_state(free))[0].remaining == 8


def test_live_usage_is_metered_at_every_flush_not_only_at_settlement(world: SimpleNamespace) -> None:
    gw = world.gateway()
    _, sk, _ = world.account()
    caller = gw.authenticate(sk, "sk")
    admission = run(gw.admit(caller, MODEL, 10, 50))
    admission.completion_tokens = 7  # the generation so far
    world.meter.flush()
    (row,) = world.store.usage([caller.key.id])
    assert (row.counter.requests, row.counter.prompt_tokens, row.counter.completion_tokens) == (1, 10, 7)
    admission.completion_tokens = 12
    world.meter.flush()
    gw.settle(admission)
    world.meter.flush()
    (row,) = world.store.usage([caller.key.id])
    assert (row.counter.requests, row.counter.prompt_tokens, row.counter.completion_tokens) == (1, 10, 12)
    assert row.counter.cost_micro == 22  # computed on the totals: no rounding per flush


def test_a_cancelled_generation_is_metered_for_what_it_made(world: SimpleNamespace) -> None:
    gw = world.gateway()
    _, sk, _ = world.account()
    caller = gw.authenticate(sk, "sk")
    engine = FixedEngine(MODEL, "a b c d e f g h", delay=0.05)
    admission = run(gw.admit(caller, MODEL, 3, 8))

    async def cancelled() -> None:
        task = asyncio.ensure_future(collect(gw.admissions, engine, Plan([[1, 2, 3]], SamplingParams(8)), admission))
        await asyncio.sleep(0.12)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(cancelled())
    assert admission.settled and 1 <= admission.completion_tokens < 8
    whole = run(gw.admit(caller, MODEL, 3, 8))
    (answer,) = asyncio.run(collect(gw.admissions, FixedEngine(MODEL, "a b c"), Plan([[1, 2, 3]], SamplingParams(8)),
                                    whole))
    assert (answer.text, answer.reason, whole.completion_tokens, whole.settled) == ("a b c", "stop", 3, True)
