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
        self._limits = _LimitCollector(limiter)
        # Each process holds the deployment's spend (read back from the ledger): one value, not a sum.
        self._budgets = _BudgetCollector(budgets) if budgets is not None and budgets.budgets else None
        if self._budgets is not None:
            r.register(self._budgets)
        self._models: set[str] = set()
        self.lines, self.ledger, self.alerts = lines, ledger, alerts
        # Workers of one server (`serve --workers`) write their series to one directory, and
        # whichever answers a scrape sums them all, as prometheus_client's multiprocess mode does.
        # Figures that live in a process's memory are then published there every second.
        self.shared_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if self.shared_dir is None:
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

    def observe(self, rec: CallRecord) -> None:
        upstream, model = rec.upstream or "none", self._model(rec.model or "none")
        if not rec.final:
            self.attempts.labels(upstream, rec.outcome).inc()
            return
        self.requests.labels(upstream, model, rec.type, rec.outcome).inc()
        estimated = "true" if rec.estimated else "false"
        if rec.prompt_tokens:
            self.tokens.labels(upstream, model, "prompt", estimated).inc(rec.prompt_tokens)
        if rec.completion_tokens:
            self.tokens.labels(upstream, model, "completion", estimated).inc(rec.completion_tokens)
        if rec.cost_usd:
            self.cost.labels(upstream, model).inc(rec.cost_usd)
        self.duration.labels(upstream).observe(rec.latency_s)
        if rec.ttft_s is not None:
            self.ttft.labels(upstream).observe(rec.ttft_s)
        if rec.fallback_from:
            self.fallbacks.labels(rec.fallback_from, upstream).inc()
        if rec.saved_tokens:
            self.cache_saved_tokens.inc(rec.saved_tokens)
        if rec.saved_usd:
            self.cache_saved_usd.inc(rec.saved_usd)

    def exposition(self) -> bytes:
        if self.shared_dir is None:
            return generate_latest(self.registry)
        self.publish()
        every = CollectorRegistry()
        MultiProcessCollector(every, self.shared_dir)  # type: ignore[no-untyped-call]  # untyped upstream
        every.register(self._limits)  # the limits are the deployment's already (Redis)
        if self._budgets is not None:
            every.register(self._budgets)
        return generate_latest(every)
