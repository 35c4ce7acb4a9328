"""Where the answer cache keeps its entries, and how identical misses share one upstream call
(issue 13; a building block, not yet in the config).

`MemoryCache` is bounded in bytes: what an entry holds (its answer and its key) counts, the least
recently used entries leave first, an entry larger than `max_entry_bytes` is never stored, and
an entry past its time to live is gone the moment it is asked for. Entries hold message text
and answers, which the ledger never does: nothing here is logged, and `purge` empties them, one
namespace (a proxy key) or all. The clock is injected, so tests move time by hand.

`Flights` lets identical misses that arrive together make one upstream call: the first caller
leads and the others wait for its entry; if the leader's call cannot be cached (an error, a cut
reply), each follower goes on its own.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Shape = Literal["json", "sse", "ndjson"]

# What an entry costs beyond its answer and key: the object, its fields, the table's slot.
ENTRY_OVERHEAD = 200


@dataclass(frozen=True)
class Entry:
    """One complete, successful answer, as the upstream gave it."""

    key: str
    namespace: str
    body: bytes            # the answer, in `shape`
    shape: Shape
    content_type: str
    prompt_tokens: int     # what a hit saves: the tokens and cost of the live call
    completion_tokens: int
    cost_usd: float
    created: float
    ttl_s: float

    @property
    def size(self) -> int:
        return len(self.body) + len(self.key) + len(self.namespace) + ENTRY_OVERHEAD

    def expired(self, now: float) -> bool:
        return now >= self.created + self.ttl_s

    def age(self, now: float) -> int:
        """Seconds since it was stored, as HTTP's Age header counts them."""
        return max(0, int(now - self.created))


@dataclass
class CacheFigures:
    entries: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    refused_too_large: int = 0


class MemoryCache:
    def __init__(self, max_bytes: int, max_entry_bytes: int, clock: Callable[[], float] = time.time) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self.clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self.figures = CacheFigures()

    def get(self, key: str) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None or entry.expired(self.clock()):
            if entry is not None:
                self._drop(key)
            self.figures.misses += 1
            return None
        self._entries.move_to_end(key)
        self.figures.hits += 1
        return entry

    def put(self, entry: Entry) -> bool:
        """Store it unless it alone is over the bound; the least recently used make room."""
        if entry.size > self.max_entry_bytes:
            self.figures.refused_too_large += 1
            return False
        if entry.key in self._entries:
            self._drop(entry.key)
        while self._entries and self.figures.bytes + entry.size > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.figures.evictions += 1
        self._entries[entry.key] = entry
        self.figures.entries += 1
        self.figures.bytes += entry.size
        return True

    def purge(self, namespace: str | None = None) -> int:
        """Empty the cache, or one namespace of it; returns how many entries went."""
        doomed = [k for k, e in self._entries.items() if namespace is None or e.namespace == namespace]
        for key in doomed:
            self._drop(key)
        return len(doomed)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.figures.entries -= 1
        self.figures.bytes -= entry.size


@dataclass
class Flights:
    """Identical misses in flight, by key: the first leads, the rest wait for its entry."""

    _waiting: dict[str, asyncio.Future[Entry | None]] = field(default_factory=dict)

    def join(self, key: str) -> asyncio.Future[Entry | None] | None:
        """None: this caller leads (it calls upstream, then `land`s); else the leader's future."""
        flight = self._waiting.get(key)
        if flight is not None:
            return flight
        self._waiting[key] = asyncio.get_running_loop().create_future()
        return None

    def land(self, key: str, entry: Entry | None) -> None:
        """The leader is done: its entry (None if its answer could not be cached) for everyone
        who waited. Called whatever happened to the leader, so no follower waits forever."""
        flight = self._waiting.pop(key, None)
        if flight is not None and not flight.done():
            flight.set_result(entry)
