"""The answer cache (issue 13): repeated questions answered by Tollgate itself.

`AnswerCache` is what the relay asks: whether a call may be answered from the cache at all
(`decide`: a rule, the request's own directives, a deterministic question), the entry for it
(`find`, exact; `similar`, by meaning), and keeping a complete answer (`keep`). Its parts:
`keys.py` (what makes two requests the same question), `store.py` and the engines beside it
(where entries live, bounded in bytes), `replay.py` (an entry written back in the caller's
shape) and `semantic.py` (questions by meaning). The calls themselves, hits served and
embeddings asked for, are `caching.py`'s, at the top of the package tree.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import CachePolicy, CacheRule, Config
from ..dialects import Dialect
from . import keys, replay
from .store import CacheStore, Entry, Flights, MemoryCache

if TYPE_CHECKING:
    from .semantic import SemanticIndex, Vector

log = logging.getLogger("tollgate.cache")

# Contexts with more questions than this are searched on a worker thread (about 0.3 ms of the
# event loop's time at 768 dimensions, bench/cache.py), the rest on the loop itself.
OFFLOAD_ROWS = 2_000

# The calls whose answers can be replayed (replay.py writes these, and only these, back).
CACHEABLE = frozenset({("openai", "chat"), ("openai", "completion"), ("ollama", "chat"), ("ollama", "generate")})


@dataclass(frozen=True)
class Lookup:
    """A call the cache may answer, or keep the answer of."""

    rule: CacheRule
    key: str
    namespace: str          # the proxy key's name; "" for calls without one
    refresh: bool           # no-cache: ask the upstream anyway, and keep its fresh answer
    max_age: float | None   # max-age: only an entry this young will do
    question: str | None    # semantic rules: the last user message ...
    context: str | None     # ... and the hash of everything else


@dataclass(frozen=True)
class Bypass:
    """A call a rule covers but that neither reads nor feeds the cache, and why."""

    reason: str


def directives(headers: Mapping[str, str]) -> tuple[str | None, float | None]:
    """What the request asks of the cache: "bypass" (no-store, or `X-Tollgate-Cache: off`),
    "refresh" (no-cache, or `X-Tollgate-Cache: refresh`) or None; and a max-age in seconds."""
    asked, max_age = None, None
    ours = headers.get("X-Tollgate-Cache", "").strip().lower()
    if ours in ("off", "bypass"):
        asked = "bypass"
    elif ours == "refresh":
        asked = "refresh"
    for part in headers.get("Cache-Control", "").split(","):
        name, _, value = part.strip().lower().partition("=")
        if name == "no-store":
            asked = "bypass"
        elif name == "no-cache" and asked is None:
            asked = "refresh"
        elif name == "max-age":
            try:
                max_age = max(0.0, float(value.strip('"')))
            except ValueError:
                pass
    return asked, max_age


def store_for(config: Config, clock: Callable[[], float]) -> CacheStore:
    """The engine `[cache] backend` names."""
    policy = config.cache
    if policy.backend == "sqlite":
        from .sqlite_store import SqliteCache
        return SqliteCache(config.server.data_dir / "cache.sqlite3", policy.max_bytes, policy.max_entry_bytes, clock)
    if policy.backend == "redis":
        from .redis_store import RedisCache
        url = config.redis.url()
        if url is None:
            raise RuntimeError(f"cache.backend = 'redis' but ${config.redis.url_env} is unset")
        return RedisCache(url, config.redis.prefix, policy.max_bytes, policy.max_entry_bytes,
                          config.redis.timeout_ms / 1000, clock)
    return MemoryCache(policy.max_bytes, policy.max_entry_bytes, clock)


class AnswerCache:
    def __init__(self, policy: CachePolicy, store: CacheStore, clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.store = store
        self.clock = clock
        self.flights = Flights()
        self.index: SemanticIndex | None = None
        if any(r.semantic for r in policy.rules):
            # numpy is loaded only for semantic rules: exact caching needs none of it.
            from .semantic import SemanticIndex
            self.index = SemanticIndex(policy.semantic.max_entries)
        self.failures = 0   # store operations that failed (each a miss, never a failed call)
        # Since this process started: how the calls a rule covered went, and what the store held
        # when last asked (after each answer kept, each purge, and at start).
        self.lookups = {"hit": 0, "miss": 0, "bypass": 0}
        self.held = (0, 0)

    def figures(self) -> dict[str, object]:
        """This process's part of /stats' `cache`."""
        # A bypass was never a candidate: the hit rate is of the lookups, hits and misses.
        looked = self.lookups["hit"] + self.lookups["miss"]
        return {"enabled": self.enabled, "backend": self.policy.backend,
                "since_start": {**self.lookups, "hit_rate": round(self.lookups["hit"] / looked, 4) if looked else None},
                "entries": self.held[0], "bytes": self.held[1],
                "semantic_questions": len(self.index) if self.index is not None else None,
                "store_failures": self.failures}

    @property
    def enabled(self) -> bool:
        return bool(self.policy.rules)

    def rule_for(self, upstream: str, type_: str, key_id: str | None) -> CacheRule | None:
        for rule in self.policy.rules:
            if ((not rule.upstreams or upstream in rule.upstreams) and (not rule.types or type_ in rule.types)
                    and (not rule.keys or key_id in rule.keys)):
                return rule
        return None

    def decide(self, dialect: Dialect, endpoint: str, upstream: str, model: str, type_: str, key_id: str | None,
               body: dict[str, Any], headers: Mapping[str, str]) -> Lookup | Bypass | None:
        """None when no rule covers the call; else how the cache takes part in it."""
        if (dialect, endpoint) not in CACHEABLE:
            return None
        rule = self.rule_for(upstream, type_, key_id)
        if rule is None:
            return None
        asked, max_age = directives(headers)
        if asked == "bypass":
            return Bypass("the request asked not to use the cache")
        if not rule.sampled:
            fixed, why = keys.deterministic(dialect, body)
            if not fixed:
                return Bypass(why)
        namespace = key_id or ""
        question, context = None, None
        if rule.semantic:
            split = keys.question(dialect, endpoint, body)
            if split is not None:
                question = split[0]
                context = keys.key(dialect, namespace, upstream, model, endpoint, split[1])
        return Lookup(rule, keys.key(dialect, namespace, upstream, model, endpoint, body), namespace,
                      asked == "refresh", max_age, question, context)

    async def find(self, lookup: Lookup, key: str | None = None) -> Entry | None:
        """The live entry under the lookup's key (or `key`), young enough for its max-age."""
        try:
            entry = await self.store.find(key or lookup.key)
        except Exception as exc:  # noqa: BLE001 (a store that fails is a miss; the call goes on)
            self._failed("read", exc)
            return None
        if entry is None or entry.namespace != lookup.namespace:
            return None
        if lookup.max_age is not None and entry.age(self.clock()) > lookup.max_age:
            return None
        return entry

    async def similar(self, lookup: Lookup, vector: Vector) -> Entry | None:
        """The entry of the closest earlier question of the same context, if close enough."""
        if self.index is None or lookup.context is None:
            return None
        index, context, threshold = self.index, lookup.context, lookup.rule.similarity
        if index.rows(context) < OFFLOAD_ROWS:
            near = index.nearest(context, vector, threshold)
        else:
            near = await asyncio.to_thread(index.nearest, context, vector, threshold)
            # Rows may have moved while the thread read them: the winner must still be that close.
            score = index.score(context, near[0], vector) if near is not None else None
            if score is None or score < threshold:
                return None
        if near is None:
            return None
        entry = await self.find(lookup, near[0])
        if entry is None:
            self.index.remove(near[0])   # the store let it go
        return entry

    async def keep(self, lookup: Lookup, dialect: Dialect, endpoint: str, answer_bytes: bytes, streamed: bool,
                   vector: Vector | None) -> Entry | None:
        """Keep a live answer if it is complete and replayable; the entry kept, or None. `held`
        is then what the store holds, as its write said."""
        answer = replay.read(dialect, endpoint, answer_bytes, streamed)
        if answer is None:
            return None
        body = replay.json_body(answer)
        entry = Entry(lookup.key, lookup.namespace, body, answer.prompt_tokens, answer.completion_tokens,
                      self.clock(), lookup.rule.ttl_s)
        try:
            held = await self.store.keep(entry)
        except Exception as exc:  # noqa: BLE001 (the answer went out; only the cache missed it)
            self._failed("write", exc)
            return None
        if held is None:
            return None
        self.held = held
        if self.index is not None and lookup.context is not None and vector is not None:
            self.index.add(lookup.context, lookup.key, vector)
        return entry

    async def purge(self, namespace: str | None) -> int:
        gone = await self.store.drop(namespace)
        if self.index is not None:
            if namespace is None:
                self.index.clear()
            # A namespace's questions leave the index as their entries are found missing.
        return gone

    def _failed(self, what: str, exc: Exception) -> None:
        self.failures += 1
        if self.failures == 1 or self.failures % 1000 == 0:
            log.warning("cache: could not %s an entry (%s); calls go to the upstream (%d failures so far)",
                        what, type(exc).__name__, self.failures)
