"""The ledger in PostgreSQL: one database for every process and machine of a deployment.

The SQLite ledger's queue, backlog and flush are kept as they are (this class extends it); what
changes is where the writer thread puts a batch and where readers read. A batch is one
transaction: admissions and call rows arrive with binary COPY into temporary tables, call rows
already there (an outbox replayed twice) are dropped by their unique id, the rest go into the
month's partition of `calls`, and the hourly, daily and per-epoch sums are upserted from the same
rows (pg_rollups.FOLD). Readers take a connection from a bounded pool (`ledger.pool_size`, the
writer's included).

When the database cannot be reached the batch goes to a local SQLite outbox (outbox.py) and
counts as kept; so does every batch after it, in order, until the outbox has been replayed into
the database. Nothing is lost and nothing is written twice.
"""

from __future__ import annotations

import logging
import operator
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from . import postgresql_rollups as pg_rollups
from . import sqlite_rollups as rollups
from . import (COLUMNS, COUNTED_BY_ROW, GROUPS, IS_ERROR_SQL, Admission, Spend, CallRecord, Filters, GroupBy, LedgerError, Piece,
                     Summary)
from .outbox import Item, Outbox
from .postgresql_rollups import ADMISSION_COLUMNS, CALL_COLUMNS, CALL_TYPES, q
from .sqlite import _QUARTER, PRUNE_BATCH, Ledger, _Epoch, _Prune, _record

log = logging.getLogger("tollgate.ledger")

PARTITION_LOCK = 7_461_700_002
# A batch's rows arrive in `staging`; those not already in `calls` are inserted and copied to
# `fresh`, which the sums are folded from.
_STAGING = ("CREATE TEMP TABLE IF NOT EXISTS staging (LIKE calls) ON COMMIT DELETE ROWS; "
            "CREATE TEMP TABLE IF NOT EXISTS fresh (LIKE calls) ON COMMIT DELETE ROWS; "
            "CREATE TEMP TABLE IF NOT EXISTS staging_admissions (LIKE admissions) ON COMMIT DELETE ROWS")
_CALL_ROW = operator.attrgetter(*COLUMNS)
_ADMISSION_ROW = operator.attrgetter(*ADMISSION_COLUMNS)
_ADMISSION_TYPES = ("text", "float8", "text", "text", "text", "text", "int4")


def _where(filters: Filters) -> tuple[str, list[Any]]:
    clauses = ["ts >= %s", "ts < %s"] + ([] if filters.attempts else ["final"])
    params: list[Any] = [filters.since if filters.since is not None else float("-inf"),
                         filters.until if filters.until is not None else float("inf")]
    for column, value in filters.equals:
        assert column in GROUPS  # the column name is ours, never the client's text
        clauses.append(f"{q(column)} = %s")
        params.append(value)
    return " AND ".join(clauses), params


class PgLedger(Ledger):
    # A round trip a statement, a dozen statements a batch: larger batches than SQLite's.
    BATCH = 10_000

    def __init__(self, dsn: str, outbox: Path, pool_size: int = 4, max_backlog: int = 100_000,
                 drop_when_full: bool = False) -> None:
        super().__init__(outbox, max_backlog=max_backlog, drop_when_full=drop_when_full)
        self.dsn = dsn
        self.pool_size = max(2, pool_size)
        self.outbox = Outbox(outbox)
        self._pool: ConnectionPool | None = None
        self._token = secrets.token_hex(6)   # this process's row ids: <token>-<n>
        self._seq = 0
        self._partitions: set[str] = set()
        self._staged = False

    # --- lifecycle -------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True, connect_timeout=5, application_name="tollgate")

    def open(self, now: float) -> None:
        """Migrate the schema (once, under a lock, whichever replica is first), make this month's
        and the next month's partitions, and start the writer. A database that cannot be reached
        raises LedgerError, one line without the connection string (it may hold a password)."""
        try:
            with self._connect() as conn:
                pg_rollups.migrate(conn, now)
                for ts in (now, now + 32 * rollups.DAY):
                    self._partition(conn, ts)
            waiting = self.outbox.open()
        except psycopg.Error as exc:
            raise LedgerError(f"cannot open the PostgreSQL ledger: {_reason(exc)}") from None
        if waiting:
            log.warning("ledger: %d rows wait in the local outbox %s from an earlier run; replaying them",
                        waiting, self.outbox.path)
        # The writer holds one connection of its own; the readers share the rest.
        self._pool = ConnectionPool(self.dsn, min_size=1, max_size=self.pool_size - 1, open=True, timeout=10,
                                    kwargs={"autocommit": True, "application_name": "tollgate"})
        try:
            first: psycopg.Connection[Any] | None = self._writer_connection()
        except psycopg.Error:
            first = None
        import threading

        self._thread = threading.Thread(target=self._writer, args=(first,), name="tollgate-ledger", daemon=True)
        self._thread.start()

    def _writer_connection(self) -> psycopg.Connection[Any]:
        conn = self._connect()
        conn.execute(_STAGING)
        return conn

    def close(self, timeout: float | None = None) -> None:
        super().close(timeout)
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self.outbox.close()

    # --- writing (the writer thread) ---------------------------------------------------

    def _items(self, writes: Sequence[object]) -> list[Item]:
        """Queue items as the rows they become, each call row with its unique id."""
        items: list[Item] = []
        for item in writes:
            if isinstance(item, CallRecord):
                self._seq += 1
                items.append(("call", (f"{self._token}-{self._seq}", *_CALL_ROW(item))))
            elif isinstance(item, Admission):
                items.append(("admission", _ADMISSION_ROW(item)))
            elif isinstance(item, _Epoch):
                self._seq += 1
                items.append(("epoch", (item.started, f"{self._token}-{self._seq}")))
        return items

    def _writer(self, conn: Any) -> None:
        pending: list[object] = []
        backoff = 0.0
        try:
            while True:
                pending += self._take(block=not pending and not self.outbox.size)
                pruning = [item for item in pending if isinstance(item, _Prune)]
                writes = [item for item in pending if isinstance(item, (CallRecord, _Epoch, Admission))]
                items = self._items(writes)
                kept = sum(1 for item in writes if not isinstance(item, _Epoch))
                try:
                    if self.outbox.size and items:
                        self.outbox.put(items)  # behind what already waits there: order is kept
                        items = []
                    conn = conn or self._writer_connection()
                    self._replay(conn)
                    if items:
                        with conn.transaction():
                            self._write_items(conn, items, replayed=False)
                except psycopg.Error as exc:
                    self._lost(conn, exc)
                    conn = None
                    try:
                        if items:
                            self.outbox.put(items)
                    except Exception as fault:  # the outbox failing too: keep them in memory
                        self._failing = f"{self._failing}; the local outbox failed too ({fault})"
                        self._seq -= len(items)
                        self._wait(backoff := min(max(backoff * 2, 0.05), 1.0))
                        if self._abandon:
                            return
                        continue
                    backoff = min(max(backoff * 2, 0.05), 1.0)
                else:
                    backoff = 0.0
                    if self._failing is not None and not self.outbox.size:
                        log.warning("ledger: PostgreSQL is back after %.1f s; the outbox is replayed",
                                    time.monotonic() - (self._failing_since or 0.0))
                        self._failing = self._failing_since = None
                self._written += kept
                if pruning and conn is not None and not self.outbox.size:
                    self._prune(conn, pruning[-1])
                stop = self._answer_markers(pending)
                pending = []
                if stop:
                    return
                if self.outbox.size:
                    self._wait(backoff or 0.05)
        finally:
            if conn is not None:
                conn.close()

    def _lost(self, conn: psycopg.Connection[Any] | None, exc: psycopg.Error) -> None:
        reason = _reason(exc)
        if self._failing is None:
            self._failing_since = time.monotonic()
            log.error("ledger: cannot write to PostgreSQL (%s); keeping rows in the local outbox %s and retrying",
                      reason, self.outbox.path)
        self._failing = f"PostgreSQL: {reason}; rows wait in the local outbox"
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    def _replay(self, conn: psycopg.Connection[Any]) -> None:
        """What waits in the outbox, oldest first, a batch a transaction, deleted once committed."""
        while self.outbox.size:
            upto, items = self.outbox.oldest(2000)
            if not items:
                return
            with conn.transaction():
                self._write_items(conn, items, replayed=True)
            self.outbox.done(upto)

    def _write_items(self, conn: psycopg.Connection[Any], items: list[Item], replayed: bool) -> None:
        """One batch in queue order: an epoch starts after exactly the rows before it. A batch
        from the outbox may have been committed before (or twice in it): its rows are checked."""
        self._staged = False  # the temporary tables empty themselves at each commit
        admissions = [values for kind, values in items if kind == "admission"]
        if admissions:
            self._copy(conn, "staging_admissions", ADMISSION_COLUMNS, _ADMISSION_TYPES, admissions)
            conn.execute("INSERT INTO admissions SELECT * FROM staging_admissions ON CONFLICT (key) DO NOTHING")
            conn.execute("DELETE FROM staging_admissions")
        epoch_row = conn.execute("SELECT MAX(id) FROM epochs").fetchone()
        epoch = int(epoch_row[0]) if epoch_row else 1
        rows: list[tuple[object, ...]] = []
        for kind, values in items:
            if kind == "call":
                rows.append((*values, epoch))
            elif kind == "epoch":
                self._rows(conn, rows, replayed)
                rows = []
                started, marker = values
                found = conn.execute("INSERT INTO epochs (started, marker) VALUES (%s, %s) ON CONFLICT (marker) "
                                     "DO NOTHING RETURNING id", (started, marker)).fetchone()
                if found is None:  # replayed: it is there already
                    found = conn.execute("SELECT id FROM epochs WHERE marker = %s", (marker,)).fetchone()
                assert found is not None
                epoch = int(found[0])
        self._rows(conn, rows, replayed)

    def _rows(self, conn: psycopg.Connection[Any], rows: list[tuple[object, ...]], replayed: bool) -> None:
        if not rows:
            return
        for ts in {pg_rollups.month_bounds(float(row[1]))[1] for row in rows}:  # type: ignore[arg-type]
            self._partition(conn, ts)
        if self._staged:  # an epoch split this transaction's rows: the first part is done
            conn.execute("TRUNCATE staging, fresh")
        self._staged = True
        self._copy(conn, "staging", CALL_COLUMNS, CALL_TYPES, rows)
        if not replayed:  # ids this process has just made: none can be there yet
            conn.execute("INSERT INTO calls SELECT * FROM staging")
        else:
            # Rows an earlier attempt committed, or twice in this batch, conflict on their id:
            # they are neither written nor summed again.
            conn.execute("WITH written AS (INSERT INTO calls SELECT * FROM staging ON CONFLICT DO NOTHING "
                         "RETURNING *) INSERT INTO fresh SELECT * FROM written")
        for statement in pg_rollups.FOLD["fresh" if replayed else "staging"]:
            conn.execute(statement)

    @staticmethod
    def _copy(conn: psycopg.Connection[Any], table: str, columns: tuple[str, ...], types: tuple[str, ...],
              rows: list[tuple[object, ...]]) -> None:
        with conn.cursor() as cur:
            names = ", ".join(q(c) for c in columns)
            with cur.copy(f"COPY {table} ({names}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(list(types))
                for row in rows:
                    copy.write_row(row)

    def _partition(self, conn: psycopg.Connection[Any], ts: float) -> None:
        """The month of `ts` gets its partition before its first row (replicas take turns)."""
        name, start, end = pg_rollups.month_bounds(ts)
        if name in self._partitions:
            return
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
            conn.execute(f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF calls "
                         f"FOR VALUES FROM ({start!r}) TO ({end!r})")
        self._partitions.add(name)

    def _prune(self, conn: Any, prune: _Prune) -> None:
        """Whole months of call rows older than the cutoff go at once (their partition dropped),
        with the hourly per-user and latency detail before it; admissions a batch at a time."""
        try:
            deleted = 0
            if prune.cutoff is not None:
                for (name,) in conn.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'calls'"
                                            ).fetchall():
                    year, month = int(name[6:10]), int(name[11:13])
                    _, _, end = pg_rollups.month_bounds(_month_start(year, month))
                    if end <= prune.cutoff:
                        with conn.transaction():
                            conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
                            conn.execute(f"DROP TABLE IF EXISTS {name}")
                        self._partitions.discard(name)
                        log.info("ledger: dropped the call rows of %s-%02d (ledger.keep_raw_days)", year, month)
                hour = int(prune.cutoff / rollups.HOUR)
                with conn.transaction():
                    conn.execute("INSERT INTO meta (name, value) VALUES ('hourly_detail_from', %s) ON CONFLICT (name) "
                                 "DO UPDATE SET value = greatest(meta.value::bigint, excluded.value::bigint)::text",
                                 (str(hour),))
                    for table in ("users_hour", "latency_hour"):
                        deleted += conn.execute(f"DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table} "
                                                f"WHERE bucket < %s LIMIT {PRUNE_BATCH})", (hour,)).rowcount
            deleted += conn.execute(f"DELETE FROM admissions WHERE ctid IN (SELECT ctid FROM admissions WHERE ts < %s "
                                    f"LIMIT {PRUNE_BATCH})", (prune.admissions_cutoff,)).rowcount
            if deleted:
                self.pruned += deleted
                self._queue.put(prune)
        except psycopg.Error as exc:
            log.warning("ledger: pruning old rows failed (%s); will try again", _reason(exc))

    # --- reading (a pooled connection, any thread) ----------------------------------------

    def _read(self) -> Any:
        if self._pool is None:  # a command with no server: a connection of its own
            self._pool = ConnectionPool(self.dsn, min_size=1, max_size=self.pool_size, open=True, timeout=10,
                                        kwargs={"autocommit": True, "application_name": "tollgate"})
        return self._pool.connection()

    def epoch_summary(self, epoch: int | None = None) -> tuple[float, Summary]:
        with _reading(), self._read() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            row = conn.execute("SELECT id, started FROM epochs WHERE id = COALESCE(%s, (SELECT MAX(id) FROM epochs))",
                               (epoch,)).fetchone()
            return float(row[1]), pg_rollups.epoch_summary(conn, int(row[0]))

    def raw_since(self) -> float | None:
        with _reading(), self._read() as conn:
            found = conn.execute("SELECT MIN(ts) FROM calls").fetchone()[0]
            return float(found) if found is not None else None

    def cost_by_day(self, since: float) -> tuple[dict[int, float], float | None]:
        with _reading(), self._read() as conn:
            first = conn.execute("SELECT MIN(ts) FROM calls").fetchone()[0]
            oldest_day = conn.execute("SELECT MIN(bucket) FROM rollup_day").fetchone()[0]
            if oldest_day is not None and (first is None or oldest_day < int(first / rollups.DAY)):
                first = oldest_day * rollups.DAY
            return pg_rollups.cost_by_day(conn, int(since // rollups.DAY)), first

    def history_pieces(self, filters: Filters, group_by: GroupBy | None, whole_hours: bool,
                       top_users: int | None = None) -> list[Piece]:
        """As the SQLite ledger's (the same plan, `_pieces`), in one REPEATABLE READ transaction."""
        with _reading(), self._read() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            return self._pieces(conn, filters, group_by, whole_hours, top_users)

    @staticmethod
    def _hours(conn: Any) -> tuple[int | None, int | None]:
        first, last = conn.execute("SELECT MIN(bucket), MAX(bucket) FROM rollup_hour").fetchone()
        return (None, None) if first is None else (int(first), int(last))

    @staticmethod
    def _history(conn: Any, start: int, end: int, equals: tuple[tuple[str, str], ...],
                 group_by: str | None) -> list[Piece]:
        return pg_rollups.history(conn, start, end, equals, group_by)

    @staticmethod
    def _user_history(conn: Any, start: int, end: int, edge: dict[str, int],
                      top: int) -> tuple[list[Piece], set[str]]:
        return pg_rollups.user_history(conn, start, end, edge, top)

    @staticmethod
    def _raw_pieces(conn: Any, filters: Filters, group_by: GroupBy | None, start: int | None,
                    end: int | None) -> list[Piece]:
        since = filters.since if filters.since is not None else float("-inf")
        until = filters.until if filters.until is not None else float("inf")
        ranges = [(since, until, "")] if start is None or end is None else [
            (since, min(until, start * rollups.HOUR + 1), f" AND ts < {start * rollups.HOUR}"),
            (max(since, end * rollups.HOUR - 1), until, f" AND ts >= {end * rollups.HOUR}")]
        group = q(group_by) if group_by else "NULL::text"
        pieces: list[Piece] = []
        for lo, hi, clause in ranges:
            where, params = _where(replace(filters, since=lo, until=hi))
            pieces += [(float(quarter * _QUARTER), *rest) for quarter, *rest in conn.execute(
                f"""SELECT floor(ts / {_QUARTER})::bigint AS qu, {group} AS grp, COUNT(*),
                           SUM(prompt_tokens)::bigint, SUM(completion_tokens)::bigint, SUM(cost_usd),
                           SUM(({IS_ERROR_SQL})::int)::bigint, SUM(estimated::int)::bigint
                    FROM calls WHERE {where}{clause} GROUP BY qu, grp""", params)]
        return pieces

    def export_rows(self, filters: Filters, batch: int = 2000) -> Iterator[list[tuple[Any, ...]]]:
        where, params = _where(replace(filters, attempts=True))
        names = ", ".join(q(c) for c in COLUMNS)
        with _reading(), self._read() as conn, conn.transaction(), conn.cursor(name="export") as cursor:
            cursor.itersize = batch
            cursor.execute(f"SELECT {names} FROM calls WHERE {where} ORDER BY ts, id", params)
            while rows := cursor.fetchmany(batch):
                yield [_sqlite_shaped(row) for row in rows]

    def spend(self, since: float) -> list[Spend]:
        with _reading(), self._read() as conn:
            return [(str(u), str(m), k, n, float(c)) for u, m, k, n, c in conn.execute(
                'SELECT upstream, model, key_id, "user", SUM(cost_usd) FROM calls WHERE ts >= %s AND cost_usd > 0 '
                "GROUP BY 1, 2, 3, 4", (since,))]

    def latency_hours(self, start_hour: int, end_hour: int) -> list[tuple[int, int, int, int]]:
        with _reading(), self._read() as conn:
            return [(int(h), int(k), int(i), int(n)) for h, k, i, n in conn.execute(
                "SELECT bucket, kind, idx, n FROM latency_hour WHERE bucket >= %s AND bucket < %s",
                (start_hour, end_hour))]

    def recent(self, filters: Filters, outcome: str | None, limit: int) -> list[CallRecord]:
        where, params = _where(filters)
        if outcome is not None:
            where, params = where + " AND outcome = %s", [*params, outcome]
        names = ", ".join(q(c) for c in COLUMNS)
        with _reading(), self._read() as conn:
            return [_record(tuple(row)) for row in conn.execute(
                f"SELECT {names} FROM calls WHERE {where} ORDER BY ts DESC, id DESC LIMIT %s", (*params, limit))]

    def rows(self, since: float | None = None, until: float | None = None) -> Iterator[CallRecord]:
        names = ", ".join(q(c) for c in COLUMNS)
        with _reading(), self._read() as conn, conn.transaction(), conn.cursor(name="rows") as cursor:
            cursor.execute(f"SELECT {names} FROM calls WHERE ts >= %s AND ts < %s ORDER BY ts, id",
                           (since if since is not None else float("-inf"), until if until is not None else float("inf")))
            for row in cursor:
                yield _record(tuple(row))

    def replay_admissions(self, since: float) -> Iterator[Admission]:
        with _reading(), self._read() as conn:
            for row in conn.execute(
                    """SELECT a.key, a.ts, a.upstream, a.model, a."user", a.key_id,
                              COALESCE(c.prompt_tokens + c.completion_tokens, a.tokens)
                       FROM admissions a LEFT JOIN calls c ON c.admission = a.key AND c.ts >= %s
                       WHERE a.ts >= %s
                       UNION ALL
                       SELECT 'call:' || c.id, c.ts - c.latency_s, c.upstream, c.model, c."user", c.key_id,
                              c.prompt_tokens + c.completion_tokens
                       FROM calls c WHERE c.ts >= %s AND c.admission = %s AND c.ts - c.latency_s >= %s
                       ORDER BY 2""", (since, since, since, COUNTED_BY_ROW, since)).fetchall():
                yield Admission(*row)

    def count(self) -> int:
        with _reading(), self._read() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0])


def probe(dsn: str) -> tuple[bool, str]:
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            row = conn.execute("SELECT current_setting('server_version'), current_setting('max_connections')").fetchone()
    except psycopg.Error as exc:
        return False, _reason(exc)
    assert row is not None
    return True, f"reachable (PostgreSQL {row[0]}, max_connections {row[1]})"


def _sqlite_shaped(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """An export row as the SQLite ledger gives it: booleans as 0 and 1."""
    return tuple(int(v) if isinstance(v, bool) else v for v in row)


def _month_start(year: int, month: int) -> float:
    from datetime import datetime, timezone

    return datetime(year, month, 1, tzinfo=timezone.utc).timestamp()


def _reason(exc: BaseException) -> str:
    """The cause in a line, without the connection string psycopg may quote."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split("postgresql://")[0].rstrip(" :(") or type(exc).__name__


class _reading:
    """A reader's psycopg failure as the LedgerError every caller knows."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, psycopg.Error) or (exc is not None and type(exc).__name__ == "PoolTimeout"):
            raise LedgerError(f"cannot read the PostgreSQL ledger: {_reason(exc)}") from None
