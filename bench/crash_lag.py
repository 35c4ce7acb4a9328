"""How far the ledger trails the calls: SIGKILL `tollgate serve` under load, then see which of the
calls its clients had finished are in the ledger.

    python bench/crash_lag.py [--kills 5] [--calls 1500]

Each round: 16 clients call as fast as they can (each call a distinct user) until CALLS have
finished, the server is killed with SIGKILL, and every finished call is looked up in the
ledger. Prints, per round and in all, how many calls finished at least 0, 10, 50 and 100 ms
before the kill are missing (the promise: none finished 100 ms before), and that the rollups
agree with the rows that survived.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sqlite3
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import start_proxy, start_upstream, stop  # noqa: E402
from proxy.accounting import Aggregates  # noqa: E402
from proxy.ledger.sqlite import Ledger  # noqa: E402

MARGINS_MS = (0, 10, 50, 100)


async def round_(upstream_port: int, calls: int) -> dict[int, tuple[int, int]]:
    config = (f'[upstreams.cloud]\nkind = "openai"\nbase_url = "http://127.0.0.1:{upstream_port}"\n'
              f'models = ["*"]\n[upstreams.cloud.limits]\nrpd = 10000000\n')
    proc, port, tmp = await start_proxy(config)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    finished: list[tuple[float, str]] = []
    done = asyncio.Event()

    async def client(session: aiohttp.ClientSession, c: int) -> None:
        n = 0
        while not done.is_set():
            user = f"c{c}-{n}"
            n += 1
            try:
                async with session.post(url, json={"model": "gpt-4o", "user": user, "messages": []}) as r:
                    await r.read()
                    if r.status == 200:
                        finished.append((time.monotonic(), user))
            except aiohttp.ClientError:
                return
            if len(finished) >= calls:
                done.set()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        clients = [asyncio.create_task(client(session, c)) for c in range(16)]
        await done.wait()
        killed = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await asyncio.gather(*clients, return_exceptions=True)
    db = tmp / "data" / "ledger.sqlite3"
    conn = sqlite3.connect(db)
    kept = {u for (u,) in conn.execute("SELECT user FROM calls")}
    conn.close()
    ledger = Ledger(db)
    started, summary = ledger.epoch_summary()
    rows = Aggregates(epoch_started=started)
    for rec in ledger.rows():
        rows.add(rec)
    agree = Aggregates.from_summary(started, summary).totals.requests == rows.totals.requests == len(kept)
    out = {}
    for margin in MARGINS_MS:
        due = [u for t, u in finished if t <= killed - margin / 1000]
        out[margin] = (len(due), sum(u not in kept for u in due))
    print(f"  round: {len(finished):,} finished, {len(kept):,} in the ledger, rollups agree: {agree}; missing: "
          + ", ".join(f"{m} ms before: {out[m][1]} of {out[m][0]:,}" for m in MARGINS_MS))
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1500)
    args = parser.parse_args()
    upstream, upstream_port = await start_upstream()
    totals = {m: [0, 0] for m in MARGINS_MS}
    try:
        for _ in range(args.kills):
            for margin, (due, missing) in (await round_(upstream_port, args.calls)).items():
                totals[margin][0] += due
                totals[margin][1] += missing
    finally:
        await stop(upstream)
    print("in all: missing calls finished at least " +
          ", ".join(f"{m} ms before the kill: {totals[m][1]} of {totals[m][0]:,}" for m in MARGINS_MS))


if __name__ == "__main__":
    asyncio.run(main())
