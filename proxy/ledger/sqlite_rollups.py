"""The ledger's hourly, daily and per-epoch sums, kept by the writer in the same transaction as
the rows.

A report's cost must follow the period it asks for, not the ledger's size: a year of calls is
8,760 hours, however many calls they held. So for every UTC hour, UTC day and stats epoch the
writer keeps one row per (upstream, model, type, endpoint, key, outcome, fallback origin, final,
whether the call named its user) with the sums /stats and the history need, one row per user,
and the latency and time-to-first-token histograms in the same log buckets the live aggregates
use (histogram.bucket_index). A reader takes whole hours and days from here and only the
partial hours at the edges from raw rows.

The writer sums the rows it has just inserted in Python, from the tuples still in its hands
(`add_rows`). A ledger an older version left is back-filled once in SQL, 250,000 rows a chunk, where
SQLite's GROUP BY is the faster of the two (`add_range`; each chunk committed with the id it
reached, so an interrupted back-fill resumes where it stopped; `PRAGMA user_version` says it is
done). tests/test_rollups.py holds both to the same sums, and both to the raw rows.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from operator import itemgetter
from typing import Any

from ..histogram import _BASE, _FLOOR, bucket_index
from . import COLUMNS, IS_ERROR_SQL, LATENCY, OTHERS, SUCCESSES, TTFT, Summary
from .sqlite_rows import write_many

log = logging.getLogger("tollgate.ledger")

HOUR, DAY = 3600, 86400
VERSION = 2          # PRAGMA user_version once the rollups hold every row
CHUNK = 250_000      # rows per back-fill transaction

# What identifies a rollup row besides its bucket; NULLs are stored as "" so the key is unique.
# `named`: the call named its user (the calls of users the per-user tables hold).
KEY = ("upstream", "model", "type", "endpoint", "key_id", "outcome", "fallback_from", "final", "named")
SUMS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "estimated_calls", "estimated_tokens",
        "cost_usd", "latency_sum", "ttft_count", "ttft_sum", "saved_tokens", "saved_usd")
# The sums added after the first release (what the cache saved), with their SQL types.
ADDED_SUMS = (("saved_tokens", "INTEGER"), ("saved_usd", "REAL"))
_REAL = ("cost_usd", "latency_sum", "ttft_sum", "saved_usd")
USER_SUMS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens", "estimated_calls",
             "estimated_tokens", "cost_usd")


def _tables(span: str) -> str:
    return f"""
CREATE TABLE IF NOT EXISTS rollup_{span} (
    bucket INTEGER NOT NULL, {', '.join(f'{k} {"INTEGER" if k in ("final", "named") else "TEXT"} NOT NULL' for k in KEY)},
    {', '.join(f'{s} {"REAL" if s in _REAL else "INTEGER"} NOT NULL' for s in SUMS)},
    last_ts REAL NOT NULL,
    PRIMARY KEY (bucket, {', '.join(KEY)})
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS users_{span} (
    bucket INTEGER NOT NULL, user TEXT NOT NULL,
    {', '.join(f'{s} {"REAL" if s == "cost_usd" else "INTEGER"} NOT NULL' for s in USER_SUMS)},
    last_ts REAL NOT NULL,
    PRIMARY KEY ({"user, bucket" if span == "hour" else "bucket, user"})
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS latency_{span} (
    bucket INTEGER NOT NULL, kind INTEGER NOT NULL, idx INTEGER NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (bucket, kind, idx)
) WITHOUT ROWID;
"""


# The epoch tables' "bucket" is the stats epoch's id: /stats since a reset is one lookup.
SPANS = ("hour", "day", "epoch")
SCHEMA = "".join(_tables(span) for span in SPANS) + """
-- A user's hours lie together (a history names a few users' hours); ranking users over a few
-- hours, and retention, go by hour through this index, which carries what ranking reads.
CREATE INDEX IF NOT EXISTS users_hour_bucket ON users_hour(bucket, user, requests);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value) WITHOUT ROWID;
"""


def _upsert(table: str, key: tuple[str, ...], sums: tuple[str, ...], last_ts: bool) -> tuple[str, str]:
    """An upsert that adds to what a row holds: its INSERT head and its ON CONFLICT tail, for a
    SELECT or VALUES to go between."""
    columns = ("bucket", *key, *sums) + (("last_ts",) if last_ts else ())
    updates = [f"{s} = {s} + excluded.{s}" for s in sums]
    if last_ts:
        updates.append("last_ts = MAX(last_ts, excluded.last_ts)")
    return f"INSERT INTO {table} ({', '.join(columns)})", f"ON CONFLICT DO UPDATE SET {', '.join(updates)}"


_UPSERT = {span: (_upsert(f"rollup_{span}", KEY, SUMS, True), _upsert(f"users_{span}", ("user",), USER_SUMS, True),
                  _upsert(f"latency_{span}", ("kind", "idx"), ("n",), False)) for span in SPANS}


def _fold_sql(span: str, size: int, bucket_of: str) -> list[str]:
    """Statements folding the call rows with lo < id <= hi into one span's tables, in SQLite's C.
    `bucket_of` names the SQL that gives a latency's histogram bucket."""
    bucket = f"CAST(ts / {size} AS INTEGER)" if size else ":epoch"
    sums = ("COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens), SUM(estimated), "
            "SUM(CASE WHEN estimated THEN prompt_tokens + completion_tokens ELSE 0 END), SUM(cost_usd), "
            "SUM(latency_s), COUNT(ttft_s), TOTAL(ttft_s), SUM(saved_tokens), SUM(saved_usd), MAX(ts)")
    key = ("upstream, model, type, endpoint, COALESCE(key_id, ''), outcome, COALESCE(fallback_from, ''), final, "
           "user IS NOT NULL")
    (rollup, rollup_tail), (users, users_tail), (latency, latency_tail) = _UPSERT[span]
    user_sums = (f"COUNT(*), SUM({IS_ERROR_SQL}), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens), "
                 "SUM(estimated), SUM(CASE WHEN estimated THEN prompt_tokens + completion_tokens ELSE 0 END), "
                 "SUM(cost_usd), MAX(ts)")
    rows = "FROM calls WHERE id > :lo AND id <= :hi"
    return [
        f"{rollup} SELECT {bucket}, {key}, {sums} {rows} GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 {rollup_tail}",
        f"{users} SELECT {bucket}, user, {user_sums} {rows} AND final = 1 AND user IS NOT NULL "
        f"GROUP BY 1, 2 {users_tail}",
        f"{latency} SELECT {bucket}, {LATENCY}, {bucket_of.format('latency_s')}, COUNT(*) {rows} AND final = 1 "
        f"GROUP BY 1, 3 {latency_tail}",
        f"{latency} SELECT {bucket}, {TTFT}, {bucket_of.format('ttft_s')}, COUNT(*) {rows} AND final = 1 "
        f"AND ttft_s IS NOT NULL GROUP BY 1, 3 {latency_tail}",
    ]


# histogram.bucket_index in SQL: SQLite's ln and floor call the same C library as Python's
# math.log and math.floor, so the buckets are the same to the last bit. A SQLite built without
# its math functions calls bucket_index itself (a call per row, each taking the GIL back).
_BUCKET_SQL = f"CAST(floor(ln(max({{}}, {_FLOOR!r})) / ln({_BASE!r})) AS INTEGER)"
_BUCKET_UDF = "tollgate_bucket({})"
_FOLD = {bucket_of: [statement for span, size in (("hour", HOUR), ("day", DAY), ("epoch", 0))
                     for statement in _fold_sql(span, size, bucket_of)] for bucket_of in (_BUCKET_SQL, _BUCKET_UDF)}


def _bucket_of(conn: sqlite3.Connection) -> str:
    try:
        conn.execute("SELECT ln(1.0), floor(1.5)").fetchone()
    except sqlite3.OperationalError:
        conn.create_function("tollgate_bucket", 1, bucket_index, deterministic=True)
        return _BUCKET_UDF
    return _BUCKET_SQL


# Where each column sits in a call row as the writer binds it (ledger.COLUMNS' order).
_AT = {name: i for i, name in enumerate(COLUMNS)}
_TS, _OUTCOME = _AT["ts"], _AT["outcome"]
_PROMPT, _COMPLETION, _CACHED = _AT["prompt_tokens"], _AT["completion_tokens"], _AT["cached_tokens"]
_ESTIMATED, _LATENCY_S, _TTFT_S, _COST = _AT["estimated"], _AT["latency_s"], _AT["ttft_s"], _AT["cost_usd"]
_SAVED_TOKENS, _SAVED_USD = _AT["saved_tokens"], _AT["saved_usd"]
_KEY_PARTS = itemgetter(_AT["upstream"], _AT["model"], _AT["type"], _AT["endpoint"], _AT["key_id"], _AT["outcome"],
                        _AT["fallback_from"], _AT["final"], _AT["user"])


def _sums(rows: list[tuple[Any, ...]]) -> list[Any]:
    """SUMS and last_ts of one group's rows, each column summed in row order as SQL's SUM would."""
    columns = list(zip(*rows))
    prompt, completion, estimated, ttft = columns[_PROMPT], columns[_COMPLETION], columns[_ESTIMATED], columns[_TTFT_S]
    timed = [t for t in ttft if t is not None]
    return [len(rows), sum(prompt), sum(completion), sum(columns[_CACHED]), sum(estimated),
            sum(p + c for p, c, e in zip(prompt, completion, estimated) if e), sum(columns[_COST]),
            sum(columns[_LATENCY_S]), len(timed), sum(timed, 0.0), sum(columns[_SAVED_TOKENS]),
            sum(columns[_SAVED_USD]), max(columns[_TS])]


def _user_sums(rows: list[tuple[Any, ...]]) -> list[Any]:
    columns = list(zip(*rows))
    prompt, completion, estimated = columns[_PROMPT], columns[_COMPLETION], columns[_ESTIMATED]
    return [len(rows), sum(1 for outcome in columns[_OUTCOME] if outcome not in SUCCESSES), sum(prompt),
            sum(completion), sum(columns[_CACHED]), sum(estimated),
            sum(p + c for p, c, e in zip(prompt, completion, estimated) if e), sum(columns[_COST]), max(columns[_TS])]


def _added(a: list[Any], b: list[Any]) -> list[Any]:
    """Two groups' sums as one: each sum added, the last (a time) the later of the two."""
    return [*(x + y for x, y in zip(a[:-1], b[:-1])), max(a[-1], b[-1])]


def add_rows(conn: sqlite3.Connection, rows: list[tuple[Any, ...]], epoch: int) -> None:
    """Add the writer's rows (of stats epoch `epoch`, as bound for their insert) to the hourly,
    daily and epoch tables, in a few statements.

    The rows are grouped in Python, each group summed column by column in C: a batch costs the
    writer's thread one pass over rows it already holds, instead of the dozen statements of
    `add_range`, each reading the rows back and grouping them again (36 of the writer's 83 µs a
    call under bench/profile.py's load). The hour and day of a row are worked out as SQLite's
    CAST(ts / 3600 AS INTEGER) would, and each float column is summed in row order, as SUM does."""
    # Keyed by (hour, day, KEY...), (hour, day, user) and (hour, day, kind, bucket index).
    calls: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
    users: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
    latency: dict[tuple[int, int, int, int], int] = {}
    for row in rows:
        ts = row[_TS]
        hour, day = int(ts / HOUR), int(ts / DAY)
        upstream, model, kind, endpoint, key_id, outcome, fallback_from, final, user = _KEY_PARTS(row)
        key = (hour, day, upstream, model, kind, endpoint, key_id or "", outcome, fallback_from or "",
               1 if final else 0, 0 if user is None else 1)
        group = calls.get(key)
        if group is None:
            calls[key] = [row]
        else:
            group.append(row)
        if not final:
            continue
        if user is not None:
            group = users.get(who := (hour, day, user))
            if group is None:
                users[who] = [row]
            else:
                group.append(row)
        at = (hour, day, LATENCY, bucket_index(row[_LATENCY_S]))
        latency[at] = latency.get(at, 0) + 1
        if (ttft := row[_TTFT_S]) is not None:
            at = (hour, day, TTFT, bucket_index(ttft))
            latency[at] = latency.get(at, 0) + 1
    call_sums = {key: _sums(group) for key, group in calls.items()}
    user_sums = {key: _user_sums(group) for key, group in users.items()}
    for span, (rollup, users_sql, latency_sql) in _UPSERT.items():
        def bucket(hour: int, day: int) -> int:
            return hour if span == "hour" else day if span == "day" else epoch

        for sql, sums_by_group in ((rollup, call_sums), (users_sql, user_sums)):
            merged: dict[tuple[Any, ...], list[Any]] = {}
            for (hour, day, *rest), sums in sums_by_group.items():
                at = (bucket(hour, day), *rest)
                held = merged.get(at)
                merged[at] = sums if held is None else _added(held, sums)
            if merged:
                # Nothing: the first key again, its sums zero and its last time the same.
                at, sums = next(iter(merged.items()))
                write_many(conn, sql[0], [(*at, *sums) for at, sums in merged.items()], sql[1],
                           nothing=(*at, *[0] * (len(sums) - 1), sums[-1]))
        counts: dict[tuple[int, int, int], int] = {}
        for (hour, day, kind, index), n in latency.items():
            spot = (bucket(hour, day), kind, index)
            counts[spot] = counts.get(spot, 0) + n
        if counts:
            write_many(conn, latency_sql[0], [(*spot, n) for spot, n in counts.items()], latency_sql[1],
                       nothing=(*next(iter(counts)), 0))


def add_columns(conn: sqlite3.Connection) -> None:
    """Give the rollups of an older ledger the sums added since (zero for the rows before them,
    which saved nothing)."""
    for span in SPANS:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info(rollup_{span})")}
        for name, kind in ADDED_SUMS:
            if name not in have:
                conn.execute(f"ALTER TABLE rollup_{span} ADD COLUMN {name} {kind} NOT NULL DEFAULT 0")


def add_range(conn: sqlite3.Connection, lo: int, hi: int, epoch: int) -> None:
    """Fold the call rows lo < id <= hi, all of stats epoch `epoch`, into the hourly, daily and
    epoch rollups: the back-fill's step over a chunk of an older ledger, in SQLite's C, a dozen
    statement steps however many rows. The same sums `add_rows` makes."""
    for statement in _FOLD[_bucket_of(conn)]:
        conn.execute(statement, {"lo": lo, "hi": hi, "epoch": epoch})


def backfill(conn: sqlite3.Connection) -> None:
    """Bring the rollups up to every row written before they existed. Each chunk commits with the
    last id it covered, so an interrupted back-fill picks up where it stopped, and never counts a
    row twice. New rows are not written meanwhile: this runs before the writer starts. The sums
    are `add_range`'s, in SQL; tests/test_rollups.py holds them to the writer's (`add_rows`)."""
    if conn.execute("PRAGMA user_version").fetchone()[0] >= VERSION:
        return
    done = conn.execute("SELECT value FROM meta WHERE name = 'rollups_upto'").fetchone()
    upto = int(done[0]) if done else 0
    last = conn.execute("SELECT COALESCE(MAX(id), 0) FROM calls").fetchone()[0]
    if last > upto:
        total = conn.execute("SELECT COUNT(*) FROM calls WHERE id > ?", (upto,)).fetchone()[0]
        log.info("ledger: back-filling the hourly and daily rollups from %s rows (once; safe to interrupt)",
                 f"{total:,}")
    began, covered = time.monotonic(), 0
    while upto < last:
        # The id CHUNK rows on: ids have gaps where rows were pruned, so count rows, not ids.
        rows, hi = conn.execute(f"SELECT COUNT(*), MAX(id) FROM (SELECT id FROM calls WHERE id > ? ORDER BY id "
                                f"LIMIT {CHUNK})", (upto,)).fetchone()
        if hi is None:
            break
        conn.execute("BEGIN IMMEDIATE")
        # Each epoch holds the rows after its after_call, up to the next epoch's.
        epochs = conn.execute("SELECT id, after_call FROM epochs ORDER BY id").fetchall()
        for (epoch, first), (_, end) in zip(epochs, [*epochs[1:], (None, hi)]):
            lo, top = max(upto, first), min(hi, end)
            if top > lo:
                add_range(conn, lo, top, epoch)
        covered += rows
        upto = hi
        conn.execute("INSERT INTO meta (name, value) VALUES ('rollups_upto', ?) "
                     "ON CONFLICT DO UPDATE SET value = excluded.value", (upto,))
        conn.execute("COMMIT")
        log.info("ledger: back-fill %s rows done (up to row %s) in %.1f s", f"{covered:,}", f"{upto:,}",
                 time.monotonic() - began)
    conn.execute(f"PRAGMA user_version = {VERSION}")


# --- reading -------------------------------------------------------------------------------


def spans(start_hour: int, end_hour: int) -> list[tuple[str, int, int]]:
    """Whole hours [start_hour, end_hour) as (table span, first bucket, end bucket): whole UTC
    days from the day tables, the hours around them from the hour tables."""
    first_day, end_day = -(-start_hour // 24), end_hour // 24
    if end_day <= first_day:
        return [("hour", start_hour, end_hour)] if end_hour > start_hour else []
    out = [("day", first_day, end_day)]
    if first_day * 24 > start_hour:
        out.append(("hour", start_hour, first_day * 24))
    if end_hour > end_day * 24:
        out.append(("hour", end_day * 24, end_hour))
    return out


def user_history(conn: sqlite3.Connection, start: int, end: int, edge_totals: dict[str, int],
                 top: int) -> tuple[list[tuple[Any, ...]], set[str]]:
    """History pieces by user for the whole hours [start, end), the period's `top` busiest users
    named and the rest summed as OTHERS per hour, the calls that named no user as None; and the
    set of users named. `edge_totals` are the requests per user in the raw partial hours, so the
    ranking is over the exact period. Cost: the period's daily per-user rows to rank, then only
    the named users' hours (an index on user), not every user's every hour."""
    kept = conn.execute("SELECT value FROM meta WHERE name = 'hourly_detail_from'").fetchone()
    start = max(start, int(kept[0])) if kept is not None else start
    totals = dict(edge_totals)
    for span, first, last in spans(start, end):
        for user, requests in conn.execute(f"SELECT user, SUM(requests) FROM users_{span} "
                                           "WHERE bucket >= ? AND bucket < ? GROUP BY user", (first, last)):
            totals[user] = totals.get(user, 0) + requests
    named = set(sorted(totals, key=lambda u: (-totals[u], u))[:top])
    sums = "SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_usd)"
    pieces: list[tuple[Any, ...]] = []
    if named:
        marks = ", ".join("?" * len(named))
        pieces += conn.execute(
            f"SELECT bucket * {HOUR}, user, requests, prompt_tokens, completion_tokens, cost_usd, errors, "
            f"estimated_calls FROM users_hour WHERE user IN ({marks}) AND bucket >= ? AND bucket < ?",
            (*named, start, end)).fetchall()
        # Each hour's sum over the named users, added up by SQLite rather than piece by piece.
        by_hour = {row[0]: row[1:] for row in conn.execute(
            f"SELECT bucket * {HOUR}, {sums}, SUM(errors), SUM(estimated_calls) FROM users_hour "
            f"WHERE user IN ({marks}) AND bucket >= ? AND bucket < ? GROUP BY bucket", (*named, start, end))}
    else:
        by_hour = {}
    errors = f"SUM(CASE WHEN {IS_ERROR_SQL} THEN requests ELSE 0 END)"
    for hour, has_user, *figures in conn.execute(
            f"SELECT bucket * {HOUR}, named, {sums}, {errors}, SUM(estimated_calls) FROM rollup_hour "
            "WHERE bucket >= ? AND bucket < ? AND final = 1 GROUP BY bucket, named", (start, end)):
        if not has_user:
            pieces.append((hour, None, *figures))
            continue
        rest = [total - part for total, part in zip(figures, by_hour.get(hour, (0, 0, 0, 0.0, 0, 0)))]
        if rest[0]:
            pieces.append((hour, OTHERS, *rest))
    return pieces, named


def epoch_summary(conn: sqlite3.Connection, epoch: int) -> Summary:
    """Everything the rollups hold for stats epoch `epoch`: a few hundred rows, however long it is."""
    return Summary(
        conn.execute(f"SELECT {', '.join(KEY)}, {', '.join(SUMS)}, last_ts FROM rollup_epoch WHERE bucket = ?",
                     (epoch,)).fetchall(),
        conn.execute(f"SELECT user, {', '.join(USER_SUMS)}, last_ts FROM users_epoch WHERE bucket = ?",
                     (epoch,)).fetchall(),
        conn.execute("SELECT kind, idx, n FROM latency_epoch WHERE bucket = ?", (epoch,)).fetchall())


def history(conn: sqlite3.Connection, start: int, end: int, equals: tuple[tuple[str, str], ...],
            group_by: str | None) -> list[tuple[Any, ...]]:
    """History pieces (UTC hour start, group, requests, prompt, completion, cost, errors,
    estimated calls) for the whole hours [start, end), calls only (no attempts)."""
    sums = ("SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_usd), {errors}, "
            "SUM(estimated_calls)")
    errors = f"SUM(CASE WHEN {IS_ERROR_SQL} THEN requests ELSE 0 END)"
    if group_by == "user" or any(column == "user" for column, _ in equals):
        # Per-user sums; the calls that named no user are the rollups' unnamed ones.
        user = next((value for column, value in equals if column == "user"), None)
        # Retention deletes the hourly per-user sums with the rows: a history by user covers
        # the hours still kept.
        kept = conn.execute("SELECT value FROM meta WHERE name = 'hourly_detail_from'").fetchone()
        start = max(start, int(kept[0])) if kept is not None else start
        where = "bucket >= ? AND bucket < ?" + (" AND user = ?" if user else "")
        params: list[object] = [start, end]
        params += [user] if user else []
        group = "user" if group_by else "NULL"
        pieces = conn.execute(f"SELECT bucket * {HOUR}, {group}, {sums.format(errors='SUM(errors)')} FROM users_hour "
                              f"WHERE {where} GROUP BY bucket, {group}", params).fetchall()
        if group_by and not user:
            pieces += conn.execute(
                f"SELECT bucket * {HOUR}, NULL, {sums.format(errors=errors)} FROM rollup_hour "
                "WHERE bucket >= ? AND bucket < ? AND final = 1 AND named = 0 GROUP BY bucket", (start, end)).fetchall()
        return [tuple(p) for p in pieces]
    clauses = ["bucket >= ?", "bucket < ?", "final = 1"]
    values: list[object] = [start, end]
    for column, value in equals:
        assert column in ("upstream", "model", "type")  # ours, never the client's text
        clauses.append(f"{column} = ?")
        values.append(value)
    group = group_by or "NULL"
    return [tuple(p) for p in conn.execute(
        f"SELECT bucket * {HOUR}, {group}, {sums.format(errors=errors)} FROM rollup_hour "
        f"WHERE {' AND '.join(clauses)} GROUP BY bucket, {group}", values)]


def cost_by_day(conn: sqlite3.Connection, since_day: int) -> dict[int, float]:
    rows = conn.execute("SELECT bucket, SUM(cost_usd) FROM rollup_day WHERE bucket >= ? GROUP BY bucket",
                        (since_day,)).fetchall()
    return {int(day): float(cost) for day, cost in rows}
