"""History and CSV export on a large ledger.

    python bench/reports.py [--rows N]

Writes N rows (default 1,000,000) spread over 30 days into a fresh ledger, then:
1. times reports.history (hour buckets over a day, day buckets by upstream over the month);
2. starts the real `tollgate serve` on it (timing start-up, which replays the ledger) and
   streams GET /stats/export.csv, reporting the server's RSS before, after and at peak.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import reset_peak, rss_kib, start_proxy, stop  # noqa: E402
from proxy import reports  # noqa: E402
from proxy.config import local_zone  # noqa: E402
from proxy.ledger import COLUMNS  # noqa: E402
from proxy.ledger.sqlite import Ledger  # noqa: E402

DAY = 86400.0


def fill(path: Path, rows: int, now: float) -> None:
    ledger = Ledger(path)
    ledger.open(now - 31 * DAY)
    ledger.close()
    rng = random.Random(7)
    conn = sqlite3.connect(path)
    insert = f"INSERT INTO calls ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    batch = []
    for i in range(rows):
        ts = now - 30 * DAY + 30 * DAY * i / rows
        cloud = rng.random() < 0.4
        prompt, completion = rng.randint(20, 800), rng.randint(5, 400)
        batch.append((ts, "gpt4o_cloud" if cloud else "ollama_local", "gpt-4o" if cloud else "llama3.2",
                      "openai", "chat", rng.choice(["chat", "documento", "presentacion"]), f"user{rng.randint(1, 500)}",
                      rng.random() < 0.5, 200, "ok" if rng.random() < 0.98 else "timeout", prompt, completion, 0,
                      False, rng.uniform(0.2, 3.0), None, (prompt * 0.03 + completion * 0.06) / 1000 if cloud else 0.0,
                      None, None, ts - 1.0, True))
        if len(batch) == 50_000:
            conn.executemany(insert, batch)
            batch.clear()
    conn.executemany(insert, batch)
    conn.commit()
    conn.close()


def timed(label: str, fn, *args):  # type: ignore[no-untyped-def]
    start_t = time.perf_counter()
    result = fn(*args)
    print(f"{label}: {(time.perf_counter() - start_t) * 1000:,.0f} ms")
    return result


async def serve_and_export(tmp: Path, rows: int) -> None:
    started = time.perf_counter()
    proxy, port, _ = await start_proxy("""
[upstreams.gpt4o_cloud]
kind = "openai"
base_url = "http://127.0.0.1:1"
models = ["gpt-4o"]
[upstreams.ollama_local]
kind = "ollama"
base_url = "http://127.0.0.1:1"
models = ["*"]
""", data_dir=tmp / "data")
    print(f"tollgate serve start-up on {rows:,} rows (replays the epoch and the last day): "
          f"{time.perf_counter() - started:.1f} s")
    assert proxy.pid is not None
    try:
        before, _ = rss_kib(proxy.pid)
        reset_peak(proxy.pid)
        size = 0
        started = time.perf_counter()
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/stats/export.csv") as r:
                async for chunk in r.content.iter_any():
                    size += len(chunk)
        elapsed = time.perf_counter() - started
        after, peak = rss_kib(proxy.pid)
        print(f"GET /stats/export.csv: {size / 2**20:,.0f} MiB in {elapsed:.1f} s; server RSS "
              f"before {before / 1024:.0f} MiB, after {after / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB")
    finally:
        await stop(proxy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    path = tmp / "data" / "ledger.sqlite3"
    now = time.time()
    timed(f"write {args.rows:,} rows", fill, path, args.rows, now)
    last_day = reports.Filters(since=now - DAY)
    zone = local_zone()
    timed("history: hour buckets, last day", reports.history, Ledger(path), "hour", last_day, None, zone, now)
    timed("history: day buckets by upstream, 30 days", reports.history, Ledger(path), "day", reports.Filters(), "upstream",
          zone, now)
    timed("history: day buckets by user, 30 days", reports.history, Ledger(path), "day", reports.Filters(), "user", zone, now)
    asyncio.run(serve_and_export(tmp, args.rows))


if __name__ == "__main__":
    main()
