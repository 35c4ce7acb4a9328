"""Rows written to SQLite many to a statement, for the ledger writer and its rollups.

The sqlite3 module lets go of the GIL around every statement step; executemany steps once per
row, and against a busy event loop each step can wait a whole switch interval to get the GIL
back, so a burst of rows fell hundreds of milliseconds behind the calls. One multi-row statement
per 500 rows is one step: the ledger stays within milliseconds of the calls under load.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

# SQLite allows 32,766 parameters a statement: 500 rows of the widest table (21 columns) fit.
ROWS_PER_STATEMENT = 500


def insert_many(conn: sqlite3.Connection, head: str, width: int, rows: Sequence[Sequence[object]],
                tail: str = "") -> None:
    """`head` VALUES (...), (...), ... `tail`: an INSERT of `width` columns, and an optional
    ON CONFLICT clause (an upsert), for `rows` in chunks."""
    one = "(" + ", ".join("?" * width) + ")"
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        chunk = rows[start:start + ROWS_PER_STATEMENT]
        conn.execute(f"{head} VALUES {', '.join([one] * len(chunk))} {tail}",
                     [value for row in chunk for value in row])
