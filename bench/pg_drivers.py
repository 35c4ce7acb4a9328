"""Which PostgreSQL driver the ledger writes with: COPY of call rows, asyncpg against psycopg 3.

    python bench/pg_drivers.py [--rows 200000] [--batch 1000]

Starts a throwaway PostgreSQL (tests/servers.py: initdb and pg_ctl in a temporary directory),
then writes the same call rows in batches, each batch one transaction with one COPY, with each
driver in turn, three interleaved rounds: psycopg 3 (text and binary COPY, from a thread as the
ledger's writer would) and asyncpg (binary COPY, its only kind). Prints rows/s and the CPU time
this process spent per 1,000 rows. asyncpg is not a dependency of Tollgate: `pip install asyncpg`
to compare (without it, its rows are left out).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

try:
    import asyncpg  # type: ignore[import-untyped,import-not-found,unused-ignore]  # untyped; not installed by the lock
except ImportError:  # only this comparison uses it
    asyncpg = None

from tests.servers import PostgresServer, postgres_bin  # noqa: E402

COLUMNS = ("id", "ts", "upstream", "model", "dialect", "endpoint", "type", "user", "stream", "status", "outcome",
           "prompt_tokens", "completion_tokens", "cached_tokens", "estimated", "latency_s", "ttft_s", "cost_usd",
           "fallback_from", "key_id", "admission", "final")
TABLE = """CREATE UNLOGGED TABLE IF NOT EXISTS calls_{n} (
    id text, ts double precision, upstream text, model text, dialect text, endpoint text, type text, "user" text,
    stream boolean, status integer, outcome text, prompt_tokens integer, completion_tokens integer,
    cached_tokens integer, estimated boolean, latency_s double precision, ttft_s double precision,
    cost_usd double precision, fallback_from text, key_id text, admission text, final boolean)"""


def rows(n: int) -> list[tuple[object, ...]]:
    now = time.time()
    return [(f"p1-{i}", now + i / 1000, "gpt4o_cloud", "gpt-4o", "openai", "chat", "chat", f"52155{i % 3000:05d}",
             False, 200, "ok", 37, 8, 0, False, 0.021, None, 0.00159, None, None, f"a{i}", True) for i in range(n)]


def psycopg_copy(dsn: str, data: list[tuple[object, ...]], batch: int, table: str, binary: bool) -> None:
    with psycopg.connect(dsn) as conn:
        names = ", ".join(f'"{c}"' for c in COLUMNS)
        form = " (FORMAT BINARY)" if binary else ""
        for at in range(0, len(data), batch):
            with conn.transaction(), conn.cursor() as cur:
                with cur.copy(f"COPY {table} ({names}) FROM STDIN{form}") as copy:
                    if binary:
                        copy.set_types(["text", "float8", *["text"] * 6, "bool", "int4", "text", "int4", "int4",
                                        "int4", "bool", "float8", "float8", "float8", "text", "text", "text", "bool"])
                    for row in data[at:at + batch]:
                        copy.write_row(row)


async def asyncpg_copy(dsn: str, data: list[tuple[object, ...]], batch: int, table: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for at in range(0, len(data), batch):
            async with conn.transaction():
                await conn.copy_records_to_table(table, records=data[at:at + batch], columns=list(COLUMNS))
    finally:
        await conn.close()


def timed(run: object) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    if asyncio.iscoroutine(run):
        asyncio.run(run)
    else:
        run()  # type: ignore[operator]
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    binaries = postgres_bin()
    if binaries is None:
        raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
    server = PostgresServer(binaries)
    server.start()
    data = rows(args.rows)
    results: dict[str, list[tuple[float, float]]] = {}
    try:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            for n in range(12):
                conn.execute(TABLE.format(n=n))
        n = 0
        for _ in range(3):
            for name in ("psycopg 3, text COPY", "psycopg 3, binary COPY", "asyncpg, binary COPY")[:3 if asyncpg else 2]:
                table = f"calls_{n}"
                n += 1
                if name.startswith("asyncpg"):
                    result = timed(asyncpg_copy(server.dsn, data, args.batch, table))
                else:
                    result = timed(lambda: psycopg_copy(server.dsn, data, args.batch, table, "binary" in name))
                results.setdefault(name, []).append(result)
                print(f"{name:24} {args.rows / result[0]:10,.0f} rows/s   {1000 * result[1] / args.rows * 1000:6.1f} ms "
                      f"CPU per 1,000 rows", flush=True)
    finally:
        server.remove()
    print(f"\nmedians ({args.rows:,} rows, {args.batch:,} a transaction):")
    for name, runs in results.items():
        rate = statistics.median(args.rows / wall for wall, _ in runs)
        cpu = statistics.median(1000 * cpu / args.rows * 1000 for _, cpu in runs)
        print(f"  {name:24} {rate:10,.0f} rows/s   {cpu:6.1f} ms CPU per 1,000 rows")


if __name__ == "__main__":
    main()
