"""History over the ledger, CSV exports and the monthly projection."""

from __future__ import annotations

import csv
import io
from typing import Any

import aiohttp
import pytest

from .conftest import Clock, Proxy, chat
from .fake_upstream import Behavior, FakeUpstream

HOUR = 3600.0


async def get(proxy: Proxy, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + path) as r:
            body = await r.read()
            return r.status, (await r.json()) if r.content_type == "application/json" else body.decode()


async def traffic(proxy: Proxy, fake: FakeUpstream, clock: Clock) -> None:
    """Monday 2024-01-15 14:32 UTC: 3 cloud calls at 14h, 1 local at 15h, 2 cloud on Tuesday 09h."""
    fake.behavior = Behavior(prompt_tokens=100, chunks=5, completion_per_chunk=10)
    for _ in range(3):
        assert await chat(proxy.url, "gpt-4o", {"X-Tollgate-User": "ana"}) == 200
    clock.advance(HOUR)
    assert await chat(proxy.url, "llama3.2", {"X-Tollgate-Type": "documento"}) == 200
    clock.advance(18 * HOUR)
    for _ in range(2):
        assert await chat(proxy.url, "gpt-4o", {"X-Tollgate-User": "luis"}) == 200


async def test_history_by_hour_and_by_upstream(timed: Proxy, fake: FakeUpstream, clock: Clock) -> None:
    await traffic(timed, fake, clock)
    status, data = await get(timed, "/stats/history?bucket=hour")
    assert status == 200
    assert [(b["start_local"], b["requests"], b["total_tokens"]) for b in data["buckets"]] == [
        ("2024-01-15T14:00:00", 3, 450), ("2024-01-15T15:00:00", 1, 150), ("2024-01-16T09:00:00", 2, 300)]
    cost = (100 * 0.03 + 50 * 0.06) / 1000
    assert data["buckets"][0]["cost_usd"] == pytest.approx(3 * cost)
    assert data["busiest_hours"][0] == {"hour": 14, "requests": 3, "tokens": 450}
    assert [d["weekday"] for d in data["busiest_weekdays"]] == ["monday", "tuesday"]
    status, data = await get(timed, "/stats/history?bucket=day&group_by=upstream")
    assert [(b["start_local"], b["upstream"], b["requests"]) for b in data["buckets"]] == [
        ("2024-01-15T00:00:00", "gpt4o_cloud", 3), ("2024-01-15T00:00:00", "ollama_local", 1),
        ("2024-01-16T00:00:00", "gpt4o_cloud", 2)]
    status, data = await get(timed, "/stats/history?bucket=day&group_by=user&since=2024-01-16&type=chat")
    assert [(b["user"], b["requests"]) for b in data["buckets"]] == [("luis", 2)]
    # Spent 5 calls' cost over the ~19 hours the ledger has existed: about 5 * cost per day.
    assert data["cost_last_7_days_usd"] == pytest.approx(5 * cost)
    assert data["cost_projection_month_usd"] == pytest.approx(5 * cost * 30, rel=1e-3)
    status, stats_data = await get(timed, "/stats")
    assert stats_data["detail"]["cost_projection_month_usd"] == data["cost_projection_month_usd"]


async def test_projection_survives_reset_and_restart(timed: Proxy, fake: FakeUpstream, clock: Clock) -> None:
    await traffic(timed, fake, clock)
    _, before = await get(timed, "/stats")
    async with aiohttp.ClientSession() as s:
        async with s.post(timed.url + "/metrics/reset") as r:
            assert r.status == 200
    await timed.restart()
    _, after = await get(timed, "/stats")
    assert after["total_requests"] == 0
    assert after["detail"]["cost_projection_month_usd"] == before["detail"]["cost_projection_month_usd"] > 0


@pytest.mark.parametrize("query, message", [("bucket=week", "'hour' or 'day'"), ("group_by=ip", "expected one of"),
                                            ("since=yesterday", "not a time")])
async def test_history_rejects_bad_parameters(proxy: Proxy, query: str, message: str) -> None:
    status, body = await get(proxy, "/stats/history?" + query)
    assert status == 400 and message in body["error"]["message"]


async def test_csv_export_with_filters_and_snapshot(timed: Proxy, fake: FakeUpstream, clock: Clock) -> None:
    await traffic(timed, fake, clock)
    status, text = await get(timed, "/stats/export.csv?upstream=gpt4o_cloud")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert status == 200 and len(rows) == 5 and {r["upstream"] for r in rows} == {"gpt4o_cloud"}
    assert sum(int(r["prompt_tokens"]) for r in rows) == 500
    status, text = await get(timed, "/stats/export.csv?since=2024-01-16&until=2024-01-17")
    assert len(list(csv.DictReader(io.StringIO(text)))) == 2
    status, text = await get(timed, "/stats/snapshot.csv")
    [row] = list(csv.reader(io.StringIO(text)))
    assert row[1:] == ["6", "900", "$0.0300", "100.0%"]


@pytest.mark.parametrize("user", ["=HYPERLINK(\"http://x\",\"y\")", "+1+2", "-2+3", "@SUM(A1)"])
async def test_csv_cells_never_run_as_formulas(proxy: Proxy, fake: FakeUpstream, user: str) -> None:
    assert await chat(proxy.url, "gpt-4o", {"X-Tollgate-User": user}) == 200
    await proxy.ledger.flush()
    status, text = await get(proxy, "/stats/export.csv")
    [row] = list(csv.DictReader(io.StringIO(text)))
    assert status == 200 and row["user"] == "'" + user
    # Numbers stay numbers.
    assert float(row["ts"]) > 0 and int(row["prompt_tokens"]) > 0 and float(row["cost_usd"]) > 0


def test_tab_and_carriage_return_cells_are_neutralised_too() -> None:
    from proxy.reports import safe_cell

    assert [safe_cell(v) for v in ("\tx", "\rx", "ana", -5, 0.25)] == ["'\tx", "'\rx", "ana", -5, 0.25]
