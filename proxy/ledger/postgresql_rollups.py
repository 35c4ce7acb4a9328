"""The PostgreSQL ledger's schema, its migrations, and its sums: the same rollups as the SQLite
ledger's (sqlite_rollups.py), written and read in PostgreSQL's SQL.

The schema is a list of versioned steps, applied once per database, in order, under an advisory
lock, whichever process starts first; `tollgate_schema` records each. Call rows live in a table
partitioned by month of `ts` (each month's partition made by the writer before its first row),
so retention drops whole months instead of deleting rows. Every row carries a unique id, the
key of its idempotent insert.
"""

from __future__ import annotations

from typing import Any

import psycopg

from ..histogram import _BASE, _FLOOR
from . import IS_ERROR_SQL, LATENCY, OTHERS, TTFT, Summary
from .sqlite_rollups import ADDED_SUMS, DAY, HOUR, KEY, SUMS, USER_SUMS, spans

# Any 64-bit number the deployment's other programs do not use: the migrations' lock.
MIGRATION_LOCK = 7_461_700_001

CALL_COLUMNS = ("id", "ts", "upstream", "model", "dialect", "endpoint", "type", "user", "stream", "status",
                "outcome", "prompt_tokens", "completion_tokens", "cached_tokens", "estimated", "latency_s", "ttft_s",
                "cost_usd", "fallback_from", "key_id", "admission", "final", "saved_tokens", "saved_usd", "epoch")
CALL_TYPES = ("text", "float8", "text", "text", "text", "text", "text", "text", "bool", "int4", "text", "int4",
              "int4", "int4", "bool", "float8", "float8", "float8", "text", "text", "text", "bool", "int4", "float8",
              "int4")
ADMISSION_COLUMNS = ("key", "ts", "upstream", "model", "user", "key_id", "tokens")


def q(column: str) -> str:
    """A column name as PostgreSQL reads it ("user" is a reserved word)."""
    return f'"{column}"'


# The rollups' sums as version 1 created them; later steps add the rest (ADDED_SUMS).
_FIRST_SUMS = SUMS[:len(SUMS) - len(ADDED_SUMS)]


def _rollup_tables(span: str) -> str:
    keys = ", ".join(f"{q(k)} {'integer' if k in ('final', 'named') else 'text'} NOT NULL" for k in KEY)
    sums = ", ".join(f"{s} {'double precision' if s in ('cost_usd', 'latency_sum', 'ttft_sum') else 'bigint'} NOT NULL"
                     for s in _FIRST_SUMS)
    user_sums = ", ".join(f"{s} {'double precision' if s == 'cost_usd' else 'bigint'} NOT NULL" for s in USER_SUMS)
    user_key = '"user", bucket' if span == "hour" else 'bucket, "user"'
    return f"""
CREATE TABLE rollup_{span} (bucket bigint NOT NULL, {keys}, {sums}, last_ts double precision NOT NULL,
                            PRIMARY KEY (bucket, {', '.join(q(k) for k in KEY)}));
CREATE TABLE users_{span} (bucket bigint NOT NULL, "user" text NOT NULL, {user_sums},
                           last_ts double precision NOT NULL, PRIMARY KEY ({user_key}));
CREATE TABLE latency_{span} (bucket bigint NOT NULL, kind integer NOT NULL, idx integer NOT NULL,
                             n bigint NOT NULL, PRIMARY KEY (bucket, kind, idx));
"""


# Each step runs once, in its own transaction. Never edit a step that has shipped: add one.
MIGRATIONS: tuple[str, ...] = (
    f"""
CREATE TABLE calls (
    id text NOT NULL, ts double precision NOT NULL, upstream text NOT NULL, model text NOT NULL,
    dialect text NOT NULL, endpoint text NOT NULL, type text NOT NULL, "user" text, stream boolean NOT NULL,
    status integer NOT NULL, outcome text NOT NULL, prompt_tokens integer NOT NULL,
    completion_tokens integer NOT NULL, cached_tokens integer NOT NULL, estimated boolean NOT NULL,
    latency_s double precision NOT NULL, ttft_s double precision, cost_usd double precision NOT NULL,
    fallback_from text, key_id text, admission text, final boolean NOT NULL, epoch integer NOT NULL,
    PRIMARY KEY (id, ts)
) PARTITION BY RANGE (ts);
CREATE INDEX calls_ts ON calls (ts);
CREATE INDEX calls_admission ON calls (admission);
CREATE TABLE admissions (key text PRIMARY KEY, ts double precision NOT NULL, upstream text NOT NULL,
                         model text NOT NULL, "user" text, key_id text, tokens integer NOT NULL);
CREATE INDEX admissions_ts ON admissions (ts);
-- An epoch's marker is its unique id: replayed from an outbox, it is written once.
CREATE TABLE epochs (id serial PRIMARY KEY, started double precision NOT NULL, marker text UNIQUE);
CREATE TABLE meta (name text PRIMARY KEY, value text NOT NULL);
{''.join(_rollup_tables(span) for span in ('hour', 'day', 'epoch'))}
CREATE INDEX users_hour_bucket ON users_hour (bucket, "user", requests);
""",
    # 2: what a cache hit saved (issue 13), on the rows and in the sums.
    """
ALTER TABLE calls ADD COLUMN saved_tokens integer NOT NULL DEFAULT 0,
                  ADD COLUMN saved_usd double precision NOT NULL DEFAULT 0;
""" + "".join(f"ALTER TABLE rollup_{span} ADD COLUMN saved_tokens bigint NOT NULL DEFAULT 0, "
               f"ADD COLUMN saved_usd double precision NOT NULL DEFAULT 0;\n" for span in ("hour", "day", "epoch")),
)


def migrate(conn: psycopg.Connection[Any], now: float) -> int:
    """Apply the steps this database lacks, under an advisory lock: of replicas starting together,
    one migrates and the others wait for it, then find nothing to do. Returns the version."""
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS tollgate_schema (version integer PRIMARY KEY, "
                     "applied double precision NOT NULL)")
        row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM tollgate_schema").fetchone()
        done = int(row[0]) if row else 0
        for version, step in enumerate(MIGRATIONS, start=1):
            if version <= done:
                continue
            with conn.transaction():
                conn.execute(step)
                conn.execute("INSERT INTO tollgate_schema (version, applied) VALUES (%s, %s)", (version, now))
        with conn.transaction():
            if conn.execute("SELECT COUNT(*) FROM epochs").fetchone() == (0,):
                conn.execute("INSERT INTO epochs (started, marker) VALUES (%s, 'first')", (now,))
        return len(MIGRATIONS)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


def month_bounds(ts: float) -> tuple[str, float, float]:
    """The partition holding `ts`: its name and its [start, end) in unix seconds (UTC months)."""
    from datetime import datetime, timezone

    when = datetime.fromtimestamp(ts, timezone.utc)
    start = datetime(when.year, when.month, 1, tzinfo=timezone.utc)
    end = datetime(when.year + (when.month == 12), when.month % 12 + 1, 1, tzinfo=timezone.utc)
    return f"calls_{start:%Y_%m}", start.timestamp(), end.timestamp()


# --- the writer's fold: a batch's rows, none written before, into the sums ---

_BUCKET = f"floor(ln(greatest({{}}, {_FLOOR!r})) / ln({_BASE!r}))::integer"


def _upsert(table: str, key: tuple[str, ...], sums: tuple[str, ...], last_ts: bool) -> tuple[str, str]:
    columns = ("bucket", *key, *sums) + (("last_ts",) if last_ts else ())
    updates = [f"{s} = {table}.{s} + excluded.{s}" for s in sums]
    if last_ts:
        updates.append(f"last_ts = greatest({table}.last_ts, excluded.last_ts)")
    conflict = ", ".join(["bucket", *(q(k) for k in key)])
    return (f"INSERT INTO {table} ({', '.join(q(c) for c in columns)})",
            f"ON CONFLICT ({conflict}) DO UPDATE SET {', '.join(updates)}")


def _fold(span: str, size: int, source: str) -> list[str]:
    bucket = f"floor(ts / {size})::bigint" if size else "epoch"
    estimated_tokens = "SUM(CASE WHEN estimated THEN prompt_tokens + completion_tokens ELSE 0 END)"
    sums = (f"COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens), SUM(estimated::int), "
            f"{estimated_tokens}, SUM(cost_usd), SUM(latency_s), COUNT(ttft_s), COALESCE(SUM(ttft_s), 0), "
            f"SUM(saved_tokens), SUM(saved_usd), MAX(ts)")
    key = ("upstream, model, type, endpoint, COALESCE(key_id, ''), outcome, COALESCE(fallback_from, ''), "
           'final::int, ("user" IS NOT NULL)::int')
    user_sums = (f"COUNT(*), SUM(({IS_ERROR_SQL})::int), SUM(prompt_tokens), SUM(completion_tokens), "
                 f"SUM(cached_tokens), SUM(estimated::int), {estimated_tokens}, SUM(cost_usd), MAX(ts)")
    rollup, users, latency = (_upsert(f"rollup_{span}", KEY, SUMS, True),
                              _upsert(f"users_{span}", ("user",), USER_SUMS, True),
                              _upsert(f"latency_{span}", ("kind", "idx"), ("n",), False))
    return [
        f"{rollup[0]} SELECT {bucket}, {key}, {sums} FROM {source} GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 {rollup[1]}",
        f'{users[0]} SELECT {bucket}, "user", {user_sums} FROM {source} WHERE final AND "user" IS NOT NULL '
        f"GROUP BY 1, 2 {users[1]}",
        f"{latency[0]} SELECT {bucket}, {LATENCY}, {_BUCKET.format('latency_s')}, COUNT(*) FROM {source} WHERE final "
        f"GROUP BY 1, 3 {latency[1]}",
        f"{latency[0]} SELECT {bucket}, {TTFT}, {_BUCKET.format('ttft_s')}, COUNT(*) FROM {source} WHERE final "
        f"AND ttft_s IS NOT NULL GROUP BY 1, 3 {latency[1]}",
    ]


# Folding from `staging` (a batch of new rows) or from `fresh` (the rows of a replayed batch that
# were not written before).
FOLD = {source: [statement for span, size in (("hour", HOUR), ("day", DAY), ("epoch", 0))
                 for statement in _fold(span, size, source)] for source in ("staging", "fresh")}


# --- reading -------------------------------------------------------------------------------


def epoch_summary(conn: psycopg.Connection[Any], epoch: int) -> Summary:
    keys = ", ".join(q(k) for k in KEY)
    return Summary(
        [tuple(r) for r in conn.execute(f"SELECT {keys}, {', '.join(SUMS)}, last_ts FROM rollup_epoch "
                                        "WHERE bucket = %s", (epoch,))],
        [tuple(r) for r in conn.execute(f'SELECT "user", {", ".join(USER_SUMS)}, last_ts FROM users_epoch '
                                        "WHERE bucket = %s", (epoch,))],
        [tuple(r) for r in conn.execute("SELECT kind, idx, n FROM latency_epoch WHERE bucket = %s", (epoch,))])


def cost_by_day(conn: psycopg.Connection[Any], since_day: int) -> dict[int, float]:
    return {int(day): float(cost) for day, cost in conn.execute(
        "SELECT bucket, SUM(cost_usd) FROM rollup_day WHERE bucket >= %s GROUP BY bucket", (since_day,))}


def _kept_from(conn: psycopg.Connection[Any], start: int) -> int:
    kept = conn.execute("SELECT value FROM meta WHERE name = 'hourly_detail_from'").fetchone()
    return max(start, int(kept[0])) if kept is not None else start


# SUM of a bigint is a numeric, which arrives as a Decimal: each is cast back to bigint.
_SUMS = "SUM(requests)::bigint, SUM(prompt_tokens)::bigint, SUM(completion_tokens)::bigint, SUM(cost_usd)"
_ERRORS = f"SUM(CASE WHEN {IS_ERROR_SQL} THEN requests ELSE 0 END)::bigint"
_MORE = "SUM(errors)::bigint, SUM(estimated_calls)::bigint"


def history(conn: psycopg.Connection[Any], start: int, end: int, equals: tuple[tuple[str, str], ...],
            group_by: str | None) -> list[tuple[Any, ...]]:
    """As rollups.history: pieces for the whole hours [start, end), calls only."""
    if group_by == "user" or any(column == "user" for column, _ in equals):
        user = next((value for column, value in equals if column == "user"), None)
        start = _kept_from(conn, start)
        where = "bucket >= %s AND bucket < %s" + (' AND "user" = %s' if user else "")
        params: list[object] = [start, end] + ([user] if user else [])
        group = '"user"' if group_by else "NULL::text"
        pieces = [tuple(r) for r in conn.execute(
            f"SELECT bucket * {HOUR}, {group}, {_SUMS}, {_MORE} FROM users_hour "
            f"WHERE {where} GROUP BY bucket, 2", params)]
        if group_by and not user:
            pieces += [tuple(r) for r in conn.execute(
                f"SELECT bucket * {HOUR}, NULL::text, {_SUMS}, {_ERRORS}, SUM(estimated_calls)::bigint FROM rollup_hour "
                "WHERE bucket >= %s AND bucket < %s AND final = 1 AND named = 0 GROUP BY bucket", (start, end))]
        return pieces
    clauses: list[str] = ["bucket >= %s", "bucket < %s", "final = 1"]
    values: list[object] = [start, end]
    for column, value in equals:
        assert column in ("upstream", "model", "type")  # ours, never the client's text
        clauses.append(f"{q(column)} = %s")
        values.append(value)
    group = q(group_by) if group_by else "NULL::text"
    return [tuple(r) for r in conn.execute(
        f"SELECT bucket * {HOUR}, {group}, {_SUMS}, {_ERRORS}, SUM(estimated_calls)::bigint FROM rollup_hour "
        f"WHERE {' AND '.join(clauses)} GROUP BY bucket, 2", values)]


def user_history(conn: psycopg.Connection[Any], start: int, end: int, edge_totals: dict[str, int],
                 top: int) -> tuple[list[tuple[Any, ...]], set[str]]:
    """As rollups.user_history: the period's `top` busiest users named, the rest as OTHERS."""
    start = _kept_from(conn, start)
    totals = dict(edge_totals)
    for span, first, last in spans(start, end):
        for user, requests in conn.execute(f'SELECT "user", SUM(requests)::bigint FROM users_{span} '
                                           'WHERE bucket >= %s AND bucket < %s GROUP BY "user"', (first, last)):
            totals[user] = totals.get(user, 0) + int(requests)
    named = set(sorted(totals, key=lambda u: (-totals[u], u))[:top])
    pieces: list[tuple[Any, ...]] = []
    by_hour: dict[int, tuple[Any, ...]] = {}
    if named:
        users = list(named)
        pieces += [tuple(r) for r in conn.execute(
            f'SELECT bucket * {HOUR}, "user", requests, prompt_tokens, completion_tokens, cost_usd, errors, '
            f'estimated_calls FROM users_hour WHERE "user" = ANY(%s) AND bucket >= %s AND bucket < %s',
            (users, start, end))]
        by_hour = {int(r[0]): tuple(r[1:]) for r in conn.execute(
            f'SELECT bucket * {HOUR}, {_SUMS}, {_MORE} FROM users_hour '
            f'WHERE "user" = ANY(%s) AND bucket >= %s AND bucket < %s GROUP BY bucket', (users, start, end))}
    for hour, has_user, *figures in conn.execute(
            f"SELECT bucket * {HOUR}, named, {_SUMS}, {_ERRORS}, SUM(estimated_calls)::bigint FROM rollup_hour "
            "WHERE bucket >= %s AND bucket < %s AND final = 1 GROUP BY bucket, named", (start, end)):
        if not has_user:
            pieces.append((hour, None, *figures))
            continue
        rest = [total - part for total, part in zip(figures, by_hour.get(int(hour), (0, 0, 0, 0.0, 0, 0)))]
        if rest[0]:
            pieces.append((hour, OTHERS, *rest))
    return pieces, named
