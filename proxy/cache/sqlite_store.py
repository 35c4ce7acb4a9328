"""The answer cache in a SQLite file (`[cache] backend = "sqlite"`): kept across restarts and
shared by the workers of one machine.

The file is `data_dir/cache.sqlite3`, owner-only like the ledger (entries hold message text and
answers). Each entry is one row; the bytes held are one counter row kept in the same
transaction as every insert and delete, so the bound holds across processes without summing the
table. Reads and writes run on a worker thread: a commit's fsync never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..files import make_private_dir
from .store import Entry

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY, namespace TEXT NOT NULL, expires REAL NOT NULL, used INTEGER NOT NULL,
    size INTEGER NOT NULL, data BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_used ON entries(used);
CREATE INDEX IF NOT EXISTS entries_namespace ON entries(namespace);
CREATE INDEX IF NOT EXISTS entries_expires ON entries(expires);
CREATE TABLE IF NOT EXISTS held (id INTEGER PRIMARY KEY CHECK (id = 1), entries INTEGER NOT NULL,
                                 bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO held VALUES (1, 0, 0);
"""
# An entry's place in the order of use: one more than the latest (a counter, not the clock, so two
# uses in the same instant still have an order). One index step.
_NEXT = "(SELECT COALESCE(MAX(used), 0) + 1 FROM entries)"


class SqliteCache:
    def __init__(self, path: Path, max_bytes: int, max_entry_bytes: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self.clock = clock
        make_private_dir(path.parent)
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(path, 0o600)   # the -wal and -shm files take the main file's mode
        self._conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        self._lock = threading.Lock()   # one connection, one statement sequence at a time

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return work(self._conn)
        return await asyncio.to_thread(locked)

    async def find(self, key: str) -> Entry | None:
        now = self.clock()

        def find(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT data, expires FROM entries WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            if row[1] <= now:
                conn.execute("BEGIN IMMEDIATE")
                _delete(conn, "key = ?", (key,))
                conn.execute("COMMIT")
                return None
            conn.execute(f"UPDATE entries SET used = {_NEXT} WHERE key = ?", (key,))
            return bytes(row[0])

        data = await self._run(find)
        return Entry.unpack(data) if data is not None else None

    async def keep(self, entry: Entry) -> tuple[int, int] | None:
        if entry.size > self.max_entry_bytes:
            return None
        now = self.clock()

        def keep(conn: sqlite3.Connection) -> tuple[int, int]:
            conn.execute("BEGIN IMMEDIATE")
            try:
                _delete(conn, "key = ?", (entry.key,))
                _delete(conn, "expires <= ?", (now,))
                while conn.execute("SELECT bytes FROM held").fetchone()[0] + entry.size > self.max_bytes:
                    oldest = conn.execute("SELECT key FROM entries ORDER BY used LIMIT 1").fetchone()
                    if oldest is None:
                        break
                    _delete(conn, "key = ?", (oldest[0],))
                conn.execute(f"INSERT INTO entries VALUES (?, ?, ?, {_NEXT}, ?, ?)",
                             (entry.key, entry.namespace, entry.created + entry.ttl_s, entry.size, entry.pack()))
                conn.execute("UPDATE held SET entries = entries + 1, bytes = bytes + ?", (entry.size,))
                entries, held = conn.execute("SELECT entries, bytes FROM held").fetchone()
                conn.execute("COMMIT")
                return int(entries), int(held)
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        return await self._run(keep)

    async def drop(self, namespace: str | None) -> int:
        def drop(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            gone = _delete(conn, "namespace = ?", (namespace,)) if namespace is not None else _delete(conn, "1", ())
            conn.execute("COMMIT")
            return gone

        return await self._run(drop)

    async def size(self) -> tuple[int, int]:
        def size(conn: sqlite3.Connection) -> tuple[int, int]:
            entries, held = conn.execute("SELECT entries, bytes FROM held").fetchone()
            return int(entries), int(held)

        return await self._run(size)

    async def close(self) -> None:
        await self._run(lambda conn: conn.close())


def _delete(conn: sqlite3.Connection, where: str, params: tuple[object, ...]) -> int:
    """Delete the matching entries and take them off the counter; returns how many went."""
    count, size = conn.execute(f"SELECT COUNT(*), TOTAL(size) FROM entries WHERE {where}", params).fetchone()
    if count:
        conn.execute(f"DELETE FROM entries WHERE {where}", params)
        conn.execute("UPDATE held SET entries = entries - ?, bytes = bytes - ?", (count, int(size)))
    return int(count)
