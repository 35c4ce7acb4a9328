"""Prometheus metrics: an app-owned registry, exposed by prometheus_client itself.

Counters and histograms are fed one finished call at a time (an accounting listener), so they
count since the process started, as Prometheus expects, and are untouched by a stats reset.
Limit usage is read from the limiter when scraped. Label sets are bounded: upstreams, types,
outcomes and limit scopes come from the config, and model names are kept to the first
`MAX_MODELS` seen (the rest are "other"), because a catch-all upstream would otherwise let
clients mint label values. Users are never labels.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .admission import WaitLines
from .alerts import Alerts
from .budgets import Budgets
from .limits import WindowStore
from .ledger import CallRecord, LedgerStore
from .tasks import running

MAX_MODELS = 50
# Calls summed before they go into the series even if nobody scrapes: bounds what is held.
FLUSH_EVERY = 1024
# Seconds: from a cached local reply (a few ms) to a long cloud generation (minutes).
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _LimitCollector(Collector):
    def __init__(self, limiter: WindowStore) -> None:
        self.limiter = limiter

    def collect(self) -> Iterator[GaugeMetricFamily]:
        used = GaugeMetricFamily("tollgate_limit_used", "Usage of a limited scope now (requests, tokens or calls).",
                                 labels=["scope", "limit"])
        maximum = GaugeMetricFamily("tollgate_limit_max", "The configured limit of a scope.", labels=["scope", "limit"])
        remaining = GaugeMetricFamily("tollgate_limit_remaining", "What is left of a limit now.",
                                      labels=["scope", "limit"])
        reset = GaugeMetricFamily("tollgate_limit_reset_seconds", "Seconds until a limit's window is empty.",
                                  labels=["scope", "limit"])
        for row in self.limiter.report():
            labels = [str(row["scope"]), str(row["limit"])]
            used_value, max_value = float(row["used"]), float(row["max"])  # type: ignore[arg-type]
            used.add_metric(labels, used_value)
            maximum.add_metric(labels, max_value)
            remaining.add_metric(labels, max(0.0, max_value - used_value))
            reset.add_metric(labels, float(row["reset_s"]))  # type: ignore[arg-type]
        yield from (used, maximum, remaining, reset)


_UNWRITTEN = ("tollgate_ledger_unwritten_rows",
              "LedgerStore rows waiting in memory to be written (a backlog that grows: the ledger is failing).")
_FAILING = ("tollgate_ledger_failing", "1 while ledger writes fail (full disk, lock...).")
_DROPPED = ("tollgate_ledger_dropped_rows",
            "LedgerStore rows given up because the backlog was full (on_ledger_full = serve).")
_DELIVERIES = ("tollgate_alert_deliveries", "Alerts posted to webhooks, by result (failed: the webhook refused, "
               "timed out, had no URL, or the queue was full).")
_WAITING = ("tollgate_waiting_calls", "Calls waiting in line for a place (wait mode).")


class _BudgetCollector(Collector):
    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets

    def collect(self) -> Iterator[GaugeMetricFamily]:
        spent = GaugeMetricFamily("tollgate_budget_spent_usd", "Spend in a budget's current period (per-user "
                                  "budgets: the highest user's), in US dollars.", labels=["budget", "period"])
        ceiling = GaugeMetricFamily("tollgate_budget_usd", "A budget's ceiling, in US dollars.",
                                    labels=["budget", "period"])
        for row in self.budgets.report():
            labels = [str(row["name"]), str(row["period"])]
            spent.add_metric(labels, float(row["spent_usd"]))
            ceiling.add_metric(labels, float(row["usd"]))
        yield from (spent, ceiling)


class _LedgerCollector(Collector):
    def __init__(self, ledger: LedgerStore) -> None:
        self.ledger = ledger

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        health = self.ledger.health()
        yield GaugeMetricFamily(*_UNWRITTEN, value=health.unwritten)
        yield GaugeMetricFamily(*_FAILING, value=0 if health.failing is None else 1)
        yield CounterMetricFamily(*_DROPPED, value=health.dropped)


class _AlertCollector(Collector):
    def __init__(self, alerts: Alerts) -> None:
        self.alerts = alerts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(*_DELIVERIES, labels=["result"])
        family.add_metric(["sent"], self.alerts.sent)
        family.add_metric(["failed"], self.alerts.failed)
        yield family


class Metrics:
    def __init__(self, limiter: WindowStore, lines: WaitLines, ledger: LedgerStore, alerts: Alerts,
                 budgets: Budgets | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tollgate_requests", "Calls by upstream, model, type and outcome.",
                                ["upstream", "model", "type", "outcome"], registry=r)
        self.tokens = Counter("tollgate_tokens", "Tokens by upstream, model and kind (prompt or completion); "
                              "estimated=true where the upstream reported none.",
                              ["upstream", "model", "kind", "estimated"], registry=r)
        self.cost = Counter("tollgate_cost_usd", "Cost in US dollars at the configured prices.",
                            ["upstream", "model"], registry=r)
        self.duration = Histogram("tollgate_request_duration_seconds", "Call duration, first byte in to last out.",
                                  ["upstream"], buckets=_DURATION_BUCKETS, registry=r)
        self.ttft = Histogram("tollgate_time_to_first_token_seconds", "Time to the first streamed chunk.",
                              ["upstream"], buckets=_TTFT_BUCKETS, registry=r)
        self.fallbacks = Counter("tollgate_fallbacks", "Calls another upstream took.",
                                 ["from_upstream", "to_upstream"], registry=r)
        self.refused = Counter("tollgate_refused_requests", "Requests refused before any upstream, by reason "
                               "(a path not metered nor passed through, a method not allowed...).",
                               ["reason"], registry=r)
        self.attempts = Counter("tollgate_fallen_back_attempts", "Attempts an upstream refused or failed "
                                "before a fallback answered the call, by upstream and outcome.",
                                ["upstream", "outcome"], registry=r)
        self.cache_lookups = Counter("tollgate_cache_lookups", "Calls a cache rule covered, by result: hit "
                                     "(answered from the cache), miss (asked upstream), bypass (the request asked "
                                     "not to use the cache, or asked for a sampled answer).", ["result"], registry=r)
        for result in ("hit", "miss", "bypass"):
            self.cache_lookups.labels(result)
        self.cache_saved_tokens = Counter("tollgate_cache_saved_tokens", "Tokens the answers from the cache "
                                          "would have taken live.", registry=r)
        self.cache_saved_usd = Counter("tollgate_cache_saved_usd", "What those tokens would have cost, in US "
                                       "dollars at the configured prices.", registry=r)
        self.cache_entries = Gauge("tollgate_cache_entries", "Answers the cache holds.", registry=r,
                                   multiprocess_mode="livemax")
        self.cache_bytes = Gauge("tollgate_cache_bytes", "Bytes the cache's answers and keys take.", registry=r,
                                 multiprocess_mode="livemax")
        self.in_flight = Gauge("tollgate_in_flight_calls", "LLM calls being served now.", registry=r,
                               multiprocess_mode="livesum")
        self.in_flight_calls = 0  # this process's; the gauge reads it at a scrape (see call_started)
        self._limits = _LimitCollector(limiter)
        # Each process holds the deployment's spend (read back from the ledger): one value, not a sum.
        self._budgets = _BudgetCollector(budgets) if budgets is not None and budgets.budgets else None
        if self._budgets is not None:
            r.register(self._budgets)
        self._models: set[str] = set()
        # Calls counted but not yet in the series (see observe): by label set, with their sums.
        self._calls: dict[tuple[str, str, str, str, bool, str | None], list[Any]] = {}
        self._attempts: dict[tuple[str, str], int] = {}
        self._latencies: list[tuple[str, float, float | None]] = []
        self._held = 0
        self.lines, self.ledger, self.alerts = lines, ledger, alerts
        # Workers of one server (`serve --workers`) write their series to one directory, and
        # whichever answers a scrape sums them all, as prometheus_client's multiprocess mode does.
        # Figures that live in a process's memory are then published there every second.
        self.shared_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        # A scrape answered by one worker reads the others' series from their files: each call
        # goes there at once, as a scrape must count every call booked by then.
        self._flush_every = FLUSH_EVERY if self.shared_dir is None else 1
        if self.shared_dir is None:
            self.in_flight.set_function(lambda: float(self.in_flight_calls))
            waiting = Gauge(*_WAITING, registry=r)
            waiting.set_function(lambda: float(lines.waiting))
            for collector in (self._limits, _LedgerCollector(ledger), _AlertCollector(alerts)):
                r.register(collector)
            return
        self._waiting = Gauge(*_WAITING, registry=r, multiprocess_mode="livesum")
        self._unwritten = Gauge(*_UNWRITTEN, registry=r, multiprocess_mode="livesum")
        self._failing = Gauge(*_FAILING, registry=r, multiprocess_mode="livemax")
        self._dropped = Counter(*_DROPPED, registry=r)
        self._deliveries = Counter(*_DELIVERIES, ["result"], registry=r)
        for result in ("sent", "failed"):
            self._deliveries.labels(result)
        self._published = {"dropped": 0, "sent": 0, "failed": 0}

    def publish(self) -> None:
        """This process's own figures, into the workers' shared directory."""
        if self.shared_dir is None:
            return
        self.flush()
        health = self.ledger.health()
        self._waiting.set(self.lines.waiting)
        self._unwritten.set(health.unwritten)
        self._failing.set(0 if health.failing is None else 1)
        now = {"dropped": health.dropped, "sent": self.alerts.sent, "failed": self.alerts.failed}
        for name, value in now.items():
            grown = value - self._published[name]
            if grown > 0:
                (self._dropped if name == "dropped" else self._deliveries.labels(name)).inc(grown)
        self._published = now

    async def lifecycle(self, app: object) -> AsyncIterator[None]:
        async def every_second() -> None:
            while True:
                self.publish()
                await asyncio.sleep(1.0)

        if self.shared_dir is None:
            yield
            return
        async with running(every_second()):
            yield
        self.publish()  # a worker that stops leaves its last calls counted for the others

    def cache_held(self, entries: int, held: int) -> None:
        self.cache_entries.set(entries)
        self.cache_bytes.set(held)

    def _model(self, model: str) -> str:
        if model in self._models:
            return model
        if len(self._models) < MAX_MODELS:
            self._models.add(model)
            return model
        return "other"

    def call_started(self) -> None:
        """A metered call begins. A plain count, read when scraped: the gauge's inc and dec take
        a lock each, twice a call. Workers sharing a directory must write their gauge's file."""
        self.in_flight_calls += 1
        if self.shared_dir is not None:
            self.in_flight.inc()

    def call_ended(self) -> None:
        self.in_flight_calls -= 1
        if self.shared_dir is not None:
            self.in_flight.dec()

    def observe(self, rec: CallRecord) -> None:
        """Count a finished call. Calls are summed here by label set and handed to the
        prometheus_client series in `flush`, before each scrape: a labelled increment takes a
        lookup and a lock, and a call made seven of them (a twentieth of its CPU). Workers
        sharing a directory hand each call over at once (see `_flush_every`)."""
        upstream = rec.upstream or "none"
        if not rec.final:
            attempt = (upstream, rec.outcome)
            self._attempts[attempt] = self._attempts.get(attempt, 0) + 1
        else:
            key = (upstream, rec.model or "none", rec.type, rec.outcome, rec.estimated, rec.fallback_from)
            sums = self._calls.get(key)
            if sums is None:
                sums = self._calls[key] = [0, 0, 0, 0.0, 0, 0.0]
            sums[0] += 1
            sums[1] += rec.prompt_tokens
            sums[2] += rec.completion_tokens
            sums[3] += rec.cost_usd
            sums[4] += rec.saved_tokens
            sums[5] += rec.saved_usd
            self._latencies.append((upstream, rec.latency_s, rec.ttft_s))
        self._held += 1
        if self._held >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        """Hand the calls counted since the last flush to the series."""
        calls, attempts, latencies = self._calls, self._attempts, self._latencies
        self._calls, self._attempts, self._latencies, self._held = {}, {}, [], 0
        for (upstream, outcome), n in attempts.items():
            self.attempts.labels(upstream, outcome).inc(n)
        for (upstream, name, type_, outcome, estimated, fallback_from), sums in calls.items():
            n, prompt, completion, cost, saved_tokens, saved_usd = sums
            model = self._model(name)
            self.requests.labels(upstream, model, type_, outcome).inc(n)
            flag = "true" if estimated else "false"
            if prompt:
                self.tokens.labels(upstream, model, "prompt", flag).inc(prompt)
            if completion:
                self.tokens.labels(upstream, model, "completion", flag).inc(completion)
            if cost:
                self.cost.labels(upstream, model).inc(cost)
            if fallback_from:
                self.fallbacks.labels(fallback_from, upstream).inc(n)
            if saved_tokens:
                self.cache_saved_tokens.inc(saved_tokens)
            if saved_usd:
                self.cache_saved_usd.inc(saved_usd)
        durations: dict[str, Any] = {}
        for upstream, latency, ttft in latencies:
            series = durations.get(upstream)
            if series is None:
                series = durations[upstream] = (self.duration.labels(upstream), self.ttft.labels(upstream))
            series[0].observe(latency)
            if ttft is not None:
                series[1].observe(ttft)

    def exposition(self) -> bytes:
        self.flush()
        if self.shared_dir is None:
            return generate_latest(self.registry)
        self.publish()
        every = CollectorRegistry()
        MultiProcessCollector(every, self.shared_dir)  # type: ignore[no-untyped-call]  # untyped upstream
        every.register(self._limits)  # the limits are the deployment's already (Redis)
        if self._budgets is not None:
            every.register(self._budgets)
        return generate_latest(every)
