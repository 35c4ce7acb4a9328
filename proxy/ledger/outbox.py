"""Where the PostgreSQL ledger's writes wait while the database cannot be reached.

A local SQLite file, owner-only, in the data directory: each batch the writer could not commit
is appended in one transaction, in queue order, and taken back out oldest first once the
database answers again, deleted only after the database has committed it. Every item carries
its unique id (a row's, an admission's key, an epoch's marker), so a batch replayed twice, after
a crash between the database's commit and the outbox's delete, is written once.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import orjson

from ..files import make_private_dir

_SCHEMA = "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, data BLOB)"

Item = tuple[str, tuple[object, ...]]   # ("call" | "admission" | "epoch", its values)


class Outbox:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self.size = 0   # items waiting

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            make_private_dir(self.path.parent)
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(_SCHEMA)
            self.size = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            self._conn = conn
        return self._conn

    def open(self) -> int:
        """Items left by an earlier run (it stopped while the database was away)."""
        self._connect()
        return self.size

    def put(self, items: list[Item]) -> None:
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT INTO outbox (kind, data) VALUES (?, ?)",
                             [(kind, orjson.dumps(values)) for kind, values in items])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.size += len(items)

    def oldest(self, limit: int) -> tuple[int, list[Item]]:
        """Up to `limit` items, oldest first, and the sequence number of the last of them."""
        rows = self._connect().execute("SELECT seq, kind, data FROM outbox ORDER BY seq LIMIT ?", (limit,)).fetchall()
        if not rows:
            return 0, []
        return rows[-1][0], [(kind, tuple(orjson.loads(data))) for _, kind, data in rows]

    def done(self, upto: int) -> None:
        """The database has committed everything up to `upto`."""
        conn = self._connect()
        self.size -= conn.execute("DELETE FROM outbox WHERE seq <= ?", (upto,)).rowcount

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
