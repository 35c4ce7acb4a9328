"""The answer cache in Redis (`[cache] backend = "redis"`): one store for every replica.

Each entry is a string key that Redis expires at the end of its time to live. Beside them, in
the same hash-tag slot: a sorted set of keys by last use (the LRU order), a hash of each key's
size and namespace, and the bytes held. Storing, finding and purging are each one Lua script,
so replicas never see half an eviction. An entry Redis expired stays counted until the LRU order
reaches it (it is the least recently used by then, so it goes first): the bound is never
exceeded, at worst held a little early.

A Redis that cannot be reached is a miss, never a failed call: the answer comes from upstream.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis.asyncio as aioredis

from .store import Entry

_FIND = """
local data = redis.call('GET', KEYS[1] .. ARGV[1])
if not data then return false end
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), ARGV[1])
return data
"""

# KEYS: entry prefix, lru, sizes, held bytes, namespaces, use counter. ARGV: key, data, ttl ms,
# size, (unused), max bytes, namespace.
_KEEP = """
local function forget(k)
  local size = redis.call('HGET', KEYS[3], k)
  if size then
    redis.call('DECRBY', KEYS[4], size)
    redis.call('HDEL', KEYS[3], k)
    redis.call('HDEL', KEYS[5], k)
  end
  redis.call('ZREM', KEYS[2], k)
  redis.call('DEL', KEYS[1] .. k)
end
forget(ARGV[1])
local size, max = tonumber(ARGV[4]), tonumber(ARGV[6])
while (tonumber(redis.call('GET', KEYS[4]) or '0') + size > max) do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 then break end
  forget(oldest[1])
end
redis.call('SET', KEYS[1] .. ARGV[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[6]), ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], size)
redis.call('HSET', KEYS[5], ARGV[1], ARGV[7])
return {redis.call('ZCARD', KEYS[2]), redis.call('INCRBY', KEYS[4], size)}
"""

# ARGV: namespace, or "" with ARGV[2] = "all".
_DROP = """
local gone = 0
for _, k in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if ARGV[2] == 'all' or redis.call('HGET', KEYS[5], k) == ARGV[1] then
    local size = redis.call('HGET', KEYS[3], k)
    if size then redis.call('DECRBY', KEYS[4], size) end
    if redis.call('DEL', KEYS[1] .. k) == 1 then gone = gone + 1 end
    redis.call('HDEL', KEYS[3], k)
    redis.call('HDEL', KEYS[5], k)
    redis.call('ZREM', KEYS[2], k)
  end
end
return gone
"""


class RedisCache:
    def __init__(self, url: str, prefix: str, max_bytes: int, max_entry_bytes: int, timeout_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self.clock = clock
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=timeout_s,
                                                        socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._pool = pool
        self._client = aioredis.Redis(connection_pool=pool)
        tag = "{" + prefix + "}"   # every key in one slot, as a Redis Cluster needs for a script
        # The LRU order is a counter's, not a clock's: replicas' clocks need not agree.
        self._keys = [f"{tag}:cache:e:", f"{tag}:cache:lru", f"{tag}:cache:sizes", f"{tag}:cache:bytes",
                      f"{tag}:cache:ns", f"{tag}:cache:seq"]
        self._find = self._client.register_script(_FIND)
        self._keep = self._client.register_script(_KEEP)
        self._drop = self._client.register_script(_DROP)

    async def find(self, key: str) -> Entry | None:
        data = await self._find(keys=[*self._keys[:2], self._keys[5]], args=[key])
        return Entry.unpack(bytes(data)) if data else None

    async def keep(self, entry: Entry) -> tuple[int, int] | None:
        if entry.size > self.max_entry_bytes:
            return None
        ttl_ms = int((entry.created + entry.ttl_s - self.clock()) * 1000)
        if ttl_ms <= 0:
            return None
        entries, held = await self._keep(keys=self._keys, args=[entry.key, entry.pack(), ttl_ms, entry.size, 0,
                                                                self.max_bytes, entry.namespace])
        return int(entries), int(held)

    async def drop(self, namespace: str | None) -> int:
        return int(await self._drop(keys=self._keys, args=[namespace or "", "all" if namespace is None else ""]))

    async def size(self) -> tuple[int, int]:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.zcard(self._keys[1])
            pipe.get(self._keys[3])
            entries, held = await pipe.execute()
        return int(entries), int(held or 0)

    async def close(self) -> None:
        await self._client.aclose()
        await self._pool.disconnect()   # a pool handed to the client is the owner's to close
