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
from hypothesis import given
from hypothesis import strategies as st

from proxy.limits.windows import DAY, Window, _midnight

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


@given(st.sampled_from(["America/New_York", "America/Santiago", "America/Havana", "Asia/Beirut",
                        "America/Sao_Paulo", "Australia/Lord_Howe", "Pacific/Apia", "UTC"]),
       st.floats(min_value=1.2e9, max_value=2.1e9),
       st.lists(st.floats(min_value=0, max_value=3 * 86400), min_size=1, max_size=30))
def test_a_calendar_day_window_remembers_its_day_without_changing_it(zone: str, first: float,
                                                                     steps: list[float]) -> None:
    """A day window remembers the local day it last worked out; whatever the zone's DST rules
    (changes at midnight, half-hour shifts, a skipped day), its start and end are the ones
    worked out afresh, as the clock moves on and back."""
    tz = ZoneInfo(zone)
    window = Window(5, DAY, tz)
    for ts in [first + step for step in steps] + [first + step for step in reversed(steps)]:
        assert window.start(ts) == _midnight(ts, tz)
        assert window.end_of(ts) == _midnight(ts, tz, days_later=1)


@pytest.mark.parametrize("zone", ["America/New_York", "America/Santiago", "America/Havana", "Asia/Beirut",
                                  "Australia/Lord_Howe", "Europe/London"])
def test_a_calendar_day_window_is_right_through_every_dst_change(zone: str) -> None:
    """Every ten minutes across each of the zone's DST changes from 2019 to 2026 (Santiago, Havana
    and Beirut change at midnight), forwards then backwards."""
    tz = ZoneInfo(zone)
    window = Window(5, DAY, tz)
    start = datetime(2019, 1, 1, tzinfo=tz).timestamp()
    changes = [start + d * DAY for d in range(8 * 365)
               if datetime.fromtimestamp(start + d * DAY, tz).utcoffset() !=
               datetime.fromtimestamp(start + (d + 1) * DAY, tz).utcoffset()]
    assert changes
    for day in changes:
        moments = [day - DAY + i * 600 for i in range(3 * 144)]
        for ts in moments + moments[::-1]:
            assert (window.start(ts), window.end_of(ts)) == (_midnight(ts, tz), _midnight(ts, tz, days_later=1)), ts
