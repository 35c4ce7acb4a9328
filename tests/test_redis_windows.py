"""The shared windows' admission script against a real redis-server: exact across processes, a
refused call costs nothing, waits are exact."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from proxy.limits.redis_windows import Entry, RedisWindows, WindowSpec

RPM = WindowSpec("upstream:cloud", "requests", 10, span=60)


@pytest.fixture
async def windows(redis_server: str) -> AsyncIterator[RedisWindows]:
    client = aioredis.Redis.from_url(redis_server)
    windows = RedisWindows(client, prefix=f"t{uuid.uuid4().hex}")  # a deployment of its own per test
    await windows.mark_ready("test")
    yield windows
    await client.aclose()


CHILD = """
import asyncio, sys
import redis.asyncio as aioredis
from proxy.limits.redis_windows import Entry, RedisWindows, WindowSpec

async def main():
    client = aioredis.Redis.from_url(sys.argv[1], max_connections=100)
    windows = RedisWindows(client, prefix=sys.argv[2])
    await windows.mark_ready(sys.argv[3])
    spec = WindowSpec("upstream:cloud", "requests", 10, span=60)
    go = asyncio.Event()
    async def one(i):
        await go.wait()
        return (await windows.admit(f"{sys.argv[3]}-{i}", [spec], 1)).admitted
    calls = [asyncio.create_task(one(i)) for i in range(100)]
    print("ready", flush=True)
    sys.stdin.readline()          # every process starts its 100 calls at once
    go.set()
    print(sum(await asyncio.gather(*calls)), flush=True)
    await client.aclose()

asyncio.run(main())
"""


async def test_four_processes_of_a_hundred_callers_admit_exactly_the_limit(redis_server: str) -> None:
    prefix = f"t{uuid.uuid4().hex}"
    children = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, redis_server, prefix, str(n),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE) for n in range(4)]
    for child in children:
        assert child.stdout is not None
        assert await asyncio.wait_for(child.stdout.readline(), 60) == b"ready\n"
    for child in children:
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        await child.stdin.drain()
    admitted = [int((await asyncio.wait_for(child.communicate(), 60))[0]) for child in children]
    assert sum(admitted) == 10, admitted


async def test_a_refused_call_costs_nothing_and_says_when_to_come_back(windows: RedisWindows) -> None:
    wide = WindowSpec("upstream:cloud", "requests", 100, span=60)
    narrow = WindowSpec("user:ana", "requests", 1, span=60)
    assert (await windows.admit("a", [wide, narrow], 1)).admitted
    refused = await windows.admit("b", [wide, narrow], 1)
    assert not refused.admitted and refused.refused_by == narrow
    assert refused.retry_after is not None and 59.0 < refused.retry_after <= 60.0
    # The refused call took no place in the wide window: 99 more fit there, not 98.
    for n in range(99):
        assert (await windows.admit(f"w{n}", [wide], 1)).admitted
    assert not (await windows.admit("x", [wide], 1)).admitted


async def test_tokens_per_minute_count_what_the_call_really_used(windows: RedisWindows) -> None:
    tpm = WindowSpec("upstream:cloud", "tokens", 1000, span=60)
    never = await windows.admit("big", [tpm], 1001)
    assert not never.admitted and never.retry_after is None      # alone over the limit
    assert (await windows.admit("a", [tpm], 800)).admitted
    assert not (await windows.admit("b", [tpm], 300)).admitted
    await windows.finish("a", [tpm], 800, 500)                   # it used less than estimated
    assert (await windows.admit("b", [tpm], 300)).admitted
    late = await windows.admit("c", [tpm], 300)
    assert not late.admitted and late.retry_after is not None and 59.0 < late.retry_after <= 60.0


async def test_concurrency_places_come_back_when_calls_finish(windows: RedisWindows) -> None:
    places = WindowSpec("upstream:cloud", "concurrency", 2)
    assert (await windows.admit("a", [places], 0)).admitted
    assert (await windows.admit("b", [places], 0)).admitted
    full = await windows.admit("c", [places], 0)
    assert not full.admitted and full.retry_after == 1.0        # no exact time: a call must end
    await windows.finish("a", [places], 0, 0)
    assert (await windows.admit("c", [places], 0)).admitted


async def test_a_calendar_day_ends_at_its_midnight(windows: RedisWindows) -> None:
    now = float((await windows.client.time())[0])
    day = WindowSpec("model:gpt-4o", "requests", 1, start=now - 3600, end=now + 7200)
    assert (await windows.admit("a", [day], 1)).admitted
    refused = await windows.admit("b", [day], 1)
    assert refused.retry_after is not None and 7198 < refused.retry_after <= 7200


async def test_an_upstream_429_holds_its_calls(windows: RedisWindows) -> None:
    now = float((await windows.client.time())[0])
    await windows.hold("upstream:cloud", now + 20)
    held = await windows.admit("a", [WindowSpec("upstream:cloud", "hold", 0), RPM], 1)
    assert not held.admitted and held.retry_after is not None and 18 < held.retry_after <= 20
    assert (await windows.admit("b", [RPM], 1)).admitted          # the hold cost the window nothing


LEASED = """
import asyncio, sys
import redis.asyncio as aioredis
from proxy.limits.redis_windows import Entry, RedisWindows, WindowSpec

async def main():
    client = aioredis.Redis.from_url(sys.argv[1])
    windows = RedisWindows(client, prefix=sys.argv[2], lease_s=float(sys.argv[3]))
    await windows.mark_ready("child")
    assert (await windows.admit("dying", [WindowSpec("upstream:cloud", "concurrency", 1)], 0)).admitted
    print("admitted", flush=True)
    await asyncio.Event().wait()  # a call that runs until the process is killed

asyncio.run(main())
"""


async def test_a_killed_process_places_free_when_its_lease_ends(redis_server: str) -> None:
    places = WindowSpec("upstream:cloud", "concurrency", 1)
    client = aioredis.Redis.from_url(redis_server)
    for lease, frees in ((30.0, False), (0.2, True)):
        windows = RedisWindows(client, prefix=f"t{uuid.uuid4().hex}", lease_s=lease)
        child = await asyncio.create_subprocess_exec(sys.executable, "-c", LEASED, redis_server,
                                                     windows.tag[1:-1], str(lease),
                                                     stdout=asyncio.subprocess.PIPE)
        assert child.stdout is not None
        assert await asyncio.wait_for(child.stdout.readline(), 60) == b"admitted\n"
        child.kill()
        await child.wait()
        expires = await client.zscore(windows.key(places), "dying")
        assert expires is not None
        # Wait on Redis's own clock (no sleep), bounded by the lease, until the lease is over.
        while frees:
            seconds, micros = await client.time()
            if seconds + micros / 1e6 > expires:
                break
        assert (await windows.admit("next", [places], 0)).admitted is frees
    # A call still running pushes its lease on.
    windows = RedisWindows(client, prefix=f"t{uuid.uuid4().hex}", lease_s=30.0)
    await windows.mark_ready("test")
    assert (await windows.admit("long", [places], 0)).admitted
    before = await client.zscore(windows.key(places), "long")
    await windows.renew([("long", [places])])
    after = await client.zscore(windows.key(places), "long")
    assert before is not None and after is not None and after > before
    await client.aclose()


async def test_windows_that_were_forgotten_admit_nothing_until_loaded(windows: RedisWindows) -> None:
    assert (await windows.admit("a", [RPM], 1)).admitted
    await windows.client.delete(windows.ready_key, windows.key(RPM))   # as FLUSHALL leaves them
    forgotten = await windows.admit("b", [RPM], 1)
    assert not forgotten.admitted and not forgotten.ready
    assert await windows.peek([RPM]) is None
    # Loaded from the ledger (twice: a second loader counts nothing twice), then trusted again.
    now = float((await windows.client.time())[0])
    entries = [Entry(RPM, f"old{n}", now - 30, 1) for n in range(9)]
    assert await windows.claim_rebuild("me", 30) and not await windows.claim_rebuild("other", 30)
    await windows.load(entries)
    await windows.load(entries)
    await windows.mark_ready("me")
    assert (await windows.admit("c", [RPM], 1)).admitted                  # the 10th of rpm = 10
    refused = await windows.admit("d", [RPM], 1)
    assert not refused.admitted and refused.retry_after is not None and 29 < refused.retry_after <= 30


async def test_every_reply_carries_the_figures_of_each_window(windows: RedisWindows) -> None:
    tpm = WindowSpec("upstream:cloud", "tokens", 1000, span=60)
    first = await windows.admit("a", [RPM, tpm], 300)
    assert [f.used for f in first.figures] == [1, 300]
    assert all(59_000 < f.reset_ms <= 60_000 for f in first.figures)
    refused = await windows.admit("b", [RPM, tpm], 800)
    assert [f.used for f in refused.figures] == [1, 300]                  # unchanged: nothing taken
    peeked = await windows.peek([RPM, tpm, WindowSpec("user:nobody", "requests", 5, span=60)])
    assert peeked is not None and [f.used for f in peeked] == [1, 300, 0]
