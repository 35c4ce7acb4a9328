"""The ledger: one SQLite row per call, in WAL mode, written by a single thread.

The ledger is the single source of truth. Aggregates and rate windows are rebuilt from it at
start, so a restart neither forgets usage nor hands out a fresh daily quota.

Durability window: `append` only queues the row; the writer thread commits whatever has
queued as one transaction, straight away, so a row is on disk within one commit (typically a
few milliseconds) of the call finishing. With WAL and synchronous=NORMAL a committed row
survives the process being killed; only a power loss can take the last commits back.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import threading
from collections.abc import Iterator
import operator
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(slots=True)
class CallRecord:
    ts: float                 # wall clock (unix seconds) when the call finished
    upstream: str             # upstream that served it, "" when none was chosen
    model: str                # the model name the client used
    dialect: str              # "openai" or "ollama"
    endpoint: str             # chat, completion, embedding, responses, generate, embed, ...
    type: str                 # request type (chat, presentacion, ...)
    user: str | None
    stream: bool
    status: int               # HTTP status the client saw
    outcome: str              # errors.OUTCOMES
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    estimated: bool           # tokens are tiktoken estimates, not the upstream's report
    latency_s: float
    ttft_s: float | None      # time to first streamed chunk
    cost_usd: float
    fallback_from: str | None = None  # the upstream that could not take the call
    key_id: str | None = None         # the proxy key's name (never the key itself)
    admission: str | None = None      # the key of its row in `admissions`, if a limit admitted it

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass(slots=True)
class Admission:
    """A call let through the limiter, written when it is let through, not when it ends: after a
    crash the windows still count the calls that were in flight."""

    key: str
    ts: float                 # limiter clock at admission
    upstream: str
    model: str
    user: str | None
    key_id: str | None
    tokens: int               # what admission counted; the finished call's row has the real figure


_COLUMNS = [f.name for f in fields(CallRecord)]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL, upstream TEXT NOT NULL, model TEXT NOT NULL, dialect TEXT NOT NULL,
    endpoint TEXT NOT NULL, type TEXT NOT NULL, user TEXT, stream INTEGER NOT NULL,
    status INTEGER NOT NULL, outcome TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, estimated INTEGER NOT NULL,
    latency_s REAL NOT NULL, ttft_s REAL, cost_usd REAL NOT NULL, fallback_from TEXT, key_id TEXT,
    admission TEXT
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
# Rows per INSERT statement (SQLite allows 32,766 parameters; 18 columns x 500 is well under).
_ROWS_PER_STATEMENT = 500


def _insert_many(conn: sqlite3.Connection, table: str, columns: list[str], rows: list[tuple[object, ...]],
                 ignore: bool = False) -> None:
    """Insert `rows` with multi-row statements rather than executemany.

    The sqlite3 module lets go of the GIL around every statement step; executemany steps once
    per row, and against a busy event loop each step can wait a whole switch interval (5 ms) to
    get the GIL back, so a burst of rows fell hundreds of milliseconds behind. One step per
    500 rows keeps the ledger within a few milliseconds of the calls.
    """
    verb = "INSERT OR IGNORE" if ignore else "INSERT"
    one = "(" + ", ".join("?" * len(columns)) + ")"
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[start:start + _ROWS_PER_STATEMENT]
        conn.execute(f"{verb} INTO {table} ({', '.join(columns)}) VALUES {', '.join([one] * len(chunk))}",
                     [value for row in chunk for value in row])


@dataclass(slots=True)
class _Epoch:
    started: float


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


_STOP = object()


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def make_private_dir(path: Path) -> None:
    """Create `path` (and parents) readable by the owner only; tighten it if it exists."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    # --- lifecycle -------------------------------------------------------------------

    def open(self, now: float) -> None:
        """Create the file owner-only, set up the schema and start the writer thread."""
        make_private_dir(self.path.parent)
        # SQLite creates its -wal and -shm files with the main file's mode, so 0600 here
        # makes all three private.
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(self.path, 0o600)
        conn = _connect(self.path)
        try:
            conn.executescript(_SCHEMA)
            # Columns added after the first release: bring an older ledger up to date.
            columns = {row[1] for row in conn.execute("PRAGMA table_info(calls)")}
            if "after_call" not in {row[1] for row in conn.execute("PRAGMA table_info(epochs)")}:
                conn.execute("ALTER TABLE epochs ADD COLUMN after_call INTEGER NOT NULL DEFAULT 0")
            for added in ("fallback_from", "key_id", "admission"):
                if added not in columns:
                    conn.execute(f"ALTER TABLE calls ADD COLUMN {added} TEXT")
            conn.execute("CREATE INDEX IF NOT EXISTS calls_admission ON calls(admission)")
            if conn.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 0:
                conn.execute("INSERT INTO epochs (started, after_call) VALUES (?, 0)", (now,))
        finally:
            conn.close()
        self._thread = threading.Thread(target=self._writer, name="tollgate-ledger", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Commit what is queued and stop the writer. Safe to call more than once."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join()

    # --- writing (any thread) -----------------------------------------------------------

    def append(self, record: CallRecord) -> None:
        self._queue.put(record)

    def admit(self, admission: Admission) -> None:
        self._queue.put(admission)

    def new_epoch(self, started: float) -> None:
        self._queue.put(_Epoch(started))

    async def flush(self) -> None:
        """Wait until everything appended so far is committed."""
        if self._thread is None:
            return
        marker = _Flush(asyncio.get_running_loop())
        self._queue.put(marker)
        await marker.future

    def _writer(self) -> None:
        conn = _connect(self.path)
        try:
            stop = False
            while not stop:
                batch = [self._queue.get()]
                # Whatever queued up meanwhile goes into the same transaction: one commit per
                # burst instead of one per call, with no timer delaying a lone row.
                while len(batch) < 2000:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if any(isinstance(item, (CallRecord, _Epoch, Admission)) for item in batch):
                    conn.execute("BEGIN")
                    self._write(conn, batch)
                    conn.execute("COMMIT")
                for item in batch:
                    if isinstance(item, _Flush):
                        item.done()
                    elif item is _STOP:
                        stop = True
        finally:
            conn.close()

    @staticmethod
    def _write(conn: sqlite3.Connection, batch: list[object]) -> None:
        """Rows and epochs in queue order: an epoch starts after exactly the rows before it."""
        _insert_many(conn, "admissions", _ADMISSION_COLUMNS,
                     [_ADMISSION_ROW(item) for item in batch if isinstance(item, Admission)], ignore=True)
        rows: list[tuple[object, ...]] = []
        for item in batch:
            if isinstance(item, CallRecord):
                rows.append(_ROW(item))
            elif isinstance(item, _Epoch):
                _insert_many(conn, "calls", _COLUMNS, rows)
                rows = []
                conn.execute("INSERT INTO epochs (started, after_call) "
                             "SELECT ?, COALESCE(MAX(id), 0) FROM calls", (item.started,))
        _insert_many(conn, "calls", _COLUMNS, rows)

    # --- reading (own connection, any thread) ----------------------------------------------

    def epoch(self) -> tuple[float, int]:
        """The current stats epoch: when it started, and the last row id before it."""
        conn = _connect(self.path)
        try:
            row = conn.execute("SELECT started, after_call FROM epochs ORDER BY id DESC LIMIT 1").fetchone()
        finally:
            conn.close()
        return float(row[0]), int(row[1])

    def replay_rows(self, since: float, after_call: int) -> Iterator[tuple[CallRecord, bool]]:
        """Rows finished since `since` or in the epoch (id > after_call), in ledger order,
        each with whether it belongs to the epoch."""
        conn = _connect(self.path)
        try:
            cursor = conn.execute(
                f"SELECT {', '.join(_COLUMNS)}, id > ? FROM calls WHERE ts >= ? OR id > ? ORDER BY id",
                (after_call, since, after_call))
            for row in cursor:
                yield _record(row[:-1]), bool(row[-1])
        finally:
            conn.close()

    def rows(self, since: float | None = None, until: float | None = None) -> Iterator[CallRecord]:
        """Rows in time order, streamed from the database rather than loaded whole."""
        conn = _connect(self.path)
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
        call finished (and the tokens counted at admission if it never did)."""
        conn = _connect(self.path)
        try:
            cursor = conn.execute(
                """SELECT a.key, a.ts, a.upstream, a.model, a.user, a.key_id,
                          COALESCE(c.prompt_tokens + c.completion_tokens, a.tokens)
                   FROM admissions a LEFT JOIN calls c ON c.admission = a.key
                   WHERE a.ts >= ? ORDER BY a.ts""", (since,))
            for row in cursor:
                yield Admission(*row)
        finally:
            conn.close()

    def count(self) -> int:
        conn = _connect(self.path)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0])
        finally:
            conn.close()


COLUMNS = tuple(_COLUMNS)
_STREAM, _ESTIMATED = _COLUMNS.index("stream"), _COLUMNS.index("estimated")


def _record(row: tuple[object, ...]) -> CallRecord:
    values = list(row)
    values[_STREAM], values[_ESTIMATED] = bool(values[_STREAM]), bool(values[_ESTIMATED])
    return CallRecord(*values)  # type: ignore[arg-type]
