"""The PostgreSQL ledger's writer with its rollups: rows per second, beside SQLite's, in one run.

    python bench/pg_ledger_writes.py [--rows 200000] [--rounds 3]

Starts a throwaway PostgreSQL (tests/servers.py; fsync off, as for the suite) and appends the
same call rows (bench/ledger_writes.py's mix: 3,000 users, 3 models, 6 types) as fast as the
event loop can, then flushes: rows/s written with the hourly, daily and epoch rollups, by the
PostgreSQL ledger (binary COPY, one transaction a batch) and by the SQLite one, interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from bench.ledger_writes import write_rate  # noqa: E402
from proxy.ledger.postgresql import PgLedger  # noqa: E402
from proxy.ledger.sqlite import Ledger  # noqa: E402
from tests.servers import PostgresServer, postgres_bin  # noqa: E402


async def main(rows: int, rounds: int) -> None:
    binaries = postgres_bin()
    if binaries is None:
        raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
    server = PostgresServer(binaries)
    server.start()
    results: dict[str, list[float]] = {"PostgreSQL": [], "SQLite": []}
    try:
        for n in range(rounds):
            with psycopg.connect(server.dsn, autocommit=True) as admin:
                admin.execute(f"CREATE DATABASE bench{n}")
            tmp = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
            dsn = server.dsn.rsplit("/", 1)[0] + f"/bench{n}"
            pg = await write_rate(PgLedger(dsn, tmp / "outbox.sqlite3", max_backlog=rows + 1), rows, 1_700_000_000.0)
            lite = await write_rate(Ledger(tmp / "ledger.sqlite3", max_backlog=rows + 1), rows, 1_700_000_000.0)
            results["PostgreSQL"].append(pg)
            results["SQLite"].append(lite)
            print(f"round {n + 1}: PostgreSQL {pg:9,.0f} rows/s   SQLite {lite:9,.0f} rows/s", flush=True)
    finally:
        server.remove()
    print(f"\nmedians ({rows:,} rows with rollups):")
    for name, rates in results.items():
        print(f"  {name:10} {statistics.median(rates):9,.0f} rows/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.rows, args.rounds))
