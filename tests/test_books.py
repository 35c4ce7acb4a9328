"""The books read back from a shared ledger: exact, whatever this process books while they are read."""

from __future__ import annotations

import asyncio
from pathlib import Path

from proxy.accounting import Accounting
from proxy.books import Books
from proxy.ledger import CallRecord
from proxy.ledger.sqlite import Ledger


def call(ts: float, user: str) -> CallRecord:
    return CallRecord(ts=ts, upstream="gpt4o_cloud", model="gpt-4o", dialect="openai", endpoint="chat", type="chat",
                      user=user, stream=False, status=200, outcome="ok", prompt_tokens=30, completion_tokens=10,
                      cached_tokens=0, estimated=False, latency_s=0.2, ttft_s=None, cost_usd=0.0015)


async def test_calls_booked_while_the_ledger_is_read_are_neither_lost_nor_counted_twice(tmp_path: Path) -> None:
    now = 1_769_731_200.0
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.open(now)
    other = Ledger(tmp_path / "ledger.sqlite3")   # another worker writing the same file
    other.open(now)
    acc = Accounting(ledger, lambda: now + 60)
    books = Books(ledger, acc, shared=True, max_age_s=0)
    try:
        for n in range(20):
            acc.record(call(now + n, f"u{n}"))
            other.append(call(now + n, "other"))
        assert await other.flush(timeout=30)
        for round_ in range(10):
            reading = asyncio.create_task(books.refresh())
            await asyncio.sleep(0)       # the read is asked for: its place in the write queue is taken
            acc.record(call(now + 100 + round_, "late"))   # booked while the sums are read
            await reading
            assert acc.current.totals.requests == 20 + 20 + round_ + 1
            assert abs(acc.current.totals.cost_usd - 0.0015 * (40 + round_ + 1)) < 1e-9
            assert acc.current.by_user["late"].requests == round_ + 1
    finally:
        other.close()
        ledger.close()
