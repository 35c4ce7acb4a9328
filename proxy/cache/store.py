"""Where the answer cache keeps its entries, and how identical misses share one upstream call.

`CacheStore` is what every engine offers: this process's memory (`MemoryCache`, here), a SQLite
file (`sqlite_store.py`) or Redis (`redis_store.py`); the rest of Tollgate never knows which.

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
from dataclasses import asdict, dataclass, field
from typing import Protocol

import orjson

# What an entry costs beyond its answer and key: the object, its fields, the table's slot. Measured
# (bench/cache.py, tracemalloc): 1,041 bytes an entry for a 645-byte answer and a 64-byte key.
ENTRY_OVERHEAD = 336


@dataclass(frozen=True)
class Entry:
    """One complete, successful answer: the dialect's whole JSON body (`replay.json_body`),
    whatever shape the upstream gave it in; a hit writes it back in the caller's."""

    key: str
    namespace: str
    body: bytes
    prompt_tokens: int     # what a hit saves: the live call's tokens (priced when it is served)
    completion_tokens: int
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

    def pack(self) -> bytes:
        """The entry as one value for a store outside this process: its fields, a newline, its body."""
        head = {k: v for k, v in asdict(self).items() if k != "body"}
        return orjson.dumps(head) + b"\n" + self.body

    @classmethod
    def unpack(cls, data: bytes) -> Entry:
        head, _, body = data.partition(b"\n")
        return cls(body=body, **orjson.loads(head))


class CacheStore(Protocol):
    """An answer store: bounded in bytes, least recently used out first, entries gone after their
    time to live. Every engine counts an entry's size as `Entry.size` does."""

    max_entry_bytes: int

    async def find(self, key: str) -> Entry | None:
        """The live entry under `key` (now the most recently used), or None."""

    async def keep(self, entry: Entry) -> tuple[int, int] | None:
        """Store it, making room: the entries and bytes held then, or None if it alone is larger
        than `max_entry_bytes` (the figures come with the write, not from another round trip)."""

    async def drop(self, namespace: str | None) -> int:
        """Empty one namespace (a proxy key's name; "" for calls without one), or everything."""

    async def size(self) -> tuple[int, int]:
        """Entries and bytes held."""

    async def close(self) -> None: ...


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

    # As a CacheStore: nothing here waits, so each is the method above.

    async def find(self, key: str) -> Entry | None:
        return self.get(key)

    async def keep(self, entry: Entry) -> tuple[int, int] | None:
        return (self.figures.entries, self.figures.bytes) if self.put(entry) else None

    async def drop(self, namespace: str | None) -> int:
        return self.purge(namespace)

    async def size(self) -> tuple[int, int]:
        return self.figures.entries, self.figures.bytes

    async def close(self) -> None:
        self._entries.clear()
        self.figures.entries = self.figures.bytes = 0


@dataclass
class Flights:
    """Identical misses in flight, by key: the first leads, the rest wait for its entry."""

    _waiting: dict[str, asyncio.Future[Entry | None]] = field(default_factory=dict)
    followers: int = 0   # callers waiting for a leader now (for /stats, and tests to await)
    joined: asyncio.Event = field(default_factory=asyncio.Event)   # set as each follower joins

    def join(self, key: str) -> asyncio.Future[Entry | None] | None:
        """None: this caller leads (it calls upstream, then `land`s); else the leader's future."""
        flight = self._waiting.get(key)
        if flight is not None:
            self.followers += 1
            self.joined.set()
            flight.add_done_callback(self._left)
            return flight
        self._waiting[key] = asyncio.get_running_loop().create_future()
        return None

    def _left(self, _: asyncio.Future[Entry | None]) -> None:
        self.followers -= 1

    def land(self, key: str, entry: Entry | None) -> None:
        """The leader is done: its entry (None if its answer could not be cached) for everyone
        who waited. Called whatever happened to the leader, so no follower waits forever."""
        flight = self._waiting.pop(key, None)
        if flight is not None and not flight.done():
            flight.set_result(entry)
