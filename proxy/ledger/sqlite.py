"""The ledger: one SQLite row per call, in WAL mode, written by a single thread.

The ledger is the single source of truth. Aggregates and rate windows are rebuilt from it at
start, so a restart neither forgets usage nor hands out a fresh daily quota.

Durability window: `append` only queues the row; the writer thread commits whatever has
queued as one transaction. An idle writer commits a row straight away; a busy one starts a
transaction at most every PACE_S, so a row is on disk within PACE_S and one commit (some tens of
milliseconds) of the call finishing. With WAL and synchronous=NORMAL a committed row
survives the process being killed; only a power loss can take the last commits back.

Faults: the writer survives any SQLite error (a full disk, a lock another process holds past
`ledger_busy_timeout_s`, an I/O error). It keeps the unwritten rows, retries with backoff and
writes every one of them, in order, once the fault clears. While it fails, `health()` says why;
the unwritten rows are bounded by `ledger_max_backlog`, past which the proxy either refuses
metered calls (`on_ledger_full = "refuse"`, the default: nothing is served unmetered) or keeps
serving and counts each row it had to drop (`"serve"`). The fault is logged once, and its end.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
import operator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from . import sqlite_rollups as rollups
from .sqlite_rows import write_many
from ..files import make_private_dir
from . import (COLUMNS, COUNTED_BY_ROW, GROUPS, IS_ERROR_SQL, OTHERS, Spend, Admission, CallRecord, Filters, GroupBy, LedgerError,
                     LedgerHealth, Piece, Snapshot, Summary)

log = logging.getLogger("tollgate.ledger")


_COLUMNS = list(COLUMNS)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL, upstream TEXT NOT NULL, model TEXT NOT NULL, dialect TEXT NOT NULL,
    endpoint TEXT NOT NULL, type TEXT NOT NULL, user TEXT, stream INTEGER NOT NULL,
    status INTEGER NOT NULL, outcome TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, estimated INTEGER NOT NULL,
    latency_s REAL NOT NULL, ttft_s REAL, cost_usd REAL NOT NULL, fallback_from TEXT, key_id TEXT,
    admission TEXT, final INTEGER NOT NULL DEFAULT 1,
    saved_tokens INTEGER NOT NULL DEFAULT 0, saved_usd REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS calls_ts ON calls(ts);
CREATE TABLE IF NOT EXISTS admissions (
    key TEXT PRIMARY KEY, ts REAL NOT NULL, upstream TEXT NOT NULL, model TEXT NOT NULL,
    user TEXT, key_id TEXT, tokens INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS admissions_ts ON admissions(ts);
-- An epoch holds the calls written after row `after_call`: order in the ledger, not clock
-- time, decides which side of a reset a call falls on.
CREATE TABLE IF NOT EXISTS epochs (id INTEGER PRIMARY KEY, started REAL NOT NULL,
                                   after_call INTEGER NOT NULL DEFAULT 0);
"""
# attrgetter builds the row tuple in C; dataclasses.astuple deep-copies and costs the writer
# thread GIL time that the event loop needs.
_ROW = operator.attrgetter(*_COLUMNS)
_ADMISSION_COLUMNS = [f.name for f in fields(Admission)]
_ADMISSION_ROW = operator.attrgetter(*_ADMISSION_COLUMNS)
_INSERT_CALL = f"INSERT INTO calls ({', '.join(_COLUMNS)})"
_INSERT_ADMISSION = f"INSERT OR IGNORE INTO admissions ({', '.join(_ADMISSION_COLUMNS)})"


@dataclass(slots=True)
class _Epoch:
    started: float


@dataclass(slots=True)
class _Prune:
    """Delete call rows older than `cutoff` (their sums stay in the rollups) and admissions older
    than `admissions_cutoff`, a small batch per transaction."""

    cutoff: float | None
    admissions_cutoff: float


# Rows deleted per prune transaction: each holds the writer a few milliseconds at most, and
# whatever queued meanwhile is written before the next batch.
PRUNE_BATCH = 100
# A busy writer starts at most one transaction per this long. A transaction costs some fixed
# statements and one commit whether it holds one row or a hundred, and a row of the same
# hour and kind as another adds nothing to the rollups' statements: under bench/profile.py's
# streaming load (with the rollups then folded by SQL), transactions of 7-11 rows took 48-58 µs
# of the writer's thread a row, paced ones of 78-89 rows 40. At a steady 500 calls a second,
# 20 ms made transactions of 10 calls and the writer held the GIL for 6.5% of the time anyone
# did; 50 ms makes them 25 calls and 4.0% (bench/soak.py), and a SIGKILL still loses no call
# finished 50 ms before it (bench/crash_lag.py). Whoever waits on the writer (a flush, a
# snapshot, closing) cuts the wait short.
PACE_S = 0.05


class _Flush:
    """A marker in the write queue: when the writer reaches it, everything before is committed."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()

    def done(self) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Snapshot:
    """A marker in the write queue: when the writer reaches it, everything before it is committed
    and nothing after it (a batch ends at a snapshot), and it reads the epoch's sums then. So a
    process that shares its ledger knows exactly which of its own calls the sums hold: those it
    booked before asking."""

    def __init__(self, loop: asyncio.AbstractEventLoop, since: float) -> None:
        self.loop, self.since = loop, since
        self.future: asyncio.Future[Snapshot] = loop.create_future()

    def answer(self, read: Callable[[float], Snapshot]) -> None:
        try:
            result: Snapshot | LedgerError = read(self.since)
        except LedgerError as exc:
            result = exc
        self.loop.call_soon_threadsafe(_resolve, self.future, result)


def _resolve(future: asyncio.Future[Snapshot], result: Snapshot | LedgerError) -> None:
    if future.done():
        return
    if isinstance(result, LedgerError):
        future.set_exception(result)
    else:
        future.set_result(result)


_STOP = object()


def _connect(path: Path, busy_timeout_s: float = 30.0) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _reader(path: Path) -> sqlite3.Connection:
    """A read-only connection: a report can never write to the ledger. check_same_thread off: a
    streamed export is read batch by batch from whichever executor thread is free, never two at once."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0, check_same_thread=False)


def _where(filters: Filters) -> tuple[str, list[Any]]:
    clauses = ["ts >= ?", "ts < ?"] + ([] if filters.attempts else ["final = 1"])
    params: list[Any] = [filters.since if filters.since is not None else float("-inf"),
                         filters.until if filters.until is not None else float("inf")]
    for column, value in filters.equals:
        assert column in GROUPS  # the column name is ours, never the client's text
        clauses.append(f'"{column}" = ?')
        params.append(value)
    return " AND ".join(clauses), params


_QUARTER = 900


class Ledger:
    BATCH = 2000  # most items one transaction takes

    def __init__(self, path: Path, busy_timeout_s: float = 5.0, max_backlog: int = 100_000,
                 drop_when_full: bool = False) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self.max_backlog = max_backlog
        self.drop_when_full = drop_when_full
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Each counter has one writer thread, so their difference is exact without a lock.
        self._queued = 0          # by the event loop (append, admit)
        self._written = 0         # by the writer thread
        self.dropped = 0          # call rows given up (admissions are not counted)
        self._failing: str | None = None
        self._failing_since: float | None = None
        self._wake = threading.Event()
        self._hurry = threading.Event()   # someone waits on the writer: no pacing now
        # A backlog this long is written without pacing: rows gather to save CPU, never to
        # bring a small `max_backlog` near its bound.
        self._hurry_at = max(1, min(self.BATCH // 2, max_backlog // 4))
        self._abandon = False
        self._dropping = False    # an episode of dropped rows is logged once, at its start
        self.pruned = 0           # rows and admissions deleted by retention (writer thread)

    # --- lifecycle -------------------------------------------------------------------

    def open(self, now: float) -> None:
        """Create the file owner-only, set up the schema, prove it can be written, and start the
        writer thread. A ledger that cannot be opened or written raises LedgerError: one line
        naming the path and the cause."""
        try:
            self._open(now)
        except (OSError, sqlite3.Error) as exc:
            cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            where = getattr(exc, "filename", None) or self.path
            raise LedgerError(f"cannot open the ledger at {where}: {cause}") from None
        # The writer's connection is opened here, before the server says it is ready: its files
        # are not a surprise that turns up with the first write.
        first = _connect(self.path, self.busy_timeout_s)
        self._thread = threading.Thread(target=self._writer, args=(first,), name="tollgate-ledger", daemon=True)
        self._thread.start()

    def _open(self, now: float) -> None:
        make_private_dir(self.path.parent)
        # SQLite creates its -wal and -shm files with the main file's mode, so 0600 here
        # makes all three private.
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(self.path, 0o600)
        conn = _connect(self.path, self.busy_timeout_s)
        try:
            if conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
                # A new ledger returns the pages retention frees (set before the first table).
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.executescript(_SCHEMA + rollups.SCHEMA)
            # Columns added after the first release: bring an older ledger up to date.
            columns = {row[1] for row in conn.execute("PRAGMA table_info(calls)")}
            if "after_call" not in {row[1] for row in conn.execute("PRAGMA table_info(epochs)")}:
                conn.execute("ALTER TABLE epochs ADD COLUMN after_call INTEGER NOT NULL DEFAULT 0")
            for added in ("fallback_from", "key_id", "admission"):
                if added not in columns:
                    conn.execute(f"ALTER TABLE calls ADD COLUMN {added} TEXT")
            if "final" not in columns:
                conn.execute("ALTER TABLE calls ADD COLUMN final INTEGER NOT NULL DEFAULT 1")
            if "saved_tokens" not in columns:
                conn.execute("ALTER TABLE calls ADD COLUMN saved_tokens INTEGER NOT NULL DEFAULT 0")
                conn.execute("ALTER TABLE calls ADD COLUMN saved_usd REAL NOT NULL DEFAULT 0")
            rollups.add_columns(conn)
            conn.execute("CREATE INDEX IF NOT EXISTS calls_admission ON calls(admission)")
            rollups.backfill(conn)
            if conn.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 0:
                conn.execute("INSERT INTO epochs (started, after_call) VALUES (?, 0)", (now,))
            # A write now, so a ledger that opens but cannot take a row (a read-only file or
            # filesystem, a full disk) stops start-up instead of the first call.
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE epochs SET started = started WHERE id = (SELECT MAX(id) FROM epochs)")
            conn.execute("COMMIT")
        finally:
            conn.close()

    def close(self, timeout: float | None = None) -> None:
        """Commit what is queued and stop the writer. Safe to call more than once.

        With a timeout, a writer still failing when it runs out gives up: what it could not
        write is counted in the log, and the process is free to exit."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            self._wake.set()
            self._hurry.set()
            thread.join(timeout)
            if thread.is_alive():
                self._abandon = True
                self._wake.set()
                thread.join()

    # --- writing (any thread) -----------------------------------------------------------

    @property
    def unwritten(self) -> int:
        return self._queued - self._written

    @property
    def full(self) -> bool:
        return self.unwritten >= self.max_backlog

    def health(self) -> LedgerHealth:
        return LedgerHealth(self._failing, self._failing_since, max(0, self.unwritten), self.dropped, self.full)

    def _put(self, item: CallRecord | Admission) -> bool:
        if self.drop_when_full and self.full:
            if not self._dropping:
                self._dropping = True
                log.error("ledger: %d rows are waiting to be written, the most it keeps; dropping rows "
                          "until it catches up (on_ledger_full = \"serve\"); each is counted", self.unwritten)
            if isinstance(item, CallRecord):
                self.dropped += 1  # an admission dropped with it only costs a restart its window entry
            return False
        self._queued += 1
        self._queue.put(item)
        if self._queued - self._written >= self._hurry_at:
            self._hurry.set()
        return True

    def append(self, record: CallRecord) -> bool:
        """Queue a call's row; False if it had to be dropped (full backlog, "serve" mode)."""
        return self._put(record)

    def admit(self, admission: Admission) -> bool:
        return self._put(admission)

    def new_epoch(self, started: float) -> None:
        self._queue.put(_Epoch(started))

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything appended so far is committed; False if `timeout` ran out first
        (a failing ledger never holds a caller for longer than it is willing to wait)."""
        if self._thread is None:
            return True
        marker = _Flush(asyncio.get_running_loop())
        self._queue.put(marker)
        self._hurry.set()
        try:
            await asyncio.wait_for(asyncio.shield(marker.future), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def _writer(self, conn: sqlite3.Connection | None) -> None:
        pending: list[object] = []   # taken from the queue, not yet committed
        backoff = 0.0
        try:
            while True:
                pending += self._take(block=not pending)
                pruning = [item for item in pending if isinstance(item, _Prune)]
                pending = [item for item in pending if not isinstance(item, _Prune)]
                writes = [item for item in pending if isinstance(item, (CallRecord, _Epoch, Admission))]
                began = time.monotonic()
                try:
                    if writes:
                        conn = conn or _connect(self.path, self.busy_timeout_s)
                        conn.execute("BEGIN IMMEDIATE")
                        self._write(conn, writes)
                        conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    conn = self._after_failure(conn, exc, writes)
                    if self._abandon:
                        log.error("ledger: stopping with %d rows unwritten (%s)", len(writes), exc)
                        return
                    backoff = min(max(backoff * 2, 0.05), 1.0)
                    self._wait(backoff)
                    continue
                backoff = 0.0
                self._written += sum(1 for item in writes if not isinstance(item, _Epoch))
                if self._dropping and not self.full:
                    log.warning("ledger: backlog below its bound again; %d rows were dropped in all", self.dropped)
                    self._dropping = False
                if self._failing is not None:
                    log.warning("ledger: writing again after %.1f s (%s); caught up",
                                time.monotonic() - (self._failing_since or 0.0), self._failing)
                    self._failing = self._failing_since = None
                if pruning:
                    conn = conn or _connect(self.path, self.busy_timeout_s)
                    self._prune(conn, pruning[-1])
                stop = self._answer_markers(pending)
                pending = []
                if stop:
                    return
                if writes:
                    self._pace(began)
        finally:
            if conn is not None:
                conn.close()

    def _answer_markers(self, handled: list[object]) -> bool:
        """Everything before the markers among `handled` is written: tell whoever waits on them.
        True if the writer was asked to stop."""
        for item in handled:
            if isinstance(item, _Flush):
                item.done()
            elif isinstance(item, _Snapshot):
                item.answer(self.read_snapshot)
        return any(item is _STOP for item in handled)

    def _pace(self, began: float) -> None:
        """Let rows gather for the next transaction until PACE_S after this one began, unless
        someone waits on the writer. An idle writer's next row finds the time long past."""
        left = began + PACE_S - time.monotonic()
        if left > 0 and not self._hurry.is_set():
            self._hurry.wait(left)
        self._hurry.clear()

    def _wait(self, seconds: float) -> None:
        """Back off before trying again; close() cuts it short."""
        self._wake.wait(seconds)
        self._wake.clear()

    def _prune(self, conn: sqlite3.Connection, prune: _Prune) -> None:
        """One batch; if more is left, the request goes back in the queue behind what came since.
        A failure is left for the next request: pruning is never worth a retry loop."""
        try:
            deleted = 0
            if prune.cutoff is not None:
                deleted = conn.execute("DELETE FROM calls WHERE id IN (SELECT id FROM calls WHERE ts < ? "
                                       f"ORDER BY ts LIMIT {PRUNE_BATCH})", (prune.cutoff,)).rowcount
                # The hourly detail per user and per latency bucket goes with the rows (a row per
                # user per hour is nearly a row per call); the daily and epoch sums stay.
                hour = int(prune.cutoff / rollups.HOUR)
                conn.execute("INSERT INTO meta (name, value) VALUES ('hourly_detail_from', ?) "
                             "ON CONFLICT DO UPDATE SET value = MAX(value, excluded.value)", (hour,))
                for table, key in (("users_hour", "bucket, user"), ("latency_hour", "bucket, kind, idx")):
                    deleted += conn.execute(f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} "
                                            f"WHERE bucket < ? LIMIT {PRUNE_BATCH})", (hour,)).rowcount
            deleted += conn.execute("DELETE FROM admissions WHERE key IN (SELECT key FROM admissions WHERE ts < ? "
                                    f"ORDER BY ts LIMIT {PRUNE_BATCH})", (prune.admissions_cutoff,)).rowcount
            if deleted:
                self.pruned += deleted
                self._queue.put(prune)
            else:
                # Give the freed pages back to the file system (auto_vacuum = INCREMENTAL), a
                # bounded number at a time for the same reason.
                conn.execute("PRAGMA incremental_vacuum(1000)").fetchall()
        except sqlite3.Error as exc:
            log.warning("ledger: pruning old rows failed (%s); will try again", exc)

    def prune(self, cutoff: float | None, admissions_cutoff: float) -> None:
        """Ask the writer to delete call rows older than `cutoff` (None: keep them all) and
        admissions older than `admissions_cutoff`, in small batches between the writes."""
        self._queue.put(_Prune(cutoff, admissions_cutoff))

    def _take(self, block: bool) -> list[object]:
        """What has queued: waits for the first item only when nothing is pending. Whatever queued
        up meanwhile goes into the same transaction: one commit per burst instead of one per call,
        with no timer delaying a lone row."""
        batch: list[object] = []
        if block:
            batch.append(self._queue.get())
        while len(batch) < self.BATCH and not (batch and isinstance(batch[-1], _Snapshot)):
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    @staticmethod
    def _write(conn: sqlite3.Connection, batch: list[CallRecord | _Epoch | Admission]) -> None:
        """Rows and epochs in queue order: an epoch starts after exactly the rows before it. The
        rollups take the same rows in the same transaction: they never disagree with the rows."""
        admissions = [_ADMISSION_ROW(item) for item in batch if isinstance(item, Admission)]
        # An admission already written is ignored: the first again fills the last statement up.
        write_many(conn, _INSERT_ADMISSION, admissions, nothing=admissions[0] if admissions else None)
        rows: list[tuple[object, ...]] = []
        epoch, last = conn.execute("SELECT (SELECT MAX(id) FROM epochs), (SELECT COALESCE(MAX(id), 0) FROM calls)"
                                   ).fetchone()

        def write_rows() -> None:
            # New rows take the ids after the last (no AUTOINCREMENT gaps inside a transaction),
            # so `last` is the row an epoch started now comes after. The rollups fold the rows
            # from the writer's hands, not read back.
            nonlocal last, rows
            if rows:
                write_many(conn, _INSERT_CALL, rows)
                rollups.add_rows(conn, rows, epoch)
                last += len(rows)
                rows = []

        for item in batch:
            if isinstance(item, CallRecord):
                rows.append(_ROW(item))
            elif isinstance(item, _Epoch):
                write_rows()
                epoch = conn.execute("INSERT INTO epochs (started, after_call) VALUES (?, ?)",
                                     (item.started, last)).lastrowid
        write_rows()

    def _after_failure(self, conn: sqlite3.Connection | None, exc: sqlite3.Error,
                       writes: list[CallRecord | _Epoch | Admission]) -> sqlite3.Connection | None:
        """Roll back, keep the rows, say so once per fault. Returns the connection to reuse."""
        reason = str(exc) or type(exc).__name__
        if self._failing is None:
            self._failing_since = time.monotonic()
            log.error("ledger: cannot write to %s (%s); keeping %d unwritten rows in memory and retrying",
                      self.path, reason, len(writes))
        self._failing = reason
        if conn is not None:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                conn.close()  # a connection that cannot even roll back is opened afresh
                return None
        return conn

    async def snapshot(self, since: float, timeout: float) -> Snapshot:
        """The epoch's sums and the cost by day since `since`, as of this moment in the write
        queue: every row appended before is in them, none appended after."""
        if self._thread is None:
            return self.read_snapshot(since)
        marker = _Snapshot(asyncio.get_running_loop(), since)
        self._queue.put(marker)
        self._hurry.set()
        try:
            return await asyncio.wait_for(asyncio.shield(marker.future), timeout)
        except asyncio.TimeoutError:
            raise LedgerError(f"the ledger has not caught up within {timeout:g} s") from None

    def read_snapshot(self, since: float) -> Snapshot:
        started, summary = self.epoch_summary()
        days, first = self.cost_by_day(since)
        return Snapshot(started, summary, days, first)

    # --- reading (own connection, any thread) ----------------------------------------------

    def epoch_summary(self, epoch: int | None = None) -> tuple[float, Summary]:
        """When stats epoch `epoch` (the current one by default) began, and its sums."""
        conn = _reader(self.path)
        try:
            row = conn.execute("SELECT id, started FROM epochs WHERE id = COALESCE(?, (SELECT MAX(id) FROM epochs))",
                               (epoch,)).fetchone()
            return float(row[1]), rollups.epoch_summary(conn, int(row[0]))
        finally:
            conn.close()

    def raw_since(self) -> float | None:
        """The time of the oldest call row still kept (older ones may have been pruned)."""
        conn = _reader(self.path)
        try:
            found = conn.execute("SELECT MIN(ts) FROM calls").fetchone()[0]
            return float(found) if found is not None else None
        finally:
            conn.close()

    def cost_by_day(self, since: float) -> tuple[dict[int, float], float | None]:
        """Cost per UTC day since `since`, and the ledger's first call time: seeds the projection."""
        conn = _reader(self.path)
        try:
            first = conn.execute("SELECT MIN(ts) FROM calls").fetchone()[0]
            oldest_day = conn.execute("SELECT MIN(bucket) FROM rollup_day").fetchone()[0]
            if oldest_day is not None and (first is None or oldest_day < int(first / rollups.DAY)):
                first = oldest_day * rollups.DAY  # older rows were pruned; their days are still summed
            return rollups.cost_by_day(conn, int(since // rollups.DAY)), first
        finally:
            conn.close()

    def history_pieces(self, filters: Filters, group_by: GroupBy | None, whole_hours: bool,
                       top_users: int | None = None) -> list[Piece]:
        """The sums a history folds into its buckets. With `whole_hours` (the stats zone's hours
        begin on UTC hours), whole hours come from the hourly rollups and only the partial hours at
        the ends from raw rows, by UTC quarter-hour (every zone's offset is a whole number of them);
        otherwise, or for a grouping the rollups do not hold, everything comes from raw rows. One
        connection, one read transaction: the rows and the rollups are read from one snapshot."""
        conn = _reader(self.path)
        try:
            conn.execute("BEGIN")
            return self._pieces(conn, filters, group_by, whole_hours, top_users)
        finally:
            conn.close()

    def _pieces(self, conn: Any, filters: Filters, group_by: GroupBy | None, whole_hours: bool,
                top_users: int | None) -> list[Piece]:
        """Which pieces come from the rollups and which from raw rows, whatever the engine: the
        engine answers `_hours`, `_raw_pieces`, `_history` and `_user_history` on `conn`."""
        columns = {column for column, _ in filters.equals} | ({group_by} if group_by else set())
        if not whole_hours or ("user" in columns and columns - {"user"}):
            return self._raw_pieces(conn, filters, group_by, None, None)
        first, last = self._hours(conn)
        if first is None or last is None:
            return self._raw_pieces(conn, filters, group_by, None, None)
        start = math.ceil(filters.since / rollups.HOUR) if filters.since is not None else first
        end = math.floor(filters.until / rollups.HOUR) if filters.until is not None else last + 1
        if end <= start:
            return self._raw_pieces(conn, filters, group_by, None, None)
        pieces = self._raw_pieces(conn, filters, group_by, start, end)
        if group_by == "user" and not filters.equals and top_users is not None:
            # Only the busiest users are named: read their hours, not every user's.
            edge: dict[str, int] = {}
            for piece in pieces:
                if piece[1] is not None:
                    edge[piece[1]] = edge.get(piece[1], 0) + piece[2]
            hours, named = self._user_history(conn, start, end, edge, top_users)
            return [(p[0], OTHERS if p[1] is not None and p[1] not in named else p[1], *p[2:])
                    for p in pieces] + hours
        return pieces + self._history(conn, start, end, filters.equals, group_by)

    @staticmethod
    def _hours(conn: Any) -> tuple[int | None, int | None]:
        """The first and last hour the hourly rollups hold."""
        # Two queries: MIN and MAX together would read the whole table, each alone one page.
        first = conn.execute("SELECT MIN(bucket) FROM rollup_hour").fetchone()[0]
        last = conn.execute("SELECT MAX(bucket) FROM rollup_hour").fetchone()[0]
        return (None, None) if first is None else (int(first), int(last))

    @staticmethod
    def _history(conn: Any, start: int, end: int, equals: tuple[tuple[str, str], ...],
                 group_by: str | None) -> list[Piece]:
        return rollups.history(conn, start, end, equals, group_by)

    @staticmethod
    def _user_history(conn: Any, start: int, end: int, edge: dict[str, int],
                      top: int) -> tuple[list[Piece], set[str]]:
        return rollups.user_history(conn, start, end, edge, top)

    @staticmethod
    def _raw_pieces(conn: Any, filters: Filters, group_by: GroupBy | None, start: int | None,
                    end: int | None) -> list[Piece]:
        """Raw rows by UTC quarter-hour; with `start`/`end`, only those outside the whole hours
        [start, end) the rollups give."""
        since = filters.since if filters.since is not None else float("-inf")
        until = filters.until if filters.until is not None else float("inf")
        # Two narrow ranges on the ts index, each with one lower and one upper bound (SQLite
        # uses one of each; an OR, or a second bound, scanned the whole period between).
        ranges = [(since, until, "")] if start is None or end is None else [
            (since, min(until, start * rollups.HOUR + 1), f" AND CAST(ts / {rollups.HOUR} AS INTEGER) < {start}"),
            (max(since, end * rollups.HOUR - 1), until, f" AND CAST(ts / {rollups.HOUR} AS INTEGER) >= {end}")]
        group = f'"{group_by}"' if group_by else "NULL"
        pieces: list[Piece] = []
        for lo, hi, clause in ranges:
            where, params = _where(replace(filters, since=lo, until=hi))
            pieces += [(q * _QUARTER, *rest) for q, *rest in conn.execute(
                f"""SELECT CAST(ts / {_QUARTER} AS INTEGER) AS q, {group} AS grp,
                           COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_usd),
                           SUM({IS_ERROR_SQL}), SUM(estimated)
                    FROM calls WHERE {where}{clause} GROUP BY q, grp""", params)]
        return pieces

    def export_rows(self, filters: Filters, batch: int = 2000) -> Iterator[list[tuple[Any, ...]]]:
        """Every row the filters cover, attempts included, in time order, `batch` at a time."""
        where, params = _where(replace(filters, attempts=True))
        conn = _reader(self.path)
        try:
            cursor = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM calls WHERE {where} ORDER BY ts, id", params)
            while rows := cursor.fetchmany(batch):
                yield rows
        finally:
            conn.close()

    def spend(self, since: float) -> list[Spend]:
        """What the calls since `since` cost, by upstream, model, proxy key and user: where the
        budgets start from (a month of raw rows at most; retention keeps them, see config)."""
        conn = _reader(self.path)
        try:
            return [(str(u), str(m), k, n, float(c)) for u, m, k, n, c in conn.execute(
                "SELECT upstream, model, key_id, user, SUM(cost_usd) FROM calls WHERE ts >= ? AND cost_usd > 0 "
                "GROUP BY 1, 2, 3, 4", (since,))]
        finally:
            conn.close()

    def latency_hours(self, start_hour: int, end_hour: int) -> list[tuple[int, int, int, int]]:
        """The latency and time-to-first-token histograms of UTC hours [start, end): (hour, kind,
        bucket index, count) from the hourly rollups, every call of each hour."""
        conn = _reader(self.path)
        try:
            return [tuple(r) for r in conn.execute(
                "SELECT bucket, kind, idx, n FROM latency_hour WHERE bucket >= ? AND bucket < ?",
                (start_hour, end_hour))]
        finally:
            conn.close()

    def recent(self, filters: Filters, outcome: str | None, limit: int) -> list[CallRecord]:
        """The newest calls the filters cover (before `filters.until`), newest first."""
        where, params = _where(filters)
        if outcome is not None:
            where, params = where + " AND outcome = ?", [*params, outcome]
        conn = _reader(self.path)
        try:
            return [_record(row) for row in conn.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM calls WHERE {where} ORDER BY ts DESC, id DESC LIMIT ?",
                (*params, limit))]
        finally:
            conn.close()

    def rows(self, since: float | None = None, until: float | None = None) -> Iterator[CallRecord]:
        """Rows in time order, streamed from the database rather than loaded whole."""
        conn = _reader(self.path)
        try:
            cursor = conn.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM calls WHERE ts >= ? AND ts < ? ORDER BY ts, id",
                (since if since is not None else float("-inf"),
                 until if until is not None else float("inf")),
            )
            for row in cursor:
                yield _record(row)
        finally:
            conn.close()

    def replay_admissions(self, since: float) -> Iterator[Admission]:
        """Admissions since `since`, oldest first, each with the real tokens of its call if the
        call finished (and the tokens counted at admission if it never did); and the calls that
        stood for their own admission (COUNTED_BY_ROW), admitted when they started."""
        conn = _reader(self.path)
        try:
            # "+c.admission": by the time index, never by the admission one (every counted
            # row ever written has the same admission, so that index would read them all).
            cursor = conn.execute(
                """SELECT a.key, a.ts, a.upstream, a.model, a.user, a.key_id,
                          COALESCE(c.prompt_tokens + c.completion_tokens, a.tokens)
                   FROM admissions a LEFT JOIN calls c ON c.admission = a.key
                   WHERE a.ts >= ?
                   UNION ALL
                   SELECT 'call:' || c.id, c.ts - c.latency_s, c.upstream, c.model, c.user, c.key_id,
                          c.prompt_tokens + c.completion_tokens
                   FROM calls c WHERE c.ts >= ? AND +c.admission = ? AND c.ts - c.latency_s >= ?
                   ORDER BY 2""", (since, since, COUNTED_BY_ROW, since))
            for row in cursor:
                yield Admission(*row)
        finally:
            conn.close()

    def count(self) -> int:
        conn = _reader(self.path)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0])
        finally:
            conn.close()


_BOOLEANS = [_COLUMNS.index(name) for name in ("stream", "estimated", "final")]


def _record(row: tuple[object, ...]) -> CallRecord:
    values = list(row)
    for index in _BOOLEANS:
        values[index] = bool(values[index])
    return CallRecord(*values)  # type: ignore[arg-type]


