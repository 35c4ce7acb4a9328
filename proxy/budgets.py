"""Spending budgets: a ceiling in dollars per calendar day or month on the calls a budget covers
(an upstream's, a model's, a proxy key's, a user's, every user's each, or everything).

Admission asks `check` before a call leaves, with the call's estimated cost (its prompt, as
tiktoken counts it, and the output it asks for, at the configured prices): a call that would go
past the ceiling is refused with a 429, or sent to its upstream's fallback. Each finished call's
real cost is added (`on_call`), and crossing a fraction of the ceiling (`alert_at`) is announced
once a period through the alerts' webhooks and e-mail. Spend is read from the ledger at start
(`load`), so neither a restart nor a stats reset forgets it; where several processes write one
ledger, each reads it back every few seconds (`refresh`), so the ceiling holds across them to
within that interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .config import Budget, Config
from .ledger import CallRecord, LedgerStore
from .limits import Denial
from .tasks import running

if TYPE_CHECKING:
    from .alerts import Alerts

log = logging.getLogger("tollgate.budgets")

# Where processes share a ledger: how often each reads the deployment's spend back.
SHARED_REFRESH_S = 5.0
# Per-user budgets keep at most this many users' spend in a period (the busiest stay).
MAX_USERS = 10_000


@dataclass
class _Spend:
    start: float                 # the period it is for
    usd: float = 0.0
    announced: set[float] = field(default_factory=set)   # fractions already alerted this period


class Budgets:
    def __init__(self, config: Config, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.budgets = list(config.budgets.values())
        self._spend: dict[tuple[str, str], _Spend] = {}    # (budget, user or ""): this period's
        self.alerts: Alerts | None = None

    # --- periods -------------------------------------------------------------------------

    def period(self, budget: Budget, now: float) -> tuple[float, float]:
        """The calendar day or month holding `now`, in the stats zone: [start, end)."""
        tz = self.config.stats.tz
        local = datetime.fromtimestamp(now, tz)
        if budget.period == "day":
            start = local.replace(hour=0, minute=0, second=0, microsecond=0)
            end = start + timedelta(days=1)   # wall-clock arithmetic: a DST day is 23 or 25 hours
        else:
            start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            end = (start + timedelta(days=32)).replace(day=1)
        return start.timestamp(), end.timestamp()

    def _slot(self, budget: Budget, user: str | None, now: float) -> _Spend:
        start, _ = self.period(budget, now)
        key = (budget.name, user if budget.per_user and user is not None else "")
        slot = self._spend.get(key)
        if slot is None or slot.start != start:
            if slot is None and len(self._spend) > MAX_USERS * max(1, len(self.budgets)):
                self._forget_idle(now)
            slot = self._spend[key] = _Spend(start)
        return slot

    def _forget_idle(self, now: float) -> None:
        """Drop the slots of past periods, and past the bound the smallest spenders."""
        current = {b.name: self.period(b, now)[0] for b in self.budgets}
        self._spend = {k: v for k, v in self._spend.items() if v.start == current.get(k[0])}
        if len(self._spend) > MAX_USERS * max(1, len(self.budgets)):
            kept = sorted(self._spend.items(), key=lambda item: -item[1].usd)[:MAX_USERS]
            self._spend = dict(kept)

    # --- the check before a call -----------------------------------------------------------

    def covering(self, upstream: str, model: str, key: str | None, user: str | None) -> list[Budget]:
        return [b for b in self.budgets if b.covers(upstream, model, key, user)]

    def check(self, budgets: list[Budget], user: str | None, estimate: float) -> tuple[Budget, Denial] | None:
        """The first of `budgets` this call would take past its ceiling, and why; None if none."""
        now = self.clock()
        for budget in budgets:
            slot = self._slot(budget, user, now)
            if slot.usd >= budget.usd or (estimate > 0 and slot.usd + estimate > budget.usd):
                start, end = self.period(budget, now)
                whose = f" for user '{user}'" if budget.per_user else ""
                when = datetime.fromtimestamp(end, self.config.stats.tz).strftime("%Y-%m-%d %H:%M")
                note = (f"Budget '{budget.name}' of ${budget.usd:,.2f} a {budget.period}{whose} is spent "
                        f"(${slot.usd:,.4f} so far, this call about ${estimate:,.4f} more); it renews at {when}.")
                return budget, Denial(f"budget:{budget.name}", "budget", end - now, 0, note)
        return None

    # --- spend ---------------------------------------------------------------------------

    def on_call(self, rec: CallRecord) -> None:
        """An accounting listener: each finished call's real cost."""
        if rec.cost_usd <= 0:
            return
        for budget in self.covering(rec.upstream, rec.model, rec.key_id, rec.user):
            slot = self._slot(budget, rec.user, rec.ts)
            slot.usd += rec.cost_usd
            self._announce(budget, rec.user, slot)

    def _announce(self, budget: Budget, user: str | None, slot: _Spend) -> None:
        for fraction in budget.alert_at:
            if fraction in slot.announced or slot.usd < fraction * budget.usd:
                continue
            slot.announced.add(fraction)
            if self.alerts is not None:
                whose = f" ({user})" if budget.per_user and user else ""
                self.alerts.announce(
                    f"budget {budget.name}{whose} {fraction:.0%}", "budget_usd", slot.usd, fraction * budget.usd,
                    budget.webhooks, budget.emails,
                    claim=f"budget:{budget.name}:{user or ''}:{fraction}:{int(slot.start)}")

    def read(self, ledger: LedgerStore, now: float) -> dict[tuple[str, str], float]:
        """This period's spend as the ledger has it, by (budget, user): on a worker thread."""
        spent: dict[tuple[str, str], float] = {}
        starts = {self.period(b, now)[0] for b in self.budgets}
        for start in starts:
            rows = ledger.spend(start)
            for budget in self.budgets:
                if self.period(budget, now)[0] != start:
                    continue
                for upstream, model, key, user, cost in rows:
                    if budget.covers(upstream, model, key, user):
                        where = (budget.name, user if budget.per_user and user is not None else "")
                        spent[where] = spent.get(where, 0.0) + cost
        return spent

    def apply(self, spent: dict[tuple[str, str], float], now: float, starting: bool) -> None:
        """What `read` found becomes this process's figures: on the event loop, where calls add to them."""
        for (name, user), usd in spent.items():
            budget = self.config.budgets[name]
            slot = self._slot(budget, user or None, now)
            slot.usd = usd
            if starting:
                # Fractions passed before this process started were announced by the one that
                # saw them: not again.
                slot.announced |= {f for f in budget.alert_at if usd >= f * budget.usd}
            else:
                # Crossed by the calls of several processes together: announced here (each
                # crossing is claimed once across them, so only one of them sends it).
                self._announce(budget, user or None, slot)

    async def reload(self, ledger: LedgerStore, starting: bool) -> None:
        """Read this period's spend back from the ledger (this process's rows committed first)."""
        if not starting:
            await ledger.flush(timeout=SHARED_REFRESH_S)
        now = self.clock()
        spent = await asyncio.get_running_loop().run_in_executor(None, self.read, ledger, now)
        self.apply(spent, now, starting)

    async def lifecycle(self, ledger: LedgerStore, shared: bool) -> AsyncIterator[None]:
        """Read this period's spend at start; where processes share the ledger, again and again."""
        await self.reload(ledger, starting=True)

        async def refresh() -> None:
            while True:
                await asyncio.sleep(SHARED_REFRESH_S)
                await self.reload(ledger, starting=False)

        if not shared:
            yield
            return
        async with running(refresh()):
            yield

    # --- reports -------------------------------------------------------------------------

    def report(self) -> list[dict[str, Any]]:
        """Each budget now: /stats detail.budgets, /metrics and the dashboard."""
        now = self.clock()
        out = []
        for budget in self.budgets:
            start, end = self.period(budget, now)
            slots = {user: s.usd for (name, user), s in self._spend.items() if name == budget.name and s.start == start}
            spent = max(slots.values(), default=0.0) if budget.per_user else slots.get("", 0.0)
            row: dict[str, Any] = {
                "name": budget.name, "period": budget.period, "usd": budget.usd, "spent_usd": round(spent, 6),
                "remaining_usd": round(max(0.0, budget.usd - spent), 6), "pct": round(100 * spent / budget.usd, 1),
                "resets_at": datetime.fromtimestamp(end, self.config.stats.tz).isoformat(timespec="seconds"),
                "on_budget": budget.on_budget,
                "covers": {k: v for k, v in (("upstream", budget.upstream), ("model", budget.model),
                                             ("key", budget.key), ("user", budget.user)) if v is not None},
            }
            if budget.per_user:
                row["per_user"] = True
                row["users_over"] = sum(1 for usd in slots.values() if usd >= budget.usd)
                row["top_users"] = dict(sorted(slots.items(), key=lambda item: -item[1])[:10])
            out.append(row)
        return out
