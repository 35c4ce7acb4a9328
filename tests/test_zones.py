"""One clock and one time zone: the stats zone decides "today", every bucket, since/until and the
text, and hour buckets stay right across DST changes."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from .conftest import Clock, Proxy
from .fake_upstream import FakeUpstream

NEW_YORK = ZoneInfo("America/New_York")
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hola"}]}


@pytest.fixture
async def zoned(raw_config: dict[str, Any], clock: Clock) -> AsyncIterator[Proxy]:
    raw_config["stats"]["timezone"] = "America/New_York"
    raw_config["upstreams"]["gpt4o_cloud"]["limits"] = {"rpd": 100_000}
    proxy = Proxy(raw_config, clock)
    await proxy.start()
    yield proxy
    await proxy.stop()


async def calls_every_half_hour(proxy: Proxy, clock: Clock, start: datetime, count: int) -> None:
    clock.now = start.timestamp()
    async with aiohttp.ClientSession() as s:
        for _ in range(count):
            async with s.post(proxy.url + "/v1/chat/completions", json=BODY) as r:
                assert r.status == 200
            clock.advance(1800)


async def history(proxy: Proxy, query: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/stats/history?" + query) as r:
            assert r.status == 200
            return await r.json()  # type: ignore[no-any-return]


async def test_hour_buckets_across_the_spring_change(zoned: Proxy, clock: Clock) -> None:
    # 2024-03-10 in New York: 02:00 EST jumps to 03:00 EDT. Calls every 30 min from 00:00 local.
    await calls_every_half_hour(zoned, clock, datetime(2024, 3, 10, 0, 0, tzinfo=NEW_YORK), 8)
    data = await history(zoned, "bucket=hour")
    assert data["timezone"] == "America/New_York"
    assert [(b["start_local"], b["requests"]) for b in data["buckets"]] == [
        ("2024-03-10T00:00:00", 2), ("2024-03-10T01:00:00", 2), ("2024-03-10T03:00:00", 2),
        ("2024-03-10T04:00:00", 2)]
    assert [b["start"] for b in data["buckets"]] == [datetime(2024, 3, 10, h, tzinfo=NEW_YORK).timestamp()
                                                     for h in (0, 1, 3, 4)]
    assert {h["hour"] for h in data["busiest_hours"]} == {0, 1, 3, 4}


async def test_the_repeated_autumn_hour_is_two_buckets(zoned: Proxy, clock: Clock) -> None:
    # 2024-11-03: 02:00 EDT goes back to 01:00 EST, so 01:00-02:00 happens twice.
    await calls_every_half_hour(zoned, clock, datetime(2024, 11, 3, 0, 0, tzinfo=NEW_YORK), 8)
    data = await history(zoned, "bucket=hour")
    assert [(b["start_local"], b["requests"]) for b in data["buckets"]] == [
        ("2024-11-03T00:00:00", 2), ("2024-11-03T01:00:00", 2), ("2024-11-03T01:00:00", 2),
        ("2024-11-03T02:00:00", 2)]
    days = await history(zoned, "bucket=day")
    assert [(b["start_local"], b["requests"]) for b in days["buckets"]] == [("2024-11-03T00:00:00", 8)]


async def test_days_since_and_the_export_speak_the_stats_zone(zoned: Proxy, clock: Clock) -> None:
    # 23:30 and 00:30 New York time: two local days, though the same UTC day (04:30, 05:30).
    await calls_every_half_hour(zoned, clock, datetime(2024, 1, 15, 23, 0, tzinfo=NEW_YORK), 1)
    clock.advance(1800)
    await calls_every_half_hour(zoned, clock, datetime(2024, 1, 16, 0, 30, tzinfo=NEW_YORK), 1)
    days = await history(zoned, "bucket=day")
    assert [(b["start_local"], b["requests"]) for b in days["buckets"]] == [
        ("2024-01-15T00:00:00", 1), ("2024-01-16T00:00:00", 1)]
    # since=2024-01-16 is New York's midnight, not the machine's nor UTC's.
    since = await history(zoned, "bucket=day&since=2024-01-16")
    assert [b["requests"] for b in since["buckets"]] == [1]
    async with aiohttp.ClientSession() as s:
        async with s.get(zoned.url + "/stats/export.csv") as r:
            rows = list(csv.DictReader(io.StringIO(await r.text())))
    assert [row["time"] for row in rows] == ["2024-01-15T23:00:00.000-05:00", "2024-01-16T00:30:00.000-05:00"]
    assert [float(row["ts"]) for row in rows] == [datetime.fromisoformat(row["time"]).timestamp() for row in rows]


async def test_a_calendar_day_limit_follows_the_stats_zone(raw_config: dict[str, Any], clock: Clock,
                                                           fake: FakeUpstream) -> None:
    raw_config["stats"]["timezone"] = "America/Mexico_City"
    raw_config["upstreams"]["gpt4o_cloud"]["limits"] = {"rpd": 2, "day": "calendar"}
    proxy = Proxy(raw_config, clock)
    await proxy.start()
    mexico = ZoneInfo("America/Mexico_City")
    clock.now = datetime(2024, 1, 15, 23, 0, tzinfo=mexico).timestamp()  # 05:00 UTC the next day
    try:
        async with aiohttp.ClientSession() as s:
            statuses = []
            for _ in range(3):
                async with s.post(proxy.url + "/v1/chat/completions", json=BODY) as r:
                    statuses.append(r.status)
            assert statuses == [200, 200, 429]
            clock.now = datetime(2024, 1, 16, 0, 1, tzinfo=mexico).timestamp()  # Mexico's midnight
            async with s.post(proxy.url + "/v1/chat/completions", json=BODY) as r:
                assert r.status == 200
            async with s.get(proxy.url + "/stats") as r:
                assert (await r.json())["rate_limits"]["requests_dia"] == "1 / 2 RPD"
    finally:
        await proxy.stop()
