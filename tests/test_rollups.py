"""The ledger's rollups give exactly what the raw rows give: written live by the writer, or
back-filled once into an older ledger, for any epoch, partial hours at its ends included."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import sqlite3
import sys
from dataclasses import fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from proxy import reports
from proxy.accounting import Aggregates
from proxy.ledger import OTHERS, Admission, CallRecord, Filters
from proxy.ledger import sqlite_rollups as rollups
from proxy.ledger.sqlite import Ledger

from .conftest import Clock, Proxy, Serve, settled, to_toml

START = 1_700_000_000.0 + 1234.5   # not on an hour


USERS: list[str | None] = [None, "ana", "beto", "5215512345678"]


def random_rows(rng: random.Random, count: int, span_s: float, users: list[str | None] = USERS) -> list[CallRecord]:
    rows = []
    for i in range(count):
        ts = START + span_s * i / count + rng.random()
        final = rng.random() > 0.05
        outcome = "ok" if rng.random() < 0.8 else rng.choice(["timeout", "upstream_status", "cancelled",
                                                               "rate_limited"])
        prompt, completion = rng.randint(0, 500), rng.randint(0, 300)
        hit = final and outcome == "ok" and rng.random() < 0.1   # answered from the cache
        if hit:
            outcome = "cache_hit"
        rows.append(CallRecord(
            ts=ts, upstream=rng.choice(["cloud", "local", ""]), model=rng.choice(["gpt-4o", "llama3.2", "m'x"]),
            dialect="openai", endpoint=rng.choice(["chat", "embedding", "generate"]),
            type=rng.choice(["chat", "vision", "documento"]), user=rng.choice(users),
            stream=rng.random() < 0.5, status=200 if outcome == "ok" else 504, outcome=outcome,
            prompt_tokens=prompt if final else 0, completion_tokens=completion if final else 0,
            cached_tokens=rng.choice([0, 16]), estimated=rng.random() < 0.1, latency_s=rng.lognormvariate(0, 1),
            ttft_s=rng.random() if rng.random() < 0.5 else None, cost_usd=rng.random() / 100 if final else 0.0,
            fallback_from=rng.choice([None, None, "cloud"]), key_id=rng.choice([None, "bot"]),
            admission=None, final=final))
        if hit:
            rows[-1] = replace(rows[-1], prompt_tokens=0, completion_tokens=0, cost_usd=0.0,
                               saved_tokens=prompt + completion, saved_usd=rng.random() / 100)
    return rows


def replayed(started: float, rows: list[CallRecord]) -> Aggregates:
    agg = Aggregates(epoch_started=started)
    for rec in rows:
        agg.add(rec)
    return agg


def same(a: Aggregates, b: Aggregates) -> None:
    def tallies(table: dict[str, object]) -> dict[str, tuple[object, ...]]:
        # Costs are float sums taken in another order: equal to the last few bits.
        return {k: tuple(pytest.approx(x, rel=1e-9) if isinstance(x, float) else x for x in vars(v).values())
                for k, v in table.items()}

    assert tallies({"*": a.totals}) == tallies({"*": b.totals})
    for name in ("by_upstream", "by_model", "by_type", "by_user"):
        assert tallies(getattr(a, name)) == tallies(getattr(b, name)), name
    assert {k: v for k, v in a.outcomes.items() if v} == {k: v for k, v in b.outcomes.items() if v}
    for name in ("latency", "ttft"):
        ha, hb = getattr(a, name), getattr(b, name)
        assert (ha.buckets, ha.count) == (hb.buckets, hb.count) and ha.sum == pytest.approx(hb.sum), name
    assert (a.last_request, a.user_last_seen, a.chat_messages, a.fallbacks, a.attempts) == \
           (b.last_request, b.user_last_seen, b.chat_messages, b.fallbacks, b.attempts)
    assert (a.cache_hits, a.saved_tokens) == (b.cache_hits, b.saved_tokens)
    assert a.saved_usd == pytest.approx(b.saved_usd, rel=1e-9)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_the_epoch_from_rollups_is_the_epoch_from_rows(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    rows = random_rows(rng, 3000, 9 * 86400)           # nine days, so whole days, hours and edges
    cut = rng.randint(200, 2800)                       # a stats reset somewhere in the middle
    reset_at = rows[cut - 1].ts + 0.001
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.open(START - 10)
    for rec in rows[:cut]:
        ledger.append(rec)
    ledger.new_epoch(reset_at)
    for rec in rows[cut:]:
        ledger.append(rec)
    await ledger.flush()
    ledger.close()

    started, summary = ledger.epoch_summary()
    assert started == reset_at
    same(Aggregates.from_summary(started, summary), replayed(started, rows[cut:]))
    started, summary = ledger.epoch_summary(1)      # the epoch before the reset
    same(Aggregates.from_summary(started, summary), replayed(START - 10, rows[:cut]))


def rollup_tables(path: Path) -> dict[str, dict[tuple[object, ...], list[object]]]:
    """Every rollup table's rows, by their values other than floats; float sums beside them,
    compared to the last few bits (added in another grouping)."""
    conn = sqlite3.connect(path)
    try:
        tables: dict[str, dict[tuple[object, ...], list[object]]] = {}
        for span in rollups.SPANS:
            for table in ("rollup", "users", "latency"):
                rows = tables[f"{table}_{span}"] = {}
                for row in conn.execute(f"SELECT * FROM {table}_{span}"):
                    key = tuple(v for v in row if not isinstance(v, float))
                    assert key not in rows
                    rows[key] = [pytest.approx(v, rel=1e-12) for v in row if isinstance(v, float)]
        return tables
    finally:
        conn.close()


@pytest.mark.parametrize("seed", [4, 5])
async def test_the_writer_and_the_back_fill_sum_alike(tmp_path: Path, seed: int) -> None:
    """The writer sums its rows in Python (`add_rows`), the back-fill of an older ledger in SQL
    (`add_range`): the same rows give the same tables, to the row, whatever the batches, with
    times on and a hair either side of hour and day boundaries."""
    rng = random.Random(seed)
    rows = random_rows(rng, 1500, 3 * 86400)
    edges = [day * 86400 + delta for day in (19675, 19676) for delta in (-1e-6, 0.0, 1e-6, -3600.0, 3600.0 - 1e-9)]
    rows += [replace(row, ts=ts) for row, ts in zip(rng.sample(rows, len(edges)), edges)]
    rows.sort(key=lambda row: row.ts)
    cut = 700
    written = Ledger(tmp_path / "written.sqlite3")
    written.open(START - 10)
    for i, rec in enumerate(rows):
        if i == cut:
            written.new_epoch(rec.ts)
        written.append(rec)
        if rng.random() < 0.02:                     # batches of many sizes, some across hours
            await written.flush()
    await written.flush()
    written.close()

    filled = tmp_path / "filled.sqlite3"
    empty = Ledger(filled)
    empty.open(START - 10)
    empty.close()
    conn = sqlite3.connect(filled, isolation_level=None)
    columns = tuple(f.name for f in fields(CallRecord))
    conn.executemany(f"INSERT INTO calls ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                     [tuple(getattr(rec, c) for c in columns) for rec in rows])
    conn.execute("INSERT INTO epochs (started, after_call) VALUES (?, ?)", (rows[cut].ts, cut))
    conn.execute("PRAGMA user_version = 0")
    rollups.backfill(conn)
    conn.close()

    written_tables, filled_tables = rollup_tables(tmp_path / "written.sqlite3"), rollup_tables(filled)
    assert written_tables == filled_tables
    assert all(filled_tables.values()) and sum(len(t) for t in filled_tables.values()) > 3000


def test_a_burst_of_many_users_is_written_in_a_few_statements(tmp_path: Path) -> None:
    """The writer's thread takes the GIL back after every statement it runs, and under a busy
    event loop each time can cost it up to a switch interval: its statements a transaction, not
    its rows, are what keep the ledger within 100 ms of the calls (bench/crash_lag.py). 500 calls
    of 500 users, each in its own latency bucket, spread over two hours, are a handful of
    statements, not one per user and bucket."""
    now = START - 10
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.open(now)
    ledger.close()
    rows = [CallRecord(ts=START + i * 14.4, upstream="cloud", model="gpt-4o", dialect="openai", endpoint="chat",
                       type="chat", user=f"52155{i:08d}", stream=True, status=200, outcome="ok", prompt_tokens=20,
                       completion_tokens=i, cached_tokens=0, estimated=False, latency_s=0.01 * 1.03 ** i,
                       ttft_s=0.001 * 1.03 ** i, cost_usd=0.0001) for i in range(500)]
    steps: list[str] = []
    conn = sqlite3.connect(tmp_path / "ledger.sqlite3", isolation_level=None)
    conn.set_trace_callback(steps.append)
    conn.execute("BEGIN IMMEDIATE")
    Ledger._write(conn, [*rows])
    conn.execute("COMMIT")
    assert len(steps) <= 60, f"{len(steps)} statements for 500 rows"
    for table in ("users_hour", "users_day", "users_epoch"):
        assert conn.execute(f"SELECT COUNT(*), SUM(requests) FROM {table}").fetchone() == (500, 500)
    assert conn.execute("SELECT COUNT(*) FROM latency_hour").fetchone()[0] > 500
    conn.close()


def test_each_rollup_table_takes_one_statement_a_transaction(tmp_path: Path) -> None:
    """A busy writer's usual transaction: 80 calls of one kind, their latencies in 15 buckets, a
    limit's admission for each. Each rollup table and the admissions take one statement, filled
    up with rows that add nothing, instead of one per bit of their count (8 + 4 + 2 + 1 buckets):
    every statement is a hand-off of the GIL between the writer and the event loop. The sums are
    still exact."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.open(START - 10)
    ledger.close()
    latencies = [0.002 * 1.09 ** (i % 15) for i in range(80)]
    rows = [CallRecord(ts=START + i * 0.01, upstream="cloud", model="gpt-4o", dialect="openai", endpoint="chat",
                       type="chat", user=None, stream=False, status=200, outcome="ok", prompt_tokens=25,
                       completion_tokens=12, cached_tokens=0, estimated=False, latency_s=latency, ttft_s=None,
                       cost_usd=0.0015, admission=f"k{i}") for i, latency in enumerate(latencies)]
    admissions = [Admission(f"k{i}", START + i * 0.01, "cloud", "gpt-4o", None, None, 40) for i in range(80)]
    steps: list[str] = []
    conn = sqlite3.connect(tmp_path / "ledger.sqlite3", isolation_level=None)
    conn.set_trace_callback(steps.append)
    conn.execute("BEGIN IMMEDIATE")
    Ledger._write(conn, [*admissions, *rows])
    conn.execute("COMMIT")
    tables = [found.group(1) for step in steps if (found := re.match(r"INSERT (?:OR IGNORE )?INTO (\w+)", step))]
    assert {table: tables.count(table) for table in set(tables) if table != "calls"} == {
        "admissions": 1, "rollup_hour": 1, "rollup_day": 1, "rollup_epoch": 1,
        "latency_hour": 1, "latency_day": 1, "latency_epoch": 1}, steps
    assert conn.execute("SELECT COUNT(*) FROM admissions").fetchone()[0] == 80
    for span in rollups.SPANS:
        assert conn.execute(f"SELECT requests, prompt_tokens, cost_usd FROM rollup_{span}").fetchall() == [
            (80, 2000, sum(row.cost_usd for row in rows))]
        assert conn.execute(f"SELECT COUNT(*), SUM(n) FROM latency_{span}").fetchone() == (15, 80)
    conn.close()


async def test_an_older_ledger_is_back_filled_once_even_if_killed(tmp_path: Path, raw_config: dict[str, Any]) -> None:
    """`tollgate serve` on a ledger an older version left (no rollups), killed in the middle of
    its back-fill, then started again: it carries on from where it stopped, and no row counts twice."""
    sample = random_rows(random.Random(9), 2500, 3 * 86400)
    rows = [replace(rec, ts=rec.ts + 3 * 86400 * copy) for copy in range(104) for rec in sample]  # 260,000
    data = Path(raw_config["server"]["data_dir"])
    path = data / "ledger.sqlite3"
    ledger = Ledger(path)
    ledger.open(START - 10)
    ledger.close()
    conn = sqlite3.connect(path)
    columns = tuple(f.name for f in fields(CallRecord))
    conn.executemany(f"INSERT INTO calls ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                     [tuple(getattr(rec, c) for c in columns) for rec in rows])
    for span in rollups.SPANS:                     # as an older Tollgate left it
        for table in ("rollup", "users", "latency"):
            conn.execute(f"DROP TABLE {table}_{span}")
    conn.execute("DROP TABLE meta")
    conn.execute("INSERT INTO epochs (started, after_call) VALUES (?, 100000)", (rows[100_000].ts,))  # a reset
    conn.execute("PRAGMA user_version = 0")
    conn.commit()
    conn.close()
    config = tmp_path / "config.toml"
    config.write_text(to_toml(raw_config))

    server = Serve(config)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "-c", str(config), "serve",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    while b"back-fill 250,000 rows done" not in (line := await asyncio.wait_for(proc.stderr.readline(), 120)):
        assert line, "serve ended before its back-fill"
    proc.kill()
    await proc.wait()
    progress = sqlite3.connect(path).execute("SELECT value FROM meta WHERE name = 'rollups_upto'").fetchone()
    assert progress is not None and 250_000 <= progress[0] < 260_000

    await server.start()                           # the next start finishes the job, then serves
    assert any("back-filling the hourly and daily rollups from 10,000 rows" in line for line in server.log)
    assert await server.signal(signal.SIGTERM) == 0
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone() == (rollups.VERSION,)
    for epoch, part in ((1, rows[:100_000]), (2, rows[100_000:])):
        started, summary = Ledger(path).epoch_summary(epoch)
        same(Aggregates.from_summary(started, summary), replayed(started, part))


def reference_history(rows: list[CallRecord], bucket: str, filters: Filters, group_by: str | None,
                      tz: ZoneInfo, top_users: int = reports.TOP_USERS) -> tuple[list[dict[str, object]], dict[int, int], dict[str, int]]:
    """The history as the raw rows say it, one row at a time, in plain Python."""
    since = filters.since if filters.since is not None else float("-inf")
    until = filters.until if filters.until is not None else float("inf")
    folded: dict[tuple[float, object], list[float]] = {}
    hours: dict[int, int] = {}
    days: dict[str, int] = {}
    for rec in rows:
        if not rec.final or not since <= rec.ts < until or any(getattr(rec, c) != v for c, v in filters.equals):
            continue
        key = (reports.local_start(rec.ts, bucket, tz), getattr(rec, group_by) if group_by else None)  # type: ignore[arg-type]
        into = folded.setdefault(key, [0, 0, 0, 0.0, 0, 0])
        for i, value in enumerate((1, rec.prompt_tokens, rec.completion_tokens, rec.cost_usd, not rec.ok,
                                   rec.estimated)):
            into[i] += value
        moment = datetime.fromtimestamp(rec.ts, tz)
        hours[moment.hour] = hours.get(moment.hour, 0) + 1
        weekday = moment.strftime("%A").lower()
        days[weekday] = days.get(weekday, 0) + 1
    if group_by == "user":   # the period's busiest users, the rest as OTHERS
        totals: dict[object, float] = {}
        for (_, grp), v in folded.items():
            if grp is not None:           # the calls that named no user are their own group
                totals[grp] = totals.get(grp, 0) + v[0]
        top = set(sorted(totals, key=lambda u: (-totals[u], str(u)))[:top_users]) | {None}
        merged: dict[tuple[float, object], list[float]] = {}
        for (start, grp), v in folded.items():
            into = merged.setdefault((start, grp if grp in top or len(totals) <= top_users else OTHERS),
                                     [0, 0, 0, 0.0, 0, 0])
            for i, value in enumerate(v):
                into[i] += value
        folded = merged
    buckets = [{"start": start, "group": grp, "requests": int(v[0]), "prompt_tokens": int(v[1]),
                "completion_tokens": int(v[2]), "cost_usd": pytest.approx(v[3], abs=2e-6), "errors": int(v[4]),
                "estimated_calls": int(v[5])} for (start, grp), v in folded.items()]
    return sorted(buckets, key=lambda b: (b["start"], str(b["group"]))), hours, days


@pytest.mark.parametrize("zone", ["UTC", "America/Mexico_City", "America/New_York", "Asia/Tokyo",
                                  "Asia/Kolkata", "Australia/Lord_Howe"])
async def test_history_from_rollups_is_the_history_from_rows(tmp_path: Path, zone: str) -> None:
    """Across DST changes (New York, Lord Howe's half hour), and in zones whose hours are not UTC
    hours (Kolkata: raw rows, by quarter-hour), for every bucket, grouping and filter."""
    tz = ZoneInfo(zone)
    rng = random.Random(zone)
    first = 1_695_168_000.0 + 777.7                 # 2023-09-20, two months across two DST changes
    users = [*USERS, *(f"u{i}" for i in range(80))]  # more than a history by user names
    rows = [replace(rec, ts=first + (rec.ts - START) * 7) for rec in random_rows(rng, 1500, 9 * 86400, users)]
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.open(first)
    for rec in rows:
        ledger.append(rec)
    await ledger.flush()
    ledger.close()
    periods = [(None, None), (first + 86400 * 3.3, first + 86400 * 40.7), (first + 5000.5, None)]
    for since, until in periods:
        for bucket in ("hour", "day"):
            for group_by, equals in ((None, ()), ("upstream", ()), ("model", (("type", "chat"),)),
                                     ("type", ()), ("user", ()), (None, (("user", "ana"),)),
                                     ("user", (("model", "gpt-4o"),))):
                filters = Filters(since, until, equals)  # type: ignore[arg-type]
                got = reports.history(ledger, bucket, filters, group_by, tz, rows[-1].ts + 1)  # type: ignore[arg-type]
                buckets, hours, days = reference_history(rows, bucket, filters, group_by, tz)
                said = [{"start": b["start"], "group": b.get(group_by) if group_by else None,
                         **{k: b[k] for k in ("requests", "prompt_tokens", "completion_tokens", "cost_usd",
                                              "errors", "estimated_calls")}} for b in got["buckets"]]
                where = (since, until, bucket, group_by, equals)
                assert said == buckets, where
                assert {h["hour"]: h["requests"] for h in got["busiest_hours"]} == hours, where
                assert {d["weekday"]: d["requests"] for d in got["busiest_weekdays"]} == days, where


async def test_retention_prunes_old_rows_and_keeps_their_sums(raw_config: dict[str, Any], clock: Clock) -> None:
    """keep_raw_days = 2: rows older than two days go, in small batches; /stats, history and the
    projection still count them; the export says from when it has rows."""
    rows = random_rows(random.Random(4), 3000, 6 * 86400)
    rows = [replace(rec, ts=clock.now - 6 * 86400 + (rec.ts - START)) for rec in rows]
    data = Path(raw_config["server"]["data_dir"])
    ledger = Ledger(data / "ledger.sqlite3")
    ledger.open(rows[0].ts - 1)
    for rec in rows:
        ledger.append(rec)
    await ledger.flush()
    ledger.close()
    everything = Proxy(raw_config, clock)
    await everything.start()
    before = await settled(everything)
    month = Filters(since=clock.now - 10 * 86400)
    history_before = reports.history(everything.ledger, "day", month, "model", ZoneInfo("UTC"), clock.now)
    await everything.stop()

    raw_config["ledger"] = {"keep_raw_days": 2}
    proxy = Proxy(raw_config, clock)
    await proxy.start()
    cutoff = clock.now - 2 * 86400
    for _ in range(100):                             # each flush waits for the writer's next batch
        await proxy.ledger.flush()
        if (proxy.ledger.raw_since() or 0) >= cutoff:
            break
    kept = [rec for rec in rows if rec.ts >= cutoff]
    assert proxy.ledger.raw_since() == min(rec.ts for rec in kept)
    assert proxy.ledger.pruned >= len(rows) - len(kept)
    after = await settled(proxy)
    for figure in ("total_requests", "tokens", "errores", "costo_estimado_usd", "requests_por_tipo"):
        assert after[figure] == before[figure], figure
    history_after = reports.history(proxy.ledger, "day", month, "model", ZoneInfo("UTC"), clock.now)
    # Whole hours come from the rollups, pruned or not; only partial hours at the ends need rows.
    assert history_after["buckets"] == history_before["buckets"] and len(history_after["buckets"]) >= 7
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/stats/export.csv") as r:
            exported = (await r.text()).splitlines()
            since = r.headers["X-Tollgate-Rows-Since"]
    await proxy.stop()
    assert len(exported) == 1 + len(kept)
    assert datetime.fromisoformat(since).timestamp() == pytest.approx(min(rec.ts for rec in kept), abs=1e-3)


def test_only_the_storage_modules_know_the_engine() -> None:
    """Reports, accounting, metrics, the app and the CLI use a LedgerStore from ledger.ledger_for,
    a WindowStore from limits.windows_for and a CacheStore from cache.store_for: an engine (SQLite or PostgreSQL, memory or Redis)
    is a module of its own and one line in its factory, known to nothing else."""
    import ast

    root = Path(__file__).resolve().parent.parent / "proxy"
    engine_modules = {"sqlite", "sqlite_rollups", "postgresql", "postgresql_rollups", "outbox", "memory", "shared",
                      "redis_windows", "sqlite_store", "redis_store"}
    for path in root.rglob("*.py"):
        if path.parent.name in ("ledger", "limits", "cache"):
            continue
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in node.names} | {part for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                                                for part in (node.module or "").split(".")}
        assert not imported & ({"sqlite3", "psycopg", "redis", "Ledger", "PgLedger", "Limiter", "SharedLimiter"}
                               | engine_modules), \
            path.name


async def test_a_ledger_from_before_the_cache_is_brought_up_to_date(tmp_path: Path) -> None:
    """A ledger an older Tollgate left, without the columns and sums of what the cache saved,
    opens, keeps its rows, and books cache hits from then on."""
    path = tmp_path / "ledger.sqlite3"
    rows = random_rows(random.Random(11), 400, 86400)
    old = [replace(rec, outcome="ok", saved_tokens=0, saved_usd=0.0) if rec.outcome == "cache_hit" else rec
           for rec in rows]
    ledger = Ledger(path)
    ledger.open(START - 10)
    for rec in old:
        ledger.append(rec)
    ledger.close()
    conn = sqlite3.connect(path)
    for span in rollups.SPANS:                     # as the version before the cache left them
        for name, _ in rollups.ADDED_SUMS:
            conn.execute(f"ALTER TABLE rollup_{span} DROP COLUMN {name}")
    conn.execute("ALTER TABLE calls DROP COLUMN saved_tokens")
    conn.execute("ALTER TABLE calls DROP COLUMN saved_usd")
    conn.commit()
    conn.close()

    hits = [replace(rec, ts=rec.ts + 86400, outcome="cache_hit", prompt_tokens=0, completion_tokens=0,
                    cost_usd=0.0, saved_tokens=100 + n, saved_usd=0.001, final=True)
            for n, rec in enumerate(rows[:50])]
    ledger = Ledger(path)
    ledger.open(START)
    for rec in hits:
        ledger.append(rec)
    ledger.close()
    started, summary = Ledger(path).epoch_summary(1)
    books = Aggregates.from_summary(started, summary)
    same(books, replayed(started, old + hits))
    assert (books.cache_hits, books.saved_tokens) == (50, sum(100 + n for n in range(50)))
