"""From finished calls to the aggregates /stats shows, since the current stats epoch.

`Accounting.record` is called once per finished call. It updates the in-memory aggregates
and hands the row to the ledger; nothing here does I/O. At start the aggregates are read back
from the ledger's rollup of the epoch (`Aggregates.from_summary`), so they come out as they
were before the restart, at a cost that does not grow with the ledger. Usage windows
(requests today, tokens this minute) are not kept here: the limiter's windows are their one
source. The clock is injected so tests control time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import OUTCOMES
from .histogram import Histogram
from .ledger import LATENCY, OTHERS, SUCCESSES, CallRecord, LedgerStore, Summary
from .reports import local_start

DAY = 86_400.0
# Hours of refusal counts kept for the dashboard's chart (31 days).
REFUSAL_HOURS = 31 * 24
# The endpoints whose successful calls are chat messages (/stats' conversation count).
CHAT_ENDPOINTS = frozenset({"chat", "responses", "generate", "completion"})


@dataclass
class Tally:
    """Counts for one slice of the traffic (an upstream, a model, a type, a user)."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    estimated_calls: int = 0
    estimated_tokens: int = 0
    cost_usd: float = 0.0

    @staticmethod
    def of(rec: CallRecord) -> Tally:
        """One call's counts (made once per call, then merged into each slice it belongs to)."""
        return Tally(1, int(rec.outcome not in SUCCESSES), rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens,
                     1 if rec.estimated else 0, rec.prompt_tokens + rec.completion_tokens if rec.estimated else 0,
                     rec.cost_usd)

    def merge(self, other: Tally) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens
        self.estimated_calls += other.estimated_calls
        self.estimated_tokens += other.estimated_tokens
        self.cost_usd += other.cost_usd

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests, "errors": self.errors,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens, "cached_tokens": self.cached_tokens,
            "estimated_calls": self.estimated_calls, "estimated_tokens": self.estimated_tokens,
            "cost_usd": round(self.cost_usd, 6),
        }


class CostTrend:
    """Cost per day over the last week, for a monthly projection from recent use.

    Kept apart from the epoch's aggregates: a stats reset should not make next month look free.
    """

    WEEK_DAYS = 7

    def __init__(self) -> None:
        self.days: dict[int, float] = {}  # UTC day number -> USD
        self.first_ts: float | None = None

    def seed(self, days: dict[int, float], first_ts: float | None) -> None:
        self.days, self.first_ts = dict(days), first_ts

    def add(self, ts: float, cost: float) -> None:
        day = int(ts // DAY)
        if day not in self.days:  # a new day: the oldest ones go (a call's pass over the week, once a day)
            for old in [d for d in self.days if d <= day - self.WEEK_DAYS - 1]:
                del self.days[old]
        self.days[day] = self.days.get(day, 0.0) + cost
        if self.first_ts is None:
            self.first_ts = ts

    def last_week(self, now: float) -> float:
        today = int(now // DAY)
        return sum(cost for day, cost in self.days.items() if today - self.WEEK_DAYS < day <= today)

    def monthly(self, now: float) -> float:
        """Last week's spend per day of use, times 30; a young ledger divides by its age."""
        if self.first_ts is None:
            return 0.0
        today = int(now // DAY)
        week_start = (today - self.WEEK_DAYS + 1) * DAY
        elapsed_days = max(1.0, (now - max(week_start, self.first_ts)) / DAY)
        return self.last_week(now) / elapsed_days * 30.0


# Clients name models and users, so their tables are bounded: past this many distinct names in
# an epoch, newcomers are counted together under OTHERS. Reports show the top of each anyway.
MAX_DISTINCT = 10_000


def _slice(table: dict[str, Tally], key: str) -> Tally:
    tally = table.get(key)
    if tally is None:
        tally = table[key] = Tally()
    return tally


def _bounded(table: dict[str, Tally], key: str) -> str:
    return key if key in table or len(table) < MAX_DISTINCT else OTHERS


@dataclass
class Aggregates:
    """Everything counted since the epoch began."""

    epoch_started: float
    totals: Tally = field(default_factory=Tally)
    by_upstream: dict[str, Tally] = field(default_factory=dict)
    by_model: dict[str, Tally] = field(default_factory=dict)
    by_type: dict[str, Tally] = field(default_factory=dict)
    by_user: dict[str, Tally] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    latency: Histogram = field(default_factory=Histogram)
    ttft: Histogram = field(default_factory=Histogram)
    last_request: float | None = None
    user_last_seen: dict[str, float] = field(default_factory=dict)
    chat_messages: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)  # by the upstream fallen back from
    # Attempts that did not answer the client (a fallback did), by "upstream:outcome". They are
    # not requests of their own: the call is counted once, where it was served.
    attempts: dict[str, int] = field(default_factory=dict)
    # Calls the answer cache served, and the tokens and cost their live calls would have taken.
    cache_hits: int = 0
    saved_tokens: int = 0
    saved_usd: float = 0.0

    @classmethod
    def from_summary(cls, started: float, summary: Summary, edges: Iterable[CallRecord] = ()) -> Aggregates:
        """The epoch's aggregates from the ledger's rollups, and rows the rollups do not hold yet:
        equal to adding every row of the epoch one by one."""
        agg = cls(epoch_started=started)
        for (upstream, model, type_, endpoint, _key, outcome, fallback_from, final, _named, requests, prompt, completion,
             cached, estimated_calls, estimated_tokens, cost, latency_sum, _ttft_count, ttft_sum, saved_tokens,
             saved_usd, last_ts) in summary.calls:
            n = int(requests)  # type: ignore[call-overload]
            if not final:
                key = f"{upstream}:{outcome}"
                agg.attempts[key] = agg.attempts.get(key, 0) + n
                continue
            tally = Tally(n, n if outcome not in SUCCESSES else 0, int(prompt), int(completion),  # type: ignore[call-overload]
                          int(cached), int(estimated_calls), int(estimated_tokens),  # type: ignore[call-overload]
                          float(cost))  # type: ignore[arg-type]
            agg.totals.merge(tally)
            for table, name in ((agg.by_upstream, upstream), (agg.by_model, _bounded(agg.by_model, str(model))),
                                (agg.by_type, type_)):
                if name:
                    table.setdefault(str(name), Tally()).merge(tally)
            agg.outcomes[str(outcome)] = agg.outcomes.get(str(outcome), 0) + n
            agg.latency.sum += float(latency_sum)  # type: ignore[arg-type]
            agg.ttft.sum += float(ttft_sum)  # type: ignore[arg-type]
            last = float(last_ts)  # type: ignore[arg-type]
            agg.last_request = last if agg.last_request is None else max(agg.last_request, last)
            if outcome in SUCCESSES and endpoint in CHAT_ENDPOINTS:
                agg.chat_messages += n
            if outcome == "cache_hit":
                agg.cache_hits += n
                agg.saved_tokens += int(saved_tokens)  # type: ignore[call-overload]
                agg.saved_usd += float(saved_usd)  # type: ignore[arg-type]
            if fallback_from:
                agg.fallbacks[str(fallback_from)] = agg.fallbacks.get(str(fallback_from), 0) + n
        for (user, requests, errors, prompt, completion, cached, estimated_calls, estimated_tokens, cost,
             last_ts) in summary.users:
            name = _bounded(agg.by_user, str(user))
            agg.by_user.setdefault(name, Tally()).merge(Tally(
                int(requests), int(errors), int(prompt), int(completion), int(cached),  # type: ignore[call-overload]
                int(estimated_calls), int(estimated_tokens), float(cost)))  # type: ignore[call-overload, arg-type]
            agg.user_last_seen[name] = max(float(last_ts), agg.user_last_seen.get(name, 0.0))  # type: ignore[arg-type]
        for kind, index, count in summary.latency:
            histogram = agg.latency if kind == LATENCY else agg.ttft
            histogram.buckets[index] = histogram.buckets.get(index, 0) + count
            histogram.count += count
        for rec in edges:
            agg.add(rec)
        return agg

    def add(self, rec: CallRecord) -> None:
        if not rec.final:
            key = f"{rec.upstream}:{rec.outcome}"
            self.attempts[key] = self.attempts.get(key, 0) + 1
            return
        one = Tally.of(rec)
        self.totals.merge(one)
        for table, key in ((self.by_upstream, rec.upstream), (self.by_model, _bounded(self.by_model, rec.model)),
                           (self.by_type, rec.type)):
            if key:
                _slice(table, key).merge(one)
        if rec.user:
            user = _bounded(self.by_user, rec.user)
            _slice(self.by_user, user).merge(one)
            self.user_last_seen[user] = max(rec.ts, self.user_last_seen.get(user, 0.0))
        self.outcomes[rec.outcome] = self.outcomes.get(rec.outcome, 0) + 1
        self.latency.add(rec.latency_s)
        if rec.ttft_s is not None:
            self.ttft.add(rec.ttft_s)
        self.last_request = rec.ts if self.last_request is None else max(self.last_request, rec.ts)
        if rec.ok and rec.endpoint in CHAT_ENDPOINTS:
            self.chat_messages += 1
        if rec.fallback_from:
            self.fallbacks[rec.fallback_from] = self.fallbacks.get(rec.fallback_from, 0) + 1
        if rec.outcome == "cache_hit":
            self.cache_hits += 1
            self.saved_tokens += rec.saved_tokens
            self.saved_usd += rec.saved_usd


class Accounting:
    def __init__(self, ledger: LedgerStore | None, clock: Callable[[], float] = time.time) -> None:
        self.ledger = ledger
        self.clock = clock
        self.process_started = clock()
        self.current = Aggregates(epoch_started=self.process_started)
        self.listeners: list[Callable[[CallRecord], None]] = []
        self.trend = CostTrend()
        # Requests refused before any model was asked (no key, our own limits, a path not
        # forwarded, the ledger full), by reason, since this process started. Counted, never
        # ledger rows: a flood of them must not flood the books, nor count as failed calls.
        self.refused: dict[str, int] = {}
        self.refused_hours: dict[int, int] = {}   # by UTC hour, the last REFUSAL_HOURS of them

    def load(self, aggregates: Aggregates) -> None:
        """Start from the epoch's aggregates as the ledger has them (at start)."""
        self.current = aggregates

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        hour = int(self.clock() // 3600)
        self.refused_hours[hour] = self.refused_hours.get(hour, 0) + 1
        if len(self.refused_hours) > REFUSAL_HOURS:
            del self.refused_hours[min(self.refused_hours)]

    def refusals_by(self, bucket: str, tz: Any, since: float, until: float) -> dict[float, int]:
        """Refusals per local hour or day of [since, until), as this process counted them."""
        out: dict[float, int] = {}
        for hour, count in self.refused_hours.items():
            if since <= hour * 3600 < until:
                start = local_start(hour * 3600.0, "day" if bucket == "day" else "hour", tz)
                out[start] = out.get(start, 0) + count
        return out

    def record(self, rec: CallRecord) -> None:
        self.current.add(rec)
        self.trend.add(rec.ts, rec.cost_usd)
        if self.ledger is not None:
            self.ledger.append(rec)
        for listener in self.listeners:
            listener(rec)

    def reset(self) -> float:
        """Start a new stats epoch. The ledger keeps every row; windows are not touched."""
        started = self.clock()
        self.current = Aggregates(epoch_started=started)
        if self.ledger is not None:
            self.ledger.new_epoch(started)
        return started

    def active_users(self, window_s: float) -> list[str]:
        horizon = self.clock() - window_s
        seen = self.current.user_last_seen
        return sorted((u for u, ts in seen.items() if ts >= horizon), key=lambda u: -seen[u])
