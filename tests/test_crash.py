"""The real `tollgate serve` process killed under load: the ledger survives, windows do not forget."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.accounting import Aggregates
from proxy.ledger.sqlite import Ledger

from .conftest import Serve, write_config
from .fake_upstream import Behavior, FakeUpstream


@pytest.fixture
async def serve(raw_config: dict[str, Any], tmp_path: Path) -> AsyncIterator[Serve]:
    raw_config["server"].update(drain_timeout_s=20)
    raw_config["upstreams"]["gpt4o_cloud"]["limits"] = {"rpd": 100_000}
    async with Serve(write_config(raw_config, tmp_path)) as server:
        yield server


async def test_sigkill_under_load(serve: Serve, fake: FakeUpstream, raw_config: dict[str, Any]) -> None:
    db = Path(raw_config["server"]["data_dir"]) / "ledger.sqlite3"
    # Five calls that will still be in flight at the kill: admitted, at the upstream, unfinished.
    fake.by_model["openai/gpt-4o"] = Behavior(stall_before_headers=True)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    stalled = [asyncio.create_task(session.post(serve.url + "/v1/chat/completions", json=body)) for _ in range(5)]
    completed: list[str] = []
    stop = asyncio.Event()

    async def worker(w: int) -> None:
        n = 0
        while not stop.is_set() and n < 300:
            user = f"w{w}-{n}"
            n += 1
            try:
                async with session.post(serve.url + "/v1/chat/completions",
                                        json={"model": "gpt-4o-mini", "user": user, "messages": []}) as r:
                    await r.read()
                    if r.status == 200:
                        completed.append(user)
            except aiohttp.ClientError:
                return
            if len(completed) >= 1500:
                stop.set()

    workers = [asyncio.create_task(worker(w)) for w in range(16)]
    await stop.wait()
    # What the ledger has committed, read by another connection while the load goes on: every
    # one of these rows must survive the kill (how far the ledger trails the calls is a
    # benchmark's figure, bench/crash_lag.py, not a bound for a test on a shared machine).
    reader = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    committed = {u for (u,) in reader.execute("SELECT user FROM calls")}
    reader.close()
    assert await serve.signal(signal.SIGKILL) == -signal.SIGKILL
    await asyncio.gather(*workers, *stalled, return_exceptions=True)
    await session.close()

    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        users = {u for (u,) in conn.execute("SELECT user FROM calls")}
        admissions = conn.execute("SELECT COUNT(*) FROM admissions").fetchone()[0]
    finally:
        conn.close()
    assert len(committed) >= 500 and committed <= users
    assert admissions >= len(committed) + 5
    # The rollups were committed with the rows, so the kill left them agreeing, to the call.
    ledger = Ledger(db)
    started, summary = ledger.epoch_summary()
    from_rows = Aggregates(epoch_started=started)
    for rec in ledger.rows():
        from_rows.add(rec)
    from_rollups = Aggregates.from_summary(started, summary)
    assert from_rollups.totals.requests == from_rows.totals.requests == len(users)
    assert (from_rollups.totals.total_tokens, from_rollups.latency.buckets) == \
           (from_rows.totals.total_tokens, from_rows.latency.buckets)

    fake.stall.set()
    await serve.start()
    async with aiohttp.ClientSession() as s:
        async with s.get(serve.url + "/stats") as r:
            stats = await r.json()
    [day] = [row for row in stats["detail"]["limits"]
             if row["scope"] == "upstream:gpt4o_cloud" and row["limit"] == "requests_per_day"]
    # The five calls in flight at the kill never finished, yet still hold their places.
    assert day["used"] == admissions >= len(committed) + 5
    assert stats["total_requests"] == len(users)


async def test_sigterm_drains_streams_and_flushes(serve: Serve, fake: FakeUpstream, raw_config: dict[str, Any]) -> None:
    gate = asyncio.Event()
    fake.behavior = Behavior(chunks=5, gate_before_last=gate, prompt_tokens=9, completion_per_chunk=1)
    async with aiohttp.ClientSession() as s:
        async with s.post(serve.url + "/v1/chat/completions",
                          json={"model": "gpt-4o", "stream": True, "messages": []}) as r:
            assert (await r.content.readline()).startswith(b"data: ")
            await fake.first_chunk_sent.wait()
            assert serve.proc is not None
            serve.proc.send_signal(signal.SIGTERM)   # mid-stream
            gate.set()
            rest = await r.read()
    assert rest.rstrip().endswith(b"data: [DONE]")
    assert await asyncio.wait_for(serve.proc.wait(), 60) == 0
    conn = sqlite3.connect(Path(raw_config["server"]["data_dir"]) / "ledger.sqlite3")
    try:
        rows = conn.execute("SELECT outcome, prompt_tokens + completion_tokens, estimated FROM calls").fetchall()
    finally:
        conn.close()
    assert rows == [("ok", 14, 0)]
