"""The limiter's windows shared by every process of a deployment, in Redis.

`SharedLimiter` is the in-memory `Limiter` (which scopes a call is in, its caps, and this
process's own windows) with admission moved to Redis: one atomic script per call
(`redis_windows`) checks and records every window on Redis's clock, so the free tier's
10 requests a minute are 10 across all replicas. Each reply carries the windows' figures, kept
here for the `x-ratelimit-*` headers; `/stats`, `/metrics` and the alerts read figures that
`refresh` brings up to date (every `redis.refresh_s`, and before each `/stats` or scrape).

When Redis cannot be reached within `redis.timeout_ms`, `redis.unavailable` decides: "closed"
answers 503 (LimitsUnavailable), "local" admits against this process's own windows, which
record every call either way. Redis is tried again `redis.retry_s` later; its client
reconnects by itself. A Redis that has forgotten the windows (fresh, flushed, restarted without
persistence) is loaded from the ledger by one process, under a lock, while every process's
calls wait for it: nothing is admitted against empty windows.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..config import Config
from ..errors import LimitsUnavailable
from ..ledger import Admission, LedgerError
from ..tasks import running
from .memory import Limiter
from .redis_windows import Decision, Entry, Figure, Kind, RedisWindows, WindowSpec
from .windows import DAY, MINUTE, Denial, Scope, Ticket, Window, _midnight

log = logging.getLogger("tollgate")

# Figures kept for the headers of calls in per-user scopes: bounded, the oldest go first.
MAX_FIGURES = 4096
# Most finishes one round trip carries.
FINISH_BATCH = 256
# A claim (an alert's crossing, sent by one process) is let go when the rule re-arms; a day at
# most, should no process ever see it re-arm.
CLAIM_TTL_S = 86_400.0

_FAILURES = (RedisError, OSError, TimeoutError)
T = TypeVar("T")


class _NotReady(Exception):
    """Redis has forgotten the windows, and they could not be loaded in time."""


class SharedLimiter(Limiter):
    """The windows of every process of a deployment, in one Redis."""

    def __init__(self, config: Config, clock: Callable[[], float],
                 admissions: Callable[[float], Awaitable[list[Admission]]] | None) -> None:
        super().__init__(config, clock)
        self.shared = config.redis
        self._admissions = admissions
        self._windows: RedisWindows | None = None
        self._client: aioredis.Redis | None = None
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._down_until = 0.0          # monotonic: Redis is not tried again before this
        self._reachable = True
        self.failures = 0               # admissions that could not reach Redis
        self._figures: OrderedDict[str, tuple[int, float]] = OrderedDict()  # key: (used, empty at)
        self._live: dict[str, list[WindowSpec]] = {}  # calls admitted in Redis and not yet finished
        self._tasks: set[asyncio.Task[None]] = set()
        self._rebuilding: asyncio.Task[None] | None = None
        self._finishing: list[tuple[str, list[WindowSpec], int, int]] = []  # finishes not yet sent
        self._sending_finishes = False
        self._finishes_sent = asyncio.Event()   # set whenever no finish waits to be sent
        self._finishes_sent.set()
        self.released: list[Callable[[], None]] = []  # told when a shared place is given back
        self._refusals: dict[str, int] = {}     # the deployment's, as Redis last said
        self._unsent: dict[str, int] = {}       # this process's, not yet added there

    # --- the windows as Redis sees them ----------------------------------------------------

    def _spec(self, scope: Scope, window: Window, now: float) -> WindowSpec:
        kind: Kind = "tokens" if window.amounts is not None else "requests"
        if window.tz is None:
            return WindowSpec(scope.name, kind, window.limit, span=window.span)
        return WindowSpec(scope.name, kind, window.limit, start=_midnight(now, window.tz),
                          end=_midnight(now, window.tz, days_later=1))

    def _specs(self, scopes: list[Scope], now: float) -> list[WindowSpec]:
        specs = []
        for scope in scopes:
            if scope.name.startswith("upstream:"):
                specs.append(WindowSpec(scope.name, "hold", 0))
            specs += [self._spec(scope, w, now) for w in (scope.rpm, scope.rpd, scope.tpm) if w is not None]
            if scope.limits.concurrency:
                specs.append(WindowSpec(scope.name, "concurrency", scope.limits.concurrency))
        return specs

    def _remember(self, specs: list[WindowSpec], figures: tuple[Figure, ...]) -> None:
        assert self._windows is not None
        now = self.clock()
        for spec, figure in zip(specs, figures):
            key = self._windows.key(spec)
            self._figures.pop(key, None)
            self._figures[key] = (figure.used, now + figure.reset_ms / 1000)
            if spec.kind == "hold" and figure.used:
                scope = self._upstreams.get(spec.scope.removeprefix("upstream:"))
                if scope is not None:  # other replicas' holds: this one's calls wait too
                    scope.blocked_until = max(scope.blocked_until, now + figure.reset_ms / 1000)
        while len(self._figures) > MAX_FIGURES:
            self._figures.popitem(last=False)

    def _shared(self, spec: WindowSpec) -> tuple[int, float] | None:
        """(used, seconds until empty) as Redis last said, where it said and is trusted now."""
        if self._windows is None or not self._reachable:
            return None
        found = self._figures.get(self._windows.key(spec))
        if found is None:
            return None
        used, empty_at = found
        reset = max(0.0, empty_at - self.clock())
        return (used if reset > 0 or spec.kind == "concurrency" else 0), reset

    # The readers of Limiter (headers, usage, report) read Redis's figures through these.

    def _figure(self, scope: Scope, window: Window, now: float) -> tuple[float, float]:
        found = self._shared(self._spec(scope, window, now))
        return found if found is not None else super()._figure(scope, window, now)

    def _in_flight(self, scope: Scope) -> int:
        found = self._shared(WindowSpec(scope.name, "concurrency", scope.limits.concurrency or 0))
        return found[0] if found is not None else scope.in_flight

    def _held_for(self, scope: Scope, now: float) -> float:
        found = self._shared(WindowSpec(scope.name, "hold", 0))
        return max(found[1], super()._held_for(scope, now)) if found is not None else super()._held_for(scope, now)

    # --- admission ----------------------------------------------------------------------

    async def admit(self, scopes: list[Scope], tokens: int) -> Ticket | Denial:
        if self._windows is None or time.monotonic() < self._down_until:
            return self._without_redis(scopes, tokens)
        now = self.clock()
        specs = self._specs(scopes, now)
        key = secrets.token_hex(8)
        try:
            decision = await self._admit_shared(key, specs, tokens)
            if not decision.ready:
                await self._await_rebuild()
                decision = await self._admit_shared(key, specs, tokens)
                if not decision.ready:
                    raise _NotReady()
        except (*_FAILURES, _NotReady) as exc:
            self._failed(exc)
            return self._without_redis(scopes, tokens)
        self._recovered()
        self._remember(specs, decision.figures)
        if not decision.admitted:
            spec = decision.refused_by
            assert spec is not None
            return Denial(spec.scope, _limit_name(spec), decision.retry_after, spec.limit)
        # This process's own windows count it too: they are what "local" enforces if Redis goes.
        ticket = self.record(scopes, tokens, self.clock(), key)
        self._live[key] = specs
        return ticket

    async def _admit_shared(self, key: str, specs: list[WindowSpec], tokens: int) -> Decision:
        assert self._windows is not None
        task = asyncio.ensure_future(self._windows.admit(key, specs, tokens))
        try:
            return await self._redis(task)
        except BaseException:
            # The caller left (or gave up waiting): should Redis admit the call all the same, its
            # places go straight back.
            task.add_done_callback(lambda done: self._abandoned(done, key, specs, tokens))
            raise

    def _abandoned(self, task: asyncio.Future[Decision], key: str, specs: list[WindowSpec], tokens: int) -> None:
        if not task.cancelled() and task.exception() is None and task.result().admitted:
            self._finish_later(key, specs, tokens, tokens)

    async def _redis(self, coroutine: Awaitable[T], timeout: float | None = None) -> T:
        """A Redis command under its timeout, shielded: a cancelled caller (a client that hung up,
        the app stopping) leaves at once, whatever the command does. redis-py has been seen to
        absorb a cancellation that lands inside its own timeouts (redis-py issues 2028, 2551;
        53 of 300 tasks cancelled mid-command here never ended), and a task that never ends
        holds the server's shutdown for its whole drain time."""
        task = asyncio.ensure_future(coroutine)
        task.add_done_callback(_retrieve)
        async with asyncio.timeout(self.shared.timeout_ms / 1000 if timeout is None else timeout):
            return await asyncio.shield(task)

    def _without_redis(self, scopes: list[Scope], tokens: int) -> Ticket | Denial:
        if self.shared.unavailable == "local":
            return self.admit_now(scopes, tokens)
        raise LimitsUnavailable(
            "Tollgate cannot reach its shared limits store (Redis), so it is not forwarding calls that limits "
            "apply to (redis.unavailable = \"closed\"); try again in a few seconds.",
            {"Retry-After": str(max(1, math.ceil(self.shared.retry_s)))})

    def _failed(self, exc: BaseException) -> None:
        """One call could not use Redis. Only an unreachable Redis (not one slow reply, which
        may be this process's own queue for a connection) makes the next calls skip it for
        `retry_s`."""
        self.failures += 1
        if isinstance(exc, TimeoutError):
            return
        self._down_until = time.monotonic() + self.shared.retry_s
        if self._reachable:
            self._reachable = False
            what = "refusing calls that limits apply to" if self.shared.unavailable == "closed" \
                else "each process holds the limits alone"
            log.warning("the shared limits store (Redis) cannot be reached (%s); %s until it is back",
                        type(exc).__name__, what)

    def _recovered(self) -> None:
        if not self._reachable:
            self._reachable = True
            log.warning("the shared limits store (Redis) is reachable again")

    def finish(self, ticket: Ticket, tokens: int) -> None:
        if ticket.done:
            return
        super().finish(ticket, tokens)
        specs = self._live.pop(ticket.key, None)
        if specs is not None and any(s.kind in ("tokens", "concurrency") for s in specs):
            self._finish_later(ticket.key, specs, ticket.tokens, tokens)

    def _finish_later(self, key: str, specs: list[WindowSpec], admitted: int, used: int) -> None:
        """Queue the call's finish; one task sends what has queued meanwhile in one round trip,
        so under load many calls share each (a round trip per call cost a fifth of the
        throughput, bench/workers.py)."""
        self._finishing.append((key, specs, admitted, used))
        self._finishes_sent.clear()
        if not self._sending_finishes:
            self._sending_finishes = True
            self._spawn(self._send_finishes())

    async def _send_finishes(self) -> None:
        assert self._windows is not None
        try:
            while self._finishing:
                batch, self._finishing = self._finishing[:FINISH_BATCH], self._finishing[FINISH_BATCH:]
                try:
                    await self._redis(self._windows.finish_many(batch), max(1.0, self.shared.timeout_ms / 1000))
                except _FAILURES as exc:
                    # Their leases run out by themselves; their tokens stay counted as estimated.
                    self._failed(exc)
                    continue
                for listener in self.released:
                    listener()
        finally:
            self._sending_finishes = False
            if not self._finishes_sent.is_set() and not self._finishing:
                self._finishes_sent.set()

    def upstream_refused(self, upstream: str, retry_after: float | None) -> None:
        super().upstream_refused(upstream, retry_after)
        if retry_after is not None and retry_after > 0 and self._windows is not None:
            self._spawn(self._hold(f"upstream:{upstream}", self.clock() + retry_after))

    async def _hold(self, scope: str, until: float) -> None:
        assert self._windows is not None
        try:
            await self._redis(self._windows.hold(scope, until))
        except _FAILURES as exc:
            self._failed(exc)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- loading a Redis that has forgotten ----------------------------------------------

    async def _await_rebuild(self) -> None:
        if self._rebuilding is None or self._rebuilding.done():
            self._rebuilding = asyncio.get_running_loop().create_task(self._rebuild())
        try:
            async with asyncio.timeout(self.shared.rebuild_wait_s):
                await asyncio.shield(self._rebuilding)
        except TimeoutError:
            raise _NotReady() from None

    async def _rebuild(self) -> None:
        """One process takes the lock and loads the last day's admissions; the others wait
        until the ready key is back (bounded by the callers' `rebuild_wait_s`)."""
        windows = self._windows
        assert windows is not None
        lock_s = max(30.0, 3 * self.shared.rebuild_wait_s)
        while not await windows.is_ready():
            if await windows.claim_rebuild(self._owner, lock_s):
                try:
                    admissions = await self._admissions(self.clock() - DAY) if self._admissions else []
                    entries = self._entries(admissions, self.clock())
                    await windows.load(entries)
                except LedgerError as exc:
                    # Nothing is admitted against windows that could not be loaded; the lock goes
                    # back so the next call (here or elsewhere) tries again.
                    log.error("the shared limits store (Redis) had no windows and the ledger could not be "
                              "read to load them (%s)", exc)
                    await windows.client.delete(windows.rebuild_key)
                    raise _NotReady() from None
                await windows.mark_ready(self._owner)
                log.warning("the shared limits store (Redis) had no windows: loaded %d admissions of the "
                            "last day from the ledger", len(admissions))
                return
            await asyncio.sleep(0.05)  # another process is loading them

    def _entries(self, admissions: list[Admission], now: float) -> list[Entry]:
        entries = []
        for adm in admissions:
            if adm.upstream not in self._upstreams:
                continue
            for scope in self.scopes(adm.upstream, adm.model, adm.user, adm.key_id):
                for window in (scope.rpm, scope.rpd, scope.tpm):
                    if window is None or adm.ts <= window.start(now):
                        continue  # it has left this window already
                    spec = self._spec(scope, window, adm.ts)
                    entries.append(Entry(spec, adm.key, adm.ts, adm.tokens))
        return entries

    # --- what the deployment does once, and counts together ------------------------------

    async def claim(self, name: str) -> bool:
        """Once for the deployment; if Redis cannot say, this process acts (an alert sent twice
        beats an alert lost)."""
        if self._windows is None:
            return True
        try:  # no call waits on an alert: Redis gets the time it needs, not an admission's
            return await self._redis(self._windows.claim(name, CLAIM_TTL_S), max(5.0, self.shared.timeout_ms / 1000))
        except _FAILURES as exc:
            self._failed(exc)
            return True

    def unclaim(self, name: str) -> None:
        if self._windows is not None:
            self._spawn(self._quietly(self._windows.unclaim(name)))

    def refused(self, reason: str) -> None:
        # Counted here until Redis has it: a refusal while Redis is down is sent once it is back.
        self._unsent[reason] = self._unsent.get(reason, 0) + 1
        if self._windows is not None and time.monotonic() >= self._down_until:
            self._spawn(self._send_refusals())

    async def _send_refusals(self) -> None:
        assert self._windows is not None
        sending, self._unsent = self._unsent, {}
        if not sending:
            return
        try:
            await self._redis(self._windows.count(sending), max(1.0, self.shared.timeout_ms / 1000))
        except _FAILURES as exc:
            self._failed(exc)
            for reason, n in sending.items():
                self._unsent[reason] = self._unsent.get(reason, 0) + n
            return
        for reason, n in sending.items():  # shown at once, before the next refresh reads them
            self._refusals[reason] = self._refusals.get(reason, 0) + n

    def refusals(self) -> dict[str, int] | None:
        counts = dict(self._refusals)
        for reason, n in self._unsent.items():
            counts[reason] = counts.get(reason, 0) + n
        return counts

    async def _quietly(self, coroutine: Awaitable[None]) -> None:
        try:
            await self._redis(coroutine, max(1.0, self.shared.timeout_ms / 1000))
        except _FAILURES as exc:
            self._failed(exc)

    # --- keeping the figures and leases current --------------------------------------------

    async def refresh(self) -> None:
        if self._windows is None or time.monotonic() < self._down_until:
            return
        now = self.clock()
        specs = self._specs(self.reported_scopes(), now)
        await self._send_refusals()
        try:  # the calls this process has finished count what they really used in the figures read
            async with asyncio.timeout(max(1.0, self.shared.timeout_ms / 1000)):
                await self._finishes_sent.wait()
        except TimeoutError:
            pass
        try:
            figures = await self._redis(self._windows.peek(specs))
            refusals = await self._redis(self._windows.counts())
        except _FAILURES as exc:
            self._failed(exc)
            return
        self._recovered()
        self._refusals = refusals
        if figures is not None:
            self._remember(specs, figures)

    async def _maintain(self) -> None:
        """Renew the leases of calls still running; refresh the figures between calls."""
        assert self._windows is not None
        tick = min(self.shared.refresh_s, self.shared.lease_s / 3)
        while True:
            await asyncio.sleep(tick)
            calls = [(key, specs) for key, specs in self._live.items()]
            if calls and time.monotonic() >= self._down_until:
                try:
                    await self._redis(self._windows.renew(calls))
                except _FAILURES as exc:
                    self._failed(exc)
            await self.refresh()

    @property
    def state(self) -> dict[str, object]:
        mode = "shared" if self._reachable else ("local" if self.shared.unavailable == "local" else "refusing")
        return {"backend": "redis", "reachable": self._reachable, "mode": mode,
                "unreachable_admissions": self.failures}

    async def lifecycle(self, app: Any) -> AsyncIterator[None]:
        url = self.shared.url()
        if url is None:
            raise RuntimeError(f"limits.backend = 'redis' but ${self.shared.url_env} is unset")
        timeout = self.shared.timeout_ms / 1000
        # A bounded pool: past 128 commands in flight, callers queue for a connection.
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=128, timeout=max(timeout, 1.0),
                                                        socket_timeout=max(timeout, 1.0),
                                                        socket_connect_timeout=max(timeout, 1.0))
        self._client = aioredis.Redis(connection_pool=pool)
        self._windows = RedisWindows(self._client, self.shared.prefix, self.shared.lease_s,
                                     self.config.limits.concurrency_retry_s)
        try:  # a fresh Redis is loaded now, so the first call does not wait for it
            await self._await_rebuild()
        except (*_FAILURES, _NotReady) as exc:
            self._failed(exc)
        async with running(self._maintain()):
            yield
        if self._tasks:  # finishes and holds still on their way
            await asyncio.wait(self._tasks, timeout=max(1.0, timeout))
        if self._rebuilding is not None and not self._rebuilding.done():
            self._rebuilding.cancel()
        await self._client.aclose()
        await pool.disconnect()


def probe(config: Config) -> tuple[bool, str]:
    import redis

    client = redis.Redis.from_url(config.redis.url() or "", socket_connect_timeout=5, socket_timeout=5)
    try:
        return True, f"reachable (Redis {client.info('server')['redis_version']})"
    except (RedisError, OSError) as exc:
        return False, type(exc).__name__
    finally:
        client.close()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """A shielded command whose caller left: its failure is nobody's to hear."""
    if not task.cancelled():
        task.exception()


def _limit_name(spec: WindowSpec) -> str:
    if spec.kind == "requests":
        return "requests_per_minute" if spec.span == MINUTE else "requests_per_day"
    return {"tokens": "tokens_per_minute", "concurrency": "concurrency", "hold": "upstream_rate_limit"}[spec.kind]
