"""The limiter's pure parts: sliding windows, scopes, a refusal and an admitted call's ticket.

Pure logic with an injected clock, no I/O and no awaiting. Each *scope* (an upstream, a model
pattern, a user, a proxy key) has the limits of its config table: requests per minute, requests
per day (rolling 24 h, or a calendar day in a time zone), tokens per minute, and calls in flight.
Windows are sliding logs of admissions, so "never more than the limit in any window of its
length" holds exactly, and a refusal says exactly how long until a place frees: the moment the
oldest entries that stand in the way leave the window.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import count, repeat
from zoneinfo import ZoneInfo

from ..config import Limits

MINUTE, DAY = 60.0, 86_400.0


def _midnight(ts: float, tz: ZoneInfo, days_later: int = 0) -> float:
    """Local midnight in `tz` starting the day of `ts` (or `days_later` days after it)."""
    local = datetime.fromtimestamp(ts, tz).replace(hour=0, minute=0, second=0, microsecond=0)
    return (local + timedelta(days=days_later)).timestamp()


class Window:
    """A sliding log of admissions over `span` seconds, or since local midnight.

    Request windows keep only admission times (each counts 1); token windows keep an amount
    beside each time, which `adjust` can correct once the real usage is known. A limit of 0
    means none: the window only counts, for the figures /stats and alerts show.
    """

    def __init__(self, limit: int, span: float, tz: ZoneInfo | None = None, weighted: bool = False) -> None:
        self.limit = limit
        self.limit_text = str(limit)  # as x-ratelimit-limit-* says it, on every limited reply
        self.span = span
        self.tz = tz  # set: a calendar day in this zone instead of a rolling span
        self.times: deque[float] = deque()
        self.amounts: deque[float] | None = deque() if weighted else None
        self.used = 0.0
        self.popped = 0  # entries dropped so far: turns an entry's sequence number into an index
        # The local day last asked about, [its midnight, the next): working a midnight out in
        # a zone takes 4.5 µs, and a call asks for one up to ten times (admission, headers).
        self._day = (math.inf, -math.inf)

    def _day_of(self, ts: float) -> tuple[float, float]:
        day = self._day
        if not day[0] <= ts < day[1]:
            assert self.tz is not None
            day = self._day = (_midnight(ts, self.tz), _midnight(ts, self.tz, days_later=1))
        return day

    def start(self, now: float) -> float:
        if self.tz is None:
            return now - self.span
        return self._day_of(now)[0]

    def end_of(self, ts: float) -> float:
        """When an entry admitted at `ts` stops counting."""
        if self.tz is None:
            return ts + self.span
        return self._day_of(ts)[1]

    def prune(self, now: float) -> None:
        start = self.start(now)
        times, amounts = self.times, self.amounts
        while times and times[0] <= start:
            times.popleft()
            self.popped += 1
            self.used -= amounts.popleft() if amounts is not None else 1.0
        if not times:
            self.used = 0.0  # no float drift once empty

    def wait_for(self, now: float, amount: float) -> float | None:
        """Seconds until `amount` fits (0: now), None if it never can (larger than the limit)."""
        self.prune(now)
        if amount > self.limit:
            return None
        excess = self.used + amount - self.limit
        if excess <= 0:
            return 0.0
        freed = 0.0
        values = self.amounts if self.amounts is not None else repeat(1.0)
        for ts, value in zip(self.times, values):
            freed += value
            if freed >= excess:
                return max(0.0, self.end_of(ts) - now)
        return None  # unreachable while used >= excess

    def add(self, now: float, amount: float) -> int:
        """Record an admission; returns its sequence number, for `adjust`."""
        # Entries arrive in time order: live admissions read one clock, and the ledger replays
        # admissions sorted by time.
        self.used += amount
        self.times.append(now)
        if self.amounts is not None:
            self.amounts.append(amount)
        return self.popped + len(self.times) - 1

    def adjust(self, seq: int, amount: float) -> None:
        index = seq - self.popped
        if self.amounts is not None and index >= 0:  # still in the log
            self.used += amount - self.amounts[index]
            self.amounts[index] = amount

    def figure(self, now: float) -> tuple[float, float]:
        """(used, seconds until it is empty again: what x-ratelimit-reset-* means), pruned once."""
        self.prune(now)
        times = self.times
        if not times:
            return self.used, 0.0
        reset = self.end_of(times[-1]) - now
        return self.used, reset if reset > 0.0 else 0.0


@dataclass
class Scope:
    name: str              # "upstream:gpt4o_cloud", "model:gpt-4o*", "user:ana"
    limits: Limits
    rpm: Window | None = None
    rpd: Window | None = None
    tpm: Window | None = None
    in_flight: int = 0
    blocked_until: float = 0.0  # the upstream's own 429 holds calls back until then
    tracked: bool = False       # counted for /stats even where no limit is set
    # Worked out once: every admission and every reply's headers walk these.
    limited: tuple[tuple[Window, str, bool], ...] = field(init=False, repr=False)  # (window, kind, tokens?)
    estimates: bool = field(init=False, repr=False)  # a limit that needs the prompt's tokens
    counts: bool = field(init=False, repr=False)     # a limit of its own, or tracked for /stats

    def __post_init__(self) -> None:
        self.limited = tuple((window, kind, kind == "tokens_per_minute")
                             for window, kind in ((self.rpm, "requests_per_minute"), (self.rpd, "requests_per_day"),
                                                  (self.tpm, "tokens_per_minute"))
                             if window is not None and window.limit)
        self.estimates = bool((self.tpm is not None and self.tpm.limit) or self.limits.max_input_tokens)
        self.counts = self.limits.any or self.tracked

    @classmethod
    def build(cls, name: str, limits: Limits, zone: ZoneInfo, tracked: bool = False) -> Scope:
        """`zone` is the stats zone: a calendar day that names no zone of its own is its day."""
        tz = (ZoneInfo(limits.timezone) if limits.timezone else zone) if limits.day == "calendar" else None
        return cls(name, limits,
                   rpm=Window(limits.rpm, MINUTE) if limits.rpm else None,
                   rpd=Window(limits.rpd or 0, DAY, tz) if limits.rpd or tracked else None,
                   tpm=Window(limits.tpm or 0, MINUTE, weighted=True) if limits.tpm or tracked else None,
                   tracked=tracked)

    def windows(self) -> Iterable[tuple[Window, str]]:
        """Its windows that hold a limit, with the limit's name."""
        return [(window, kind) for window, kind, _ in self.limited]

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and not any(w.times for w in (self.rpm, self.rpd, self.tpm) if w)


@dataclass
class Denial:
    """Why a call may not go now, and when it could."""

    scope: str
    limit: str             # requests_per_minute, requests_per_day, tokens_per_minute, concurrency, upstream_rate_limit
    retry_after: float | None  # None: never (the call alone is over the limit)
    maximum: int
    note: str = ""             # a budget's own words (limit "budget")

    @property
    def message(self) -> str:
        if self.limit == "budget":
            return self.note
        what = {"requests_per_minute": f"{self.maximum:,} requests per minute",
                "requests_per_day": f"{self.maximum:,} requests per day",
                "tokens_per_minute": f"{self.maximum:,} tokens per minute",
                "concurrency": f"{self.maximum:,} concurrent requests",
                "upstream_rate_limit": "the upstream's own rate limit"}[self.limit]
        if self.retry_after is None:
            return f"Rate limit of {what} for {self.scope}: this request alone exceeds it."
        return (f"Rate limit of {what} reached for {self.scope}; "
                f"try again in {format_duration(self.retry_after)}.")


# A ticket's key names its admission in the ledger and in Redis, shared by every process: random
# per process, then a counter. One random draw per call (a getrandom system call) cost more
# than the rest of making a ticket.
_PROCESS = secrets.token_hex(6) + "-"
_SERIAL = count(1)


def _renew_process_part() -> None:
    global _PROCESS
    _PROCESS = secrets.token_hex(6) + "-"


os.register_at_fork(after_in_child=_renew_process_part)  # a forked child must not reuse its parent's


class Ticket:
    """An admitted call's places, given back (and its tokens reconciled) by `finish`.

    A plain class with slots: every admission makes one, and as a dataclass (a key from a
    default factory, a list from another, `limits` in __post_init__ through a generator) one
    took 10k instructions, a quarter of admitting and finishing a call."""

    __slots__ = ("scopes", "admitted", "tokens", "key", "token_entries", "done", "limits")

    def __init__(self, scopes: list[Scope], admitted: float, tokens: int, key: str | None = None) -> None:
        self.scopes = scopes
        self.admitted = admitted
        self.tokens = tokens
        self.key = key if key is not None else f"{_PROCESS}{next(_SERIAL):x}"
        self.token_entries: list[tuple[Window, int]] = []
        self.done = False
        # Whether any of its scopes limits (rather than only counts): a counting-only ticket
        # holds no place anyone could wait for, sets no x-ratelimit-* header and writes no
        # admission row.
        self.limits = False
        for scope in scopes:
            if scope.limits.any:
                self.limits = True
                break


def _row(scope: str, limit: str, used: float, maximum: int, reset: float) -> dict[str, object]:
    return {"scope": scope, "limit": limit, "used": int(used), "max": maximum,
            "pct": round(100.0 * used / maximum, 1) if maximum else 0.0, "reset_s": round(reset, 3)}


def _longer(a: Denial, b: Denial) -> bool:
    if a.retry_after is None:
        return b.retry_after is not None
    return b.retry_after is not None and a.retry_after > b.retry_after


def _worse(new: Denial, worst: Denial | None) -> Denial:
    """Of a denial just found and the worst so far, the one that lasts longer (the earlier on a tie)."""
    return new if worst is None or _longer(new, worst) else worst


# OpenAI's x-ratelimit-* headers, for requests, then tokens: the limit, remaining and reset names.
HEADER_NAMES = tuple(tuple(f"x-ratelimit-{part}-{kind}" for part in ("limit", "remaining", "reset"))
                     for kind in ("requests", "tokens"))


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: 20ms, 1s, 6m0s, 1h2m3s."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    return _whole_seconds(math.ceil(seconds))


@functools.lru_cache(maxsize=512)
def _whole_seconds(total: int) -> str:
    """Every limited reply formats one or two resets, and a window's reset moves by a second at
    a time: working one out took as many instructions as the rest of the headers together."""
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
