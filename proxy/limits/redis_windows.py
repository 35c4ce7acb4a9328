"""The limiter's windows in Redis: one atomic script per admission, shared by every process.

`admit` runs one Lua script that, on Redis's own clock, checks every window of a call (requests
per minute or day, rolling or since a given midnight; tokens per minute; concurrency leases; an
upstream's own 429 hold) and records the call in all of them only when none refuses, so a
refused call costs nothing and N processes together never admit more than a limit. A refusal
names the window that holds the call back longest and exactly when it lets it through, as the
in-memory windows do; every reply carries each window's figures (used, and when it empties),
which the `x-ratelimit-*` headers, `/stats` and the alerts read.

Every key of a deployment carries one hash tag, so the scripts run on Redis Cluster, and every
key expires once its window is empty. A deployment's windows are trusted only while its *ready*
key exists: a fresh Redis, or one that lost its data (FLUSHALL, a restart without persistence),
answers "not ready" until one process has loaded the last day's admissions from the ledger
(`load`, under a lock) and set it again, so nothing is admitted against windows that forgot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis

Kind = Literal["requests", "tokens", "concurrency", "hold"]

# KEYS[1] is the deployment's ready key; then two KEYS per window (its sorted set, and the
# running sum of a token window: every key a script touches is named, as Redis Cluster
# requires). ARGV: mode ('admit' or 'peek'), call id, tokens, lease seconds, the wait to promise
# for a full concurrency window (ms); then five per window: kind, limit (0: count only), span
# (seconds; 0 for a calendar day), start (a calendar day's midnight) and end (its next midnight).
# Reply: status (1 admitted, 0 refused, 2 peeked, -1 not ready), the refusing window's index,
# its wait in ms (-1: never, the call alone is over the limit), then per window: used, and ms
# until it is empty (or a hold ends).
_WINDOWS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local mode, id, tokens = ARGV[1], ARGV[2], tonumber(ARGV[3])
local lease, busy_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local n = (#KEYS - 1) / 2
local function ends(span, stop, ts) if span > 0 then return ts + span end return stop end
local function amount_of(member) return tonumber(string.match(member, ':(%d+)$')) end
local reply, worst, worst_wait = {0, 0, 0}, 0, 0
for i = 1, n do
  local base = 5 + (i - 1) * 5
  local kind, limit = ARGV[base + 1], tonumber(ARGV[base + 2])
  local span, start, stop = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4]), tonumber(ARGV[base + 5])
  local key, sum = KEYS[2 * i], KEYS[2 * i + 1]
  local used, reset, wait = 0, 0, 0
  if kind == 'hold' then
    local until_ = tonumber(redis.call('GET', key) or '0')
    if until_ > now then used, reset = 1, (until_ - now) * 1000; wait = math.max(1, math.ceil(reset)) end
  elseif kind == 'concurrency' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    used = redis.call('ZCARD', key)
    if mode == 'admit' and limit > 0 and used >= limit then wait = busy_ms end
  else
    -- An entry leaves its window the moment its end is reached, as in the in-memory windows.
    local from = span > 0 and now - span or start
    if kind == 'tokens' then
      -- The window's sum is kept beside it: what leaves is taken off, so no admission reads
      -- every entry.
      local gone = redis.call('ZRANGEBYSCORE', key, '-inf', from)
      local out = 0
      for j = 1, #gone do out = out + amount_of(gone[j]) end
      if out > 0 then redis.call('DECRBY', sum, out) end
    end
    redis.call('ZREMRANGEBYSCORE', key, '-inf', from)
    local count = redis.call('ZCARD', key)
    if count == 0 then redis.call('DEL', sum) end  -- an empty window sums to 0, exactly
    used = kind == 'tokens' and tonumber(redis.call('GET', sum) or '0') or count
    if count > 0 then
      local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
      reset = (ends(span, stop, tonumber(last[2])) - now) * 1000
    end
    if mode == 'admit' and limit > 0 then
      local amount = kind == 'tokens' and tokens or 1
      local excess = used + amount - limit
      if amount > limit then
        wait = -1
      elseif excess > 0 and kind == 'requests' then
        local oldest = redis.call('ZRANGE', key, excess - 1, excess - 1, 'WITHSCORES')
        wait = math.max(1, math.ceil((ends(span, stop, tonumber(oldest[2])) - now) * 1000))
      elseif excess > 0 then
        -- Only a refusal reads entries, oldest first, and only until enough would have left.
        local freed, offset = 0, 0
        while wait == 0 do
          local entries = redis.call('ZRANGE', key, offset, offset + 99, 'WITHSCORES')
          if #entries == 0 then wait = -1 end
          for j = 1, #entries, 2 do
            freed = freed + amount_of(entries[j])
            if freed >= excess then
              wait = math.max(1, math.ceil((ends(span, stop, tonumber(entries[j + 1])) - now) * 1000))
              break
            end
          end
          offset = offset + 100
        end
      end
    end
  end
  reply[#reply + 1] = used
  reply[#reply + 1] = math.ceil(reset)
  -- The refusal that lasts longest is the one to report: waiting less would be refused again.
  if wait ~= 0 and worst_wait ~= -1 and (wait == -1 or wait > worst_wait) then worst, worst_wait = i, wait end
end
if mode ~= 'admit' then reply[1] = 2 return reply end
if worst > 0 then reply[2], reply[3] = worst, worst_wait return reply end
-- No window refused: the call takes its place in every one of them.
for i = 1, n do
  local base = 5 + (i - 1) * 5
  local kind, span, stop = ARGV[base + 1], tonumber(ARGV[base + 3]), tonumber(ARGV[base + 5])
  local key, sum = KEYS[2 * i], KEYS[2 * i + 1]
  if kind == 'concurrency' then
    redis.call('ZADD', key, now + lease, id)
    redis.call('EXPIRE', key, math.ceil(lease) + 1)
    reply[2 + 2 * i] = reply[2 + 2 * i] + 1
  elseif kind ~= 'hold' then
    local expires = math.ceil(ends(span, stop, now)) + 1
    redis.call('ZADD', key, now, kind == 'tokens' and (id .. ':' .. tokens) or id)
    redis.call('EXPIREAT', key, expires)
    if kind == 'tokens' then
      redis.call('INCRBY', sum, tokens)
      redis.call('EXPIREAT', sum, expires)
    end
    reply[2 + 2 * i] = reply[2 + 2 * i] + (kind == 'tokens' and tokens or 1)
    reply[3 + 2 * i] = math.ceil((ends(span, stop, now) - now) * 1000)
  end
end
reply[1] = 1
return reply
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

# KEYS: the concurrency windows of calls still running; ARGV: lease seconds, then each key's
# call id. A lease is (re)written even if it is gone: after a FLUSHALL the calls still running
# take their places back within a third of a lease.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now + lease, ARGV[i + 1])
  redis.call('EXPIRE', KEYS[i], math.ceil(lease) + 1)
end
return 1
"""

# KEYS: two per entry (window, sum); ARGV: five per entry: kind, member, time, tokens, expiry
# (unix seconds). Loaded oldest first, so each key ends with its newest entry's expiry. An
# entry already there is not counted twice.
_LOAD = """
for i = 1, #KEYS / 2 do
  local base = (i - 1) * 5
  local kind, member, ts = ARGV[base + 1], ARGV[base + 2], tonumber(ARGV[base + 3])
  local tokens, expires = tonumber(ARGV[base + 4]), tonumber(ARGV[base + 5])
  local key, sum = KEYS[2 * i - 1], KEYS[2 * i]
  if kind == 'tokens' then member = member .. ':' .. tokens end
  if redis.call('ZADD', key, 'NX', ts, member) == 1 and kind == 'tokens' then
    redis.call('INCRBY', sum, tokens)
    redis.call('EXPIREAT', sum, expires)
  end
  redis.call('EXPIREAT', key, expires)
end
return 1
"""


@dataclass(frozen=True)
class WindowSpec:
    """One window of one scope, as the script reads it."""

    scope: str               # "upstream:gpt4o_cloud"
    kind: Kind
    limit: int               # 0: no limit, the window only counts
    span: float = 0.0        # rolling windows: their length in seconds
    start: float = 0.0       # a calendar day: its midnight (unix time) ...
    end: float = 0.0         # ... and the next one


@dataclass(frozen=True)
class Figure:
    """What one window holds now: used (requests, tokens or places; 1 for a hold in force) and
    milliseconds until it is empty (or the hold ends)."""

    used: int
    reset_ms: int


@dataclass(frozen=True)
class Decision:
    admitted: bool
    ready: bool = True                 # False: the windows must be loaded from the ledger first
    refused_by: WindowSpec | None = None
    retry_after: float | None = None   # seconds; None: never (the call alone is over the limit)
    figures: tuple[Figure, ...] = ()   # per window asked, after the decision


@dataclass(frozen=True)
class Entry:
    """An admission the ledger remembers, to be put back into one window."""

    spec: WindowSpec
    member: str
    ts: float
    tokens: int


class RedisWindows:
    """The windows of every process of a deployment, in one Redis."""

    def __init__(self, client: aioredis.Redis, prefix: str = "tollgate", lease_s: float = 30.0,
                 busy_retry_s: float = 1.0) -> None:
        self.client = client
        self.tag = "{" + prefix + "}"  # one hash slot for every key: the script may touch them all
        self.ready_key = f"{self.tag}:ready"
        self.rebuild_key = f"{self.tag}:rebuilding"
        self.lease_s = lease_s
        self.busy_ms = max(1, round(busy_retry_s * 1000))
        self._windows = client.register_script(_WINDOWS)
        self._finish = client.register_script(_FINISH)
        self._renew = client.register_script(_RENEW)
        self._load = client.register_script(_LOAD)

    def key(self, spec: WindowSpec) -> str:
        return f"{self.tag}:{spec.scope}:{spec.kind}:{spec.span:g}"

    async def _run(self, mode: str, call_id: str, windows: Sequence[WindowSpec], tokens: int) -> list[int]:
        argv: list[str | int | float] = [mode, call_id, tokens, self.lease_s, self.busy_ms]
        for spec in windows:
            argv += [spec.kind, spec.limit, spec.span, spec.start, spec.end]
        keys = [self.ready_key] + [name for w in windows for name in (self.key(w), self.key(w) + ":sum")]
        return [int(x) for x in await self._windows(keys=keys, args=argv)]

    async def admit(self, call_id: str, windows: Sequence[WindowSpec], tokens: int) -> Decision:
        status, index, wait_ms, *rest = await self._run("admit", call_id, windows, tokens)
        if status < 0:
            return Decision(False, ready=False)
        figures = tuple(Figure(rest[i], rest[i + 1]) for i in range(0, len(rest), 2))
        if status == 1:
            return Decision(True, figures=figures)
        return Decision(False, refused_by=windows[index - 1], retry_after=None if wait_ms < 0 else wait_ms / 1000,
                        figures=figures)

    async def peek(self, windows: Sequence[WindowSpec]) -> tuple[Figure, ...] | None:
        """Each window's figures, admitting nothing; None while the windows are not loaded."""
        status, _, _, *rest = await self._run("peek", "", windows, 0)
        if status < 0:
            return None
        return tuple(Figure(rest[i], rest[i + 1]) for i in range(0, len(rest), 2))

    async def finish(self, call_id: str, windows: Sequence[WindowSpec], admitted_tokens: int, used_tokens: int) -> None:
        """The call is over: its token entries hold what it really used, its leases are given back."""
        await self.finish_many([(call_id, windows, admitted_tokens, used_tokens)])

    async def finish_many(self, calls: Sequence[tuple[str, Sequence[WindowSpec], int, int]]) -> None:
        """Several calls' finishes in one round trip (a pipeline of scripts, each atomic)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for call_id, windows, admitted_tokens, used_tokens in calls:
                token_keys = [n for w in windows if w.kind == "tokens" for n in (self.key(w), self.key(w) + ":sum")]
                lease_keys = [self.key(w) for w in windows if w.kind == "concurrency"]
                await self._finish(keys=token_keys + lease_keys,
                                   args=[call_id, admitted_tokens, used_tokens, len(token_keys) // 2], client=pipe)
            await pipe.execute()

    async def renew(self, calls: Sequence[tuple[str, Sequence[WindowSpec]]]) -> None:
        """These calls are still running: their concurrency places are theirs for another lease.
        A process that dies stops renewing, and its places free themselves when the lease ends."""
        pairs = [(self.key(w), call_id) for call_id, windows in calls for w in windows if w.kind == "concurrency"]
        if pairs:
            await self._renew(keys=[k for k, _ in pairs], args=[self.lease_s, *(i for _, i in pairs)])

    async def hold(self, scope: str, until: float) -> None:
        """An upstream's own 429: hold its calls until `until` (unix seconds)."""
        spec = WindowSpec(scope, "hold", 0)
        await self.client.set(self.key(spec), until, exat=int(until) + 1)

    # --- what the deployment does once, and counts together ---------------------------------

    async def claim(self, name: str, ttl_s: float) -> bool:
        """True for the first process to ask, until `unclaim` (or `ttl_s`)."""
        return bool(await self.client.set(f"{self.tag}:claim:{name}", 1, nx=True, ex=max(1, round(ttl_s))))

    async def unclaim(self, name: str) -> None:
        await self.client.delete(f"{self.tag}:claim:{name}")

    async def count(self, amounts: dict[str, int]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for field, amount in amounts.items():
                pipe.hincrby(f"{self.tag}:refused", field, amount)
            await pipe.execute()

    async def counts(self) -> dict[str, int]:
        found = await self.client.hgetall(f"{self.tag}:refused")
        return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in found.items()}

    # --- loading from the ledger --------------------------------------------------------------

    async def claim_rebuild(self, owner: str, ttl_s: float) -> bool:
        """Take the lock that lets one process load the windows; False if another holds it."""
        return bool(await self.client.set(self.rebuild_key, owner, nx=True, px=max(1, round(ttl_s * 1000))))

    async def load(self, entries: Sequence[Entry], chunk: int = 500) -> None:
        """Put admissions back, oldest first, in chunks (each one script: a short block of Redis)."""
        for at in range(0, len(entries), chunk):
            keys: list[str] = []
            argv: list[str | int | float] = []
            for entry in entries[at:at + chunk]:
                spec = entry.spec
                keys += [self.key(spec), self.key(spec) + ":sum"]
                ends = entry.ts + spec.span if spec.span else spec.end
                argv += [spec.kind, entry.member, entry.ts, entry.tokens, int(ends) + 2]
            await self._load(keys=keys, args=argv)

    async def mark_ready(self, owner: str) -> None:
        await self.client.set(self.ready_key, owner)
        await self.client.delete(self.rebuild_key)

    async def is_ready(self) -> bool:
        return bool(await self.client.exists(self.ready_key))
