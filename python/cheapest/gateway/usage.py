"""Usage reports: per key and model, by hour or day (the Management API), and the calling key's own usage."""

from __future__ import annotations

from typing import Literal

from cheapest.api.management import UsageBucket, UsageReport, UsageTotal
from cheapest.api.models import KeyUsage, ModelUsage, RateLimits
from cheapest.config import Settings
from cheapest.gateway.auth import Caller
from cheapest.gateway.errors import Refusal
from cheapest.store import Store, UsageCounter
from cheapest.vocabulary import DAY, HOUR

GroupBy = Literal["hour", "day"]
MAX_RANGE_S = {"hour": 31 * DAY, "day": 400 * DAY}
DEFAULT_RANGE_S = 30 * DAY


def usage_report(store: Store, key_ids: list[str], start: int | None, to: int | None, group_by: str,
                 now: int) -> UsageReport:
    """Totals of `key_ids` per key, model and hour/day in [start, to) (rounded out to whole hours); the range
    defaults to the 30 days up to the next hour."""
    if group_by not in ("hour", "day"):
        raise Refusal("invalid_request", "`group_by` must be `hour` or `day`.", param="group_by", code="invalid_value")
    to = now + HOUR if to is None else to
    start = to - DEFAULT_RANGE_S if start is None else start
    if start < 0 or to <= start:
        raise Refusal("invalid_request", "`from` must be before `to` (and not negative).", param="from",
                      code="invalid_value")
    if to - start > MAX_RANGE_S[group_by]:
        raise Refusal("invalid_request", f"The range is too long for group_by={group_by}; at most "
                      f"{MAX_RANGE_S[group_by] // DAY} days.", param="from", code="invalid_value")
    start = start // HOUR * HOUR
    to = -(-to // HOUR) * HOUR
    step = HOUR if group_by == "hour" else DAY
    buckets: dict[tuple[str, str, int], UsageCounter] = {}
    totals: dict[tuple[str, str], UsageCounter] = {}
    for row in store.usage(key_ids, start, to):
        buckets.setdefault((row.key_id, row.model, row.hour // step * step), UsageCounter()).add(row.counter)
        totals.setdefault((row.key_id, row.model), UsageCounter()).add(row.counter)
    return UsageReport(
        from_=start, to=to, group_by=group_by,  # type: ignore[arg-type]
        data=[UsageBucket(k, m, t, v.requests, v.prompt_tokens, v.completion_tokens, v.cost_micro, v.cost_micro / 1e6)
              for (k, m, t), v in sorted(buckets.items())],
        totals=[UsageTotal(k, m, v.requests, v.prompt_tokens, v.completion_tokens, v.cost_micro, v.cost_micro / 1e6)
                for (k, m), v in sorted(totals.items())],
    )


def key_usage(settings: Settings, store: Store, caller: Caller) -> KeyUsage:
    """The calling key's plan, effective limits, budget and usage so far (flushed within the flush interval)."""
    key, account, limits = caller.key, caller.account, caller.limits
    totals: dict[str, UsageCounter] = {}
    for row in store.usage([key.id]):
        totals.setdefault(row.model, UsageCounter()).add(row.counter)
    plan = settings.plan(account.plan)
    return KeyUsage(
        key_id=key.id, plan=account.plan, limits=RateLimits(limits.rpm, limits.tpm),
        usage=[ModelUsage(m, t.requests, t.prompt_tokens, t.completion_tokens, t.cost_micro / 1e6, t.cost_micro)
               for m, t in sorted(totals.items())],
        budget_usd=key.limits.budget_usd if key.limits.budget_usd is not None else plan.budget_usd,
        budget_window=key.limits.budget_window or plan.budget_window,
    )
