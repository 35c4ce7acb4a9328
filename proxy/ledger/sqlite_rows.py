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
fifth of the cost of writing a row). Where a row can be written that changes nothing (an upsert
adding zeros to a key already written, an INSERT OR IGNORE of a key already there), the last
statement is filled up with it instead: one statement, not one per bit of the count. Each
statement is a hand-off of the GIL, and under load each hand-off costs both threads futex calls
and context switches: with 21 statements a transaction, 2 futex calls a call in the writer and
1.7 in the event loop; filled up, the same transaction is 11 statements.
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


def write_many(conn: sqlite3.Connection, head: str, rows: Sequence[tuple[object, ...]], tail: str = "",
               nothing: tuple[object, ...] | None = None) -> None:
    """Run `head VALUES (?, ...), (?, ...) tail` over `rows` (all of one width), a power of two
    of them per statement. `head` is an INSERT naming its columns; `tail` may be an ON CONFLICT
    clause, which then also sees the rows of its own statement (the caller sends each key once).
    `nothing`, a row that changes nothing written after the others, fills the last statement up
    to its power of two: then rows take one statement for every MOST_ROWS."""
    if not rows:
        return
    width, start = len(rows[0]), 0
    while start < len(rows):
        left = len(rows) - start
        size = min(MOST_ROWS, 1 << ((left - 1).bit_length() if nothing is not None else left.bit_length() - 1))
        values = list(chain.from_iterable(rows[start:start + size]))
        if nothing is not None and left < size:
            values += nothing * (size - left)
        conn.execute(_statement(head, width, size, tail), values)
        start += size


@functools.lru_cache(maxsize=128)
def _statement(head: str, width: int, rows: int, tail: str) -> str:
    one = "(" + ", ".join("?" * width) + ")"
    return f"{head} VALUES {', '.join([one] * rows)} {tail}".rstrip()
