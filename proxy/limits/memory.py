"""The limiter's windows in this process's memory: free-tier limits held exactly, whatever the
concurrency.

Pure logic with an injected clock, no I/O and no awaiting: `admit` decides and records in one
synchronous step, so on one event loop no two callers can both take the last place.

Each *scope* (an upstream, a model pattern, a user) has the limits of its config table:
requests per minute, requests per day (rolling 24 h, or a calendar day in a time zone), tokens
per minute, and calls in flight. Windows are sliding logs of admissions, so "never more than
the limit in any window of its length" holds exactly, and a refusal says exactly how long until
a place frees: the moment the oldest entries that stand in the way leave the window.

TPM admission counts the call's estimated input (plus its requested output, if configured)
before forwarding; `finish` replaces that with the real usage. Windows are rebuilt from the
ledger at start and are never touched by a stats reset.
"""

from __future__ import annotations

import fnmatch
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from ..config import Config
from ..ledger import Admission
from .windows import HEADER_NAMES, Denial, Scope, Ticket, Window, _row, _worse, format_duration

class Limiter:
    """The windows in this process's memory: exact, and one synchronous step per admission."""

    def __init__(self, config: Config, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.policy = config.limits
        self.zone = zone = config.stats.tz
        # The upstream whose figures /stats shows is counted even where it has no limit: its
        # windows are the one source of the seed's rate_limits strings and the alerts.
        self._upstreams = {name: Scope.build(f"upstream:{name}", u.limits, zone,
                                       tracked=name == config.stats.limits_upstream)
                           for name, u in config.upstreams.items()}
        self._models = {pattern: Scope.build(f"model:{pattern}", limits, zone)
                        for pattern, limits in config.limits.models.items()}
        self._named_users = {user: Scope.build(f"user:{user}", limits, zone)
                             for user, limits in config.limits.users.items()}
        self._keys = {name: Scope.build(f"key:{name}", key.limits, zone) for name, key in config.keys.items()}
        # Per-user scopes made on demand; idle ones are dropped so 10,000 users cost only
        # what their live windows hold.
        self._users: dict[str, Scope] = {}
        # The model patterns each model name falls under, matched once per name (fnmatch costs
        # a regex per pattern per call). Names come from clients: held for at most 1,024.
        self._matched: dict[str, list[Scope]] = {}
        self._sweep_at = 1024  # sweep when the user table doubles: amortised O(1) per call
        self.released: list[Callable[[], None]] = []  # told when a place is given back later

    # --- which scopes a call is in ----------------------------------------------------

    def scopes(self, upstream: str, model: str, user: str | None, key: str | None = None) -> list[Scope]:
        found = [self._upstreams[upstream]]
        if key is not None and key in self._keys:
            found.append(self._keys[key])
        matched = self._matched.get(model)
        if matched is None:
            if len(self._matched) >= 1024:
                self._matched.clear()
            matched = self._matched[model] = [s for pattern, s in self._models.items()
                                              if fnmatch.fnmatchcase(model, pattern)]
        found += matched
        if user is not None:
            if user in self._named_users:
                found.append(self._named_users[user])
            elif self.policy.per_user.any:
                scope = self._users.get(user)
                if scope is None:
                    scope = self._users[user] = Scope.build(f"user:{user}", self.policy.per_user, self.zone)
                found.append(scope)
        return [s for s in found if s.counts or s.blocked_until]

    def needs_estimate(self, scopes: list[Scope]) -> bool:
        for scope in scopes:
            if scope.estimates:
                return True
        return False

    def caps(self, scopes: list[Scope]) -> tuple[int | None, int | None]:
        """The tightest per-request (input, output) token caps among the scopes."""
        # One loop, no lists: every admission asks.
        cap_in: int | None = None
        cap_out: int | None = None
        for scope in scopes:
            limits = scope.limits
            if limits.max_input_tokens and (cap_in is None or limits.max_input_tokens < cap_in):
                cap_in = limits.max_input_tokens
            if limits.max_output_tokens and (cap_out is None or limits.max_output_tokens < cap_out):
                cap_out = limits.max_output_tokens
        return cap_in, cap_out

    # --- admission ----------------------------------------------------------------------

    def check(self, scopes: list[Scope], tokens: int) -> Denial | None:
        """The denial that lasts longest (the first found of those that last as long), or None
        if every scope has room now."""
        now = self.clock()
        worst: Denial | None = None
        for scope in scopes:
            # One plain loop, a Denial built only where one is due: every admission runs it.
            if scope.blocked_until > now:
                worst = _worse(Denial(scope.name, "upstream_rate_limit", scope.blocked_until - now, 0), worst)
            concurrency = scope.limits.concurrency
            if concurrency and scope.in_flight >= concurrency:
                # No time can be promised: a place frees when a call in flight ends.
                worst = _worse(Denial(scope.name, "concurrency", self.policy.concurrency_retry_s, concurrency), worst)
            for window, kind, weighted in scope.limited:
                wait = window.wait_for(now, tokens if weighted else 1)
                if wait is None or wait > 0:
                    worst = _worse(Denial(scope.name, kind, wait, window.limit), worst)
        return worst

    async def admit(self, scopes: list[Scope], tokens: int) -> Ticket | Denial:
        return self.admit_now(scopes, tokens)

    def admit_now(self, scopes: list[Scope], tokens: int) -> Ticket | Denial:
        """Decide and record in one synchronous step: no other caller can come in between."""
        denial = self.check(scopes, tokens)
        if denial is not None:
            return denial
        return self.record(scopes, tokens, self.clock())

    def record(self, scopes: list[Scope], tokens: int, now: float, key: str | None = None) -> Ticket:
        """Take the call's places in every window (already decided: nothing is checked)."""
        ticket = Ticket(scopes, now, tokens, key)
        for scope in scopes:
            scope.in_flight += 1
            for window in (scope.rpm, scope.rpd):
                if window is not None:
                    window.add(now, 1)
            if scope.tpm is not None:
                ticket.token_entries.append((scope.tpm, scope.tpm.add(now, tokens)))
        if len(self._users) >= self._sweep_at:
            self._sweep()
            self._sweep_at = max(1024, 2 * len(self._users))
        return ticket

    def finish(self, ticket: Ticket, tokens: int) -> None:
        """The call ended: give back its concurrency place, put its real tokens in the windows."""
        if ticket.done:
            return
        ticket.done = True
        for scope in ticket.scopes:
            scope.in_flight -= 1
        for window, entry in ticket.token_entries:
            window.adjust(entry, tokens)

    def upstream_refused(self, upstream: str, retry_after: float | None) -> None:
        """The upstream answered 429 itself: hold calls to it back until it said to retry."""
        if retry_after is not None and retry_after > 0:
            scope = self._upstreams[upstream]
            scope.blocked_until = max(scope.blocked_until, self.clock() + retry_after)

    def _sweep(self) -> None:
        now = self.clock()
        for user, scope in list(self._users.items()):
            for window in (scope.rpm, scope.rpd, scope.tpm):
                if window is not None:
                    window.prune(now)
            if scope.idle:
                del self._users[user]

    @property
    def tracked_users(self) -> int:
        return len(self._users)

    # --- restart -------------------------------------------------------------------------

    def replay(self, admission: Admission) -> None:
        """Refill the windows from one ledger admission; they come oldest first at start-up."""
        if admission.upstream not in self._upstreams:
            return
        now = self.clock()
        for scope in self.scopes(admission.upstream, admission.model, admission.user, admission.key_id):
            for window, amount in ((scope.rpm, 1), (scope.rpd, 1), (scope.tpm, admission.tokens)):
                if window is not None and admission.ts > window.start(now):
                    window.add(admission.ts, amount)

    # --- reporting -----------------------------------------------------------------------
    # Every figure is read through `_figure`, `_in_flight` and `_held_for`: a shared engine
    # answers them from its store's figures instead of this process's windows.

    async def refresh(self) -> None:
        """This process's windows are always current."""

    # One process is the whole deployment: it acts on everything and its counts are all.

    async def claim(self, name: str) -> bool:
        return True

    def unclaim(self, name: str) -> None:
        pass

    def refused(self, reason: str) -> None:
        pass

    def refusals(self) -> dict[str, int] | None:
        return None

    @property
    def state(self) -> dict[str, object]:
        return {"backend": "memory"}

    async def lifecycle(self, app: Any) -> AsyncIterator[None]:
        """Nothing to open or close: the windows are this process's memory."""
        yield

    def _figure(self, scope: Scope, window: Window, now: float) -> tuple[float, float]:
        """(used, seconds until it is empty) of one of a scope's windows."""
        return window.figure(now)

    def _in_flight(self, scope: Scope) -> int:
        return scope.in_flight

    def _held_for(self, scope: Scope, now: float) -> float:
        return max(0.0, scope.blocked_until - now)

    def _tightest(self, pairs: Iterable[tuple[Scope, Window]], now: float) -> tuple[int, float, float] | None:
        """(limit, used, reset) of the window with the least left among `pairs` (the smaller
        limit if two leave as much; the first if they tie), in one pass."""
        best: tuple[int, float, float] | None = None
        for scope, window in pairs:
            used, reset = self._figure(scope, window, now)
            if best is None or (window.limit - used, window.limit) < (best[0] - best[1], best[0]):
                best = (window.limit, used, reset)
        return best

    def headers(self, scopes: list[Scope]) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for a call in `scopes`: for requests and for tokens,
        the window with the least left, whichever scope (upstream, model, user, key) holds it."""
        now = self.clock()
        figure = self._figure
        # The tightest window for requests [0] and for tokens [1], in one pass as `_tightest`
        # picks it: every limited reply carries these, so no pair lists are built on the way.
        tightest: list[tuple[float, Window, float] | None] = [None, None]   # (left, window, reset)
        for scope in scopes:
            for window, _, weighted in scope.limited:
                used, reset = figure(scope, window, now)
                left = window.limit - used
                best = tightest[weighted]
                if best is None or left < best[0] or (left == best[0] and window.limit < best[1].limit):
                    tightest[weighted] = (left, window, reset)
        out: dict[str, str] = {}
        for best, (limit_name, remaining_name, reset_name) in zip(tightest, HEADER_NAMES):
            if best is not None:
                left, window, reset = best
                out[limit_name] = window.limit_text
                out[remaining_name] = str(int(left)) if left > 0 else "0"
                out[reset_name] = format_duration(reset)
        return out

    def usage(self, upstream: str, model: str, kind: str) -> tuple[int, int | None]:
        """(used, limit) of the tightest `kind` window a call to `model` on `upstream` is in, or
        (used, None) from the upstream's counting-only window where no limit is set. The one
        reading behind /stats' rate_limits strings and the alert rules."""
        if upstream not in self._upstreams:
            return 0, None
        now = self.clock()
        tightest = self._tightest([(s, w) for s in self.scopes(upstream, model, None) for w, k in s.windows()
                                   if k == kind], now)
        if tightest is not None:
            return int(tightest[1]), tightest[0]
        scope = self._upstreams[upstream]
        tracked = {"requests_per_day": scope.rpd, "tokens_per_minute": scope.tpm}.get(kind)
        if tracked is None:
            return 0, None
        return int(self._figure(scope, tracked, now)[0]), None

    def report(self) -> list[dict[str, object]]:
        """Every limited scope with used, limit, percentage and seconds until it resets."""
        now = self.clock()
        rows: list[dict[str, object]] = []
        for scope in self.reported_scopes():
            for window, kind in scope.windows():
                used, reset = self._figure(scope, window, now)
                rows.append(_row(scope.name, kind, used, window.limit, reset))
            if scope.limits.concurrency:
                rows.append(_row(scope.name, "concurrency", self._in_flight(scope), scope.limits.concurrency, 0.0))
            if (held := self._held_for(scope, now)) > 0:
                rows.append(_row(scope.name, "upstream_rate_limit", 1, 1, held))
        return rows

    def reported_scopes(self) -> list[Scope]:
        """The scopes the config names (not each user of `per_user`): what /stats and /metrics show."""
        return [*self._upstreams.values(), *self._models.values(), *self._named_users.values(), *self._keys.values()]
