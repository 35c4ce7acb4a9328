"""The limiter's windows in Redis: one atomic script per admission, shared by every process.

A building block of the shared limiter (not yet selectable in the config): `admit` runs one Lua
script that, on Redis's own clock, checks every window of a call (requests per minute or day,
rolling or since a given midnight; tokens per minute; concurrency leases; an upstream's own 429
hold) and records the call in all of them only when none refuses, so a refused call costs
nothing and N processes together never admit more than a limit. A refusal says exactly when a
place frees, as the in-memory windows do. Every key of a deployment carries one hash tag, so
the script runs on Redis Cluster; every key expires once its window is empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis

Kind = Literal["requests", "tokens", "concurrency", "hold"]

# Windows, each as two KEYS (its sorted set, and the running sum of a token window: every key a
# script touches is named, as Redis Cluster requires) and five ARGV fields after the three fixed
# ones: kind, limit, span (seconds; for a calendar day, 0), start (a calendar day's midnight,
# else 0), end (its next midnight, else 0).
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local id, tokens, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local function ends(span, stop, ts) if span > 0 then return ts + span end return stop end
for i = 1, #KEYS / 2 do
  local base = 3 + (i - 1) * 5
  local kind, limit = ARGV[base + 1], tonumber(ARGV[base + 2])
  local span, start, stop = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4]), tonumber(ARGV[base + 5])
  local key, sum = KEYS[2 * i - 1], KEYS[2 * i]
  if kind == 'hold' then
    local until_ = tonumber(redis.call('GET', key) or '0')
    if until_ > now then return {0, i, math.ceil((until_ - now) * 1000)} end
  elseif kind == 'concurrency' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if redis.call('ZCARD', key) >= limit then return {0, i, -2} end
  else
    local from = span > 0 and now - span or start
    if kind == 'tokens' then
      -- The window's sum is kept beside it: what leaves is taken off, so no admission reads
      -- every entry.
      local gone = redis.call('ZRANGEBYSCORE', key, '-inf', '(' .. from)
      local out = 0
      for j = 1, #gone do out = out + tonumber(string.match(gone[j], ':(%d+)$')) end
      if out > 0 then redis.call('DECRBY', sum, out) end
    end
    redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. from)
    if kind == 'requests' then
      local used = redis.call('ZCARD', key)
      if 1 > limit then return {0, i, -1} end
      if used + 1 > limit then
        local oldest = redis.call('ZRANGE', key, used - limit, used - limit, 'WITHSCORES')
        return {0, i, math.max(0, math.ceil((ends(span, stop, tonumber(oldest[2])) - now) * 1000))}
      end
    else
      if tokens > limit then return {0, i, -1} end
      local excess = tonumber(redis.call('GET', sum) or '0') + tokens - limit
      if excess > 0 then
        -- Only a refusal reads entries, oldest first, and only until enough would have left.
        local freed, offset = 0, 0
        while true do
          local entries = redis.call('ZRANGE', key, offset, offset + 99, 'WITHSCORES')
          if #entries == 0 then return {0, i, -1} end
          for j = 1, #entries, 2 do
            freed = freed + tonumber(string.match(entries[j], ':(%d+)$'))
            if freed >= excess then
              return {0, i, math.max(0, math.ceil((ends(span, stop, tonumber(entries[j + 1])) - now) * 1000))}
            end
          end
          offset = offset + 100
        end
      end
    end
  end
end
-- No window refused: the call takes its place in every one of them.
for i = 1, #KEYS / 2 do
  local base = 3 + (i - 1) * 5
  local kind, span, stop = ARGV[base + 1], tonumber(ARGV[base + 3]), tonumber(ARGV[base + 5])
  local key, sum = KEYS[2 * i - 1], KEYS[2 * i]
  if kind == 'concurrency' then
    redis.call('ZADD', key, now + lease, id)
    redis.call('EXPIRE', key, math.ceil(lease) + 1)
  elseif kind ~= 'hold' then
    redis.call('ZADD', key, now, kind == 'tokens' and (id .. ':' .. tokens) or id)
    redis.call('EXPIREAT', key, math.ceil(ends(span, stop, now)) + 1)
    if kind == 'tokens' then
      redis.call('INCRBY', sum, tokens)
      redis.call('EXPIREAT', sum, math.ceil(ends(span, stop, now)) + 1)
    end
  end
end
return {1, 0, 0}
"""

# KEYS: the call's token windows and their sums (in pairs), then its concurrency windows;
# ARGV: id, tokens admitted, tokens used, the number of token windows.
_FINISH = """
local id, admitted, used, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
for i = 1, n do
  local key, sum = KEYS[2 * i - 1], KEYS[2 * i]
  local score = redis.call('ZSCORE', key, id .. ':' .. admitted)
  if score then  -- still in its window: it counts what it used, and so does the sum
    redis.call('ZREM', key, id .. ':' .. admitted)
    redis.call('ZADD', key, score, id .. ':' .. used)
    redis.call('INCRBY', sum, tonumber(used) - tonumber(admitted))
  end
end
for i = 2 * n + 1, #KEYS do redis.call('ZREM', KEYS[i], id) end
return 1
"""


# KEYS: the call's concurrency windows; ARGV: id, lease seconds. A lease still held is pushed on.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 1, #KEYS do
  if redis.call('ZSCORE', KEYS[i], ARGV[1]) then
    redis.call('ZADD', KEYS[i], now + tonumber(ARGV[2]), ARGV[1])
    redis.call('EXPIRE', KEYS[i], math.ceil(tonumber(ARGV[2])) + 1)
  end
end
return 1
"""


@dataclass(frozen=True)
class WindowSpec:
    """One window of one scope, as the script reads it."""

    scope: str               # "upstream:gpt4o_cloud"
    kind: Kind
    limit: int
    span: float = 0.0        # rolling windows: their length in seconds
    start: float = 0.0       # a calendar day: its midnight (unix time) ...
    end: float = 0.0         # ... and the next one


@dataclass(frozen=True)
class Decision:
    admitted: bool
    refused_by: WindowSpec | None = None
    retry_after: float | None = None   # seconds; None: never (alone over the limit) or unknown


class RedisWindows:
    """The windows of every process of a deployment, in one Redis."""

    def __init__(self, client: aioredis.Redis, prefix: str = "tollgate", lease_s: float = 30.0) -> None:
        self.client = client
        self.tag = "{" + prefix + "}"  # one hash slot for every key: the script may touch them all
        self.lease_s = lease_s
        self._admit = client.register_script(_ADMIT)
        self._finish = client.register_script(_FINISH)
        self._renew = client.register_script(_RENEW)

    def key(self, spec: WindowSpec) -> str:
        return f"{self.tag}:{spec.scope}:{spec.kind}:{spec.span:g}"

    async def admit(self, call_id: str, windows: list[WindowSpec], tokens: int) -> Decision:
        argv: list[str | int | float] = [call_id, tokens, self.lease_s]
        for spec in windows:
            argv += [spec.kind, spec.limit, spec.span, spec.start, spec.end]
        keys = [name for w in windows for name in (self.key(w), self.key(w) + ":sum")]
        admitted, index, wait_ms = await self._admit(keys=keys, args=argv)
        if admitted:
            return Decision(True)
        spec = windows[int(index) - 1]
        return Decision(False, spec, None if int(wait_ms) < 0 else int(wait_ms) / 1000)

    async def finish(self, call_id: str, windows: list[WindowSpec], admitted_tokens: int, used_tokens: int) -> None:
        """The call is over: its token entries hold what it really used, its leases are given back."""
        token_keys = [name for w in windows if w.kind == "tokens" for name in (self.key(w), self.key(w) + ":sum")]
        lease_keys = [self.key(w) for w in windows if w.kind == "concurrency"]
        await self._finish(keys=token_keys + lease_keys,
                           args=[call_id, admitted_tokens, used_tokens, len(token_keys) // 2])

    async def renew(self, call_id: str, windows: list[WindowSpec]) -> None:
        """The call is still running: its concurrency places are its for another lease. A process
        that dies stops renewing, and its places free themselves when the lease runs out."""
        keys = [self.key(w) for w in windows if w.kind == "concurrency"]
        if keys:
            await self._renew(keys=keys, args=[call_id, self.lease_s])

    async def hold(self, scope: str, until: float) -> None:
        """An upstream's own 429: hold its calls until `until` (Redis time, unix seconds)."""
        spec = WindowSpec(scope, "hold", 0)
        await self.client.set(self.key(spec), until, exat=int(until) + 1)
