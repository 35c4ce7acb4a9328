"""Many rows per SQLite statement: the writer's inserts and the rollups' upserts.

The sqlite3 module lets go of the GIL around every statement step, and executemany steps once
per row: against a busy event loop each step can wait up to a switch interval to get the GIL
back, so the writer's statements a transaction, not its rows, set how far the ledger trails the
calls. With the rollups upserted a step per user and per latency bucket, a burst of calls from
many users left it hundreds of milliseconds behind (bench/crash_lag.py); one statement of many
rows takes one step.

Each statement takes a power of two of rows (100 rows: 64, 32 and 4), so a table has ten
statement texts at most and each is prepared once, then found in the connection's cache; with
one text per batch size, every batch prepared a statement of thousands of parameters anew (a
fifth of the cost of writing a row).
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from itertools import chain

# The sqlite3 module binds an exact int, float or str at once, but takes anything else (None, a
# bool) for something that may need adapting: it builds a key tuple, misses in its registry, then
# asks the protocol type for __adapt__, whose AttributeError it formats and throws away. A call
# row holds three bools and mostly four Nones, and that was a third of what binding it cost the
# writer, all of it holding the GIL (1.3 of 3.6 µs a row). Registered, each is one registry hit
# and binds as before: a bool as its int, None as NULL, in every connection of the process.
sqlite3.register_adapter(bool, int)
_NULLS: dict[None, None] = {}
sqlite3.register_adapter(type(None), _NULLS.get)  # C that answers None for None

# Rows per statement at most: SQLite allows 32,766 parameters, and 25 columns x 512 is well under.
MOST_ROWS = 512


def write_many(conn: sqlite3.Connection, head: str, rows: Sequence[tuple[object, ...]], tail: str = "") -> None:
    """Run `head VALUES (?, ...), (?, ...) tail` over `rows` (all of one width), a power of two
    of them per statement. `head` is an INSERT naming its columns; `tail` may be an ON CONFLICT
    clause, which then also sees the rows of its own statement (the caller sends each key once)."""
    if not rows:
        return
    width, start = len(rows[0]), 0
    while start < len(rows):
        size = min(MOST_ROWS, 1 << ((len(rows) - start).bit_length() - 1))
        conn.execute(_statement(head, width, size, tail), list(chain.from_iterable(rows[start:start + size])))
        start += size


@functools.lru_cache(maxsize=128)
def _statement(head: str, width: int, rows: int, tail: str) -> str:
    one = "(" + ", ".join("?" * width) + ")"
    return f"{head} VALUES {', '.join([one] * rows)} {tail}".rstrip()
