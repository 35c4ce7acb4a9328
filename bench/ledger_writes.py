"""The ledger writer with its rollups: rows per second, and retention's effect on size and latency.

    python bench/ledger_writes.py [--rows 200000] [--days 30]

1. Throughput: ROWS call rows (3,000 users, 3 models, 6 types) appended as fast as the event
   loop can, then flushed: rows/s written with the hourly, daily and epoch rollups.
2. Retention: DAYS simulated days of 20,000 rows each, keeping 3 days of raw rows; after each
   day the writer is asked to prune. Prints the file's size per day (it must level off), and the
   latency of a one-row write-and-flush measured while pruning runs (the writer must not stall);
   then the same without retention, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.ledger import CallRecord  # noqa: E402
from proxy.ledger.sqlite import Ledger  # noqa: E402

DAY = 86400.0


def row(rng: random.Random, ts: float) -> CallRecord:
    cloud = rng.random() < 0.4
    prompt, completion = rng.randint(20, 800), rng.randint(5, 400)
    return CallRecord(ts=ts, upstream="gpt4o_cloud" if cloud else "ollama_local",
                      model=rng.choice(["gpt-4o", "gpt-4o-mini"]) if cloud else "llama3.2", dialect="openai",
                      endpoint="chat", type=rng.choice(["chat", "chat", "documento", "presentacion", "vision", "web"]),
                      user=f"5215{rng.randint(1, 3000):08d}", stream=rng.random() < 0.5, status=200,
                      outcome="ok" if rng.random() < 0.97 else "timeout", prompt_tokens=prompt,
                      completion_tokens=completion, cached_tokens=0, estimated=False,
                      latency_s=rng.lognormvariate(0, 0.8), ttft_s=None, cost_usd=0.0001 if cloud else 0.0)


async def write_rate(ledger: Ledger, rows: int, start: float = 1_700_000_000.0) -> float:
    """Rows/s: `rows` call rows appended as fast as the event loop can, then flushed, by `ledger`
    (any engine), opened here and closed after."""
    rng = random.Random(1)
    records = [row(rng, start + i * 0.5) for i in range(rows)]
    ledger.open(start)
    began = time.perf_counter()
    for rec in records:
        ledger.append(rec)
    await ledger.flush()
    took = time.perf_counter() - began
    ledger.close()
    return rows / took


async def throughput(path: Path, rows: int) -> None:
    rate = await write_rate(Ledger(path, max_backlog=rows + 1), rows)
    print(f"throughput: {rows:,} rows with rollups = {rate:,.0f} rows/s")


async def retention(path: Path, days: int, per_day: int = 20_000, keep_days: float | None = 3.0) -> None:
    rng = random.Random(2)
    ledger = Ledger(path, max_backlog=per_day + 1)
    start = 1_700_000_000.0
    ledger.open(start)
    latencies: list[float] = []
    sizes: list[float] = []
    for day in range(days):
        for i in range(per_day):
            ledger.append(row(rng, start + day * DAY + i * DAY / per_day))
        await ledger.flush()
        if keep_days is not None:
            ledger.prune(start + (day + 1) * DAY - keep_days * DAY, start + (day + 1) * DAY - 2 * DAY)
        # One call's row, written and flushed, again and again while the prune batches run.
        for _ in range(60):
            began = time.perf_counter()
            ledger.append(row(rng, start + (day + 1) * DAY - 1))
            await ledger.flush()
            latencies.append((time.perf_counter() - began) * 1000)
        # Then the quiet part of the day, in which pruning finishes (a bounded number of rounds).
        for _ in range(10_000):
            before = ledger.pruned
            await ledger.flush()
            if ledger.pruned == before:
                break
        sizes.append(sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 2**20)
    ledger.close()
    what = f"keeping {keep_days:g} days" if keep_days is not None else "keeping everything"
    print(f"{what}: file size (MiB, with WAL) after each day: " + " ".join(f"{s:.0f}" for s in sizes))
    ordered = sorted(latencies)
    print(f"{what}: one-row write+flush after each day's rows: median {statistics.median(latencies):.2f} ms, "
          f"p99 {ordered[int(0.99 * len(ordered))]:.2f} ms, max {ordered[-1]:.2f} ms ({len(latencies)} samples)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        await throughput(Path(tmp) / "a" / "ledger.sqlite3", args.rows)
        await retention(Path(tmp) / "b" / "ledger.sqlite3", args.days)
        await retention(Path(tmp) / "c" / "ledger.sqlite3", args.days, keep_days=None)


if __name__ == "__main__":
    asyncio.run(main())
