"""A year of traffic: start-up, /stats, history and export on a big ledger, through the real server.

    python bench/big_ledger.py fill DIR --rows 10000000     # a ledger of a year's calls in DIR
    python bench/big_ledger.py measure DIR                   # start `tollgate serve` on it, time it

`fill` writes rows spread evenly over the 365 days before now (27,400 a day at 10M), with
admissions for the cloud calls, straight into SQLite with the ledger's own schema, as an
older Tollgate would have left them. `measure` starts the real server twice: the first start
includes whatever one-time migration the version needs (back-fill), the second is the plain
start-up; then it times GET /stats, /stats/history for 30 days by day and by hour grouped by
each dimension, and a 30-day CSV export, and prints the database's size.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import sqlite3
import statistics
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import rss_kib  # noqa: E402
from proxy.ledger import COLUMNS  # noqa: E402
from proxy.ledger.sqlite import Ledger  # noqa: E402

DAY = 86400.0
CONFIG = """
[server]
port = 0
data_dir = "{data}"
snapshot_interval_s = 3600
[stats]
timezone = "America/Mexico_City"
limits_upstream = "gpt4o_cloud"
limits_model = "gpt-4o"
[upstreams.gpt4o_cloud]
kind = "openai"
base_url = "http://127.0.0.1:9"
models = ["gpt-4o", "gpt-4o-mini"]
[upstreams.gpt4o_cloud.limits]
rpd = 1000000
tpm = 100000000
[upstreams.ollama_local]
kind = "ollama"
base_url = "http://127.0.0.1:9"
models = ["llama3.2"]
[prices."gpt-4o*"]
input = 0.0025
output = 0.01
"""


def fill(data: Path, rows: int, days: float) -> None:
    data.mkdir(parents=True, exist_ok=True)
    path = data / "ledger.sqlite3"
    now = time.time()
    start = now - days * DAY
    ledger = Ledger(path)
    ledger.open(start)
    ledger.close()
    rng = random.Random(7)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    insert = f"INSERT INTO calls ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    admit = "INSERT INTO admissions (key, ts, upstream, model, user, key_id, tokens) VALUES (?, ?, ?, ?, ?, ?, ?)"
    calls: list[tuple[object, ...]] = []
    admissions: list[tuple[object, ...]] = []
    types = ["chat", "chat", "chat", "documento", "presentacion", "vision"]
    began = time.perf_counter()
    for i in range(rows):
        ts = start + days * DAY * i / rows
        pick = rng.random()
        upstream, model = (("gpt4o_cloud", "gpt-4o") if pick < 0.3 else ("gpt4o_cloud", "gpt-4o-mini")
                           if pick < 0.4 else ("ollama_local", "llama3.2"))
        cloud = upstream == "gpt4o_cloud"
        prompt, completion = rng.randint(20, 800), rng.randint(5, 400)
        outcome = "ok" if rng.random() < 0.97 else rng.choice(["timeout", "upstream_status", "cancelled"])
        estimated = outcome == "cancelled"
        key = f"a{i}" if cloud else None
        latency = rng.lognormvariate(0.0, 0.8)
        calls.append((ts, upstream, model, "openai" if cloud else "ollama", "chat", rng.choice(types),
                      f"5215{rng.randint(1, 3000):08d}", rng.random() < 0.5, 200 if outcome == "ok" else 504,
                      outcome, prompt, completion, rng.choice([0, 0, 0, 64]), estimated, latency,
                      latency * 0.2 if rng.random() < 0.5 else None,
                      (prompt * 0.0025 + completion * 0.01) / 1000 if cloud else 0.0,
                      "gpt4o_cloud" if not cloud and rng.random() < 0.05 else None, None, key, True))
        if key is not None:
            admissions.append((key, ts - latency, upstream, model, calls[-1][6], None, prompt + completion))
        if len(calls) == 100_000:
            conn.executemany(insert, calls)
            conn.executemany(admit, admissions)
            conn.commit()
            calls.clear()
            admissions.clear()
    conn.executemany(insert, calls)
    conn.executemany(admit, admissions)
    conn.commit()
    conn.close()
    print(f"filled {rows:,} rows over {days:g} days in {time.perf_counter() - began:.1f} s; "
          f"{path.stat().st_size / 2**20:,.0f} MiB")


async def start_server(config: Path) -> tuple[asyncio.subprocess.Process, str, float, list[str]]:
    began = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", "-c", str(config), "serve",
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    log: list[str] = []
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 3600)).decode()
        if not line:
            raise RuntimeError("serve exited:\n" + "".join(log[-20:]))
        log.append(line)
        if found := re.search(r"ready on (http://\S+)", line):
            url = found.group(1)
            break
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/healthz") as r:
            assert r.status == 200, await r.text()
    asyncio.get_running_loop().create_task(_drain(proc, log))
    return proc, url, time.perf_counter() - began, log


async def _drain(proc: asyncio.subprocess.Process, log: list[str]) -> None:
    assert proc.stderr is not None
    while line := await proc.stderr.readline():
        log.append(line.decode())


async def stop_server(proc: asyncio.subprocess.Process) -> None:
    proc.terminate()
    await proc.wait()


async def median_ms(session: aiohttp.ClientSession, url: str, times: int) -> tuple[float, bytes]:
    samples, body = [], b""
    for _ in range(times):
        began = time.perf_counter()
        async with session.get(url) as r:
            body = await r.read()
            assert r.status == 200, body[:300]
        samples.append((time.perf_counter() - began) * 1000)
    return statistics.median(samples), body


async def measure(data: Path) -> None:
    config = data / "config.toml"
    config.write_text(CONFIG.format(data=data))
    db = data / "ledger.sqlite3"
    rows = sqlite3.connect(f"file:{db}?mode=ro", uri=True).execute("SELECT MAX(id) FROM calls").fetchone()[0]
    print(f"ledger: {rows:,} rows, {db.stat().st_size / 2**20:,.0f} MiB")
    proc, url, first, log = await start_server(config)
    backfill = [line.strip() for line in log if "back-fill" in line or "backfill" in line]
    await stop_server(proc)
    print(f"first start (one-time migration included): {first:.2f} s" + (f"  [{backfill[-1]}]" if backfill else ""))
    starts = []
    for _ in range(3):
        proc, url, took, _ = await start_server(config)
        starts.append(took)
        if len(starts) < 3:
            await stop_server(proc)
    print(f"start-up to a served /healthz: median {statistics.median(starts):.2f} s of {len(starts)} "
          f"({', '.join(f'{s:.2f}' for s in starts)})")
    print(f"RSS after start: {rss_kib(proc.pid)[0] / 1024:.0f} MiB")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as s:
            ms, body = await median_ms(s, url + "/stats", 20)
            print(f"GET /stats: median {ms:.1f} ms")
            now = time.time()
            since = int(now - 30 * DAY)
            for bucket in ("day", "hour"):
                for group in ("", "upstream", "model", "type", "user"):
                    query = f"/stats/history?bucket={bucket}&since={since}" + (f"&group_by={group}" if group else "")
                    ms, body = await median_ms(s, url + query, 5)
                    print(f"history 30 days by {bucket:4} {('grouped by ' + group) if group else '':19}: "
                          f"median {ms:7.1f} ms ({len(body):,} bytes)")
            began = time.perf_counter()
            size = 0
            async with s.get(url + f"/stats/export.csv?since={since}") as r:
                async for chunk in r.content.iter_any():
                    size += len(chunk)
            took = time.perf_counter() - began
            print(f"export 30 days: {size / 2**20:.0f} MiB in {took:.2f} s ({size / 2**20 / took:.0f} MiB/s)")
    finally:
        await stop_server(proc)
    print(f"database size: {db.stat().st_size / 2**20:,.0f} MiB "
          f"(+ WAL {os.path.getsize(str(db) + '-wal') / 2**20 if os.path.exists(str(db) + '-wal') else 0:,.0f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["fill", "measure"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=365.0)
    args = parser.parse_args()
    data = args.dir.resolve()
    if args.what == "fill":
        fill(data, args.rows, args.days)
    else:
        asyncio.run(measure(data))


if __name__ == "__main__":
    main()
