"""Reports over the ledger: usage per hour or day, busiest hours and weekdays, CSV exports.

Everything here is SQL run by SQLite (aggregation in C over the `ts` index), on the caller's
thread: the app calls it through an executor, never on the event loop. Buckets are local hours
and days of the stats zone, right across DST changes: SQLite groups by UTC quarter-hour (every
zone's offset is a whole number of quarter-hours), and each quarter folds into the local hour or
day it falls in, with zoneinfo's rules for that instant. The hour repeated when clocks go back
is two buckets, as it is two hours.
"""

from __future__ import annotations

import csv
import io
import sqlite3
from collections.abc import Generator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

from .store import COLUMNS

Bucket = Literal["hour", "day"]
GroupBy = Literal["upstream", "model", "type", "user"]
GROUPS: tuple[GroupBy, ...] = ("upstream", "model", "type", "user")
_SIZES = {"hour": 3600, "day": 86400}
_WEEKDAYS = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")


@dataclass(frozen=True)
class Filters:
    since: float | None = None
    until: float | None = None
    equals: tuple[tuple[GroupBy, str], ...] = ()  # e.g. (("upstream", "gpt4o_cloud"),)
    # Reports count calls; an export shows every row, the attempts before a fallback included.
    attempts: bool = False

    def where(self) -> tuple[str, list[Any]]:
        clauses = ["ts >= ?", "ts < ?"] + ([] if self.attempts else ["final = 1"])
        params: list[Any] = [self.since if self.since is not None else float("-inf"),
                             self.until if self.until is not None else float("inf")]
        for column, value in self.equals:
            assert column in GROUPS  # the column name is ours, never the client's text
            clauses.append(f'"{column}" = ?')
            params.append(value)
        return " AND ".join(clauses), params


def parse_time(value: str, tz: ZoneInfo) -> float:
    """A unix time, or an ISO date/time (2024-01-15, 2024-01-15T14:00, with or without an
    offset); without one, it is a local time in `tz`, the stats zone."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a time: expected an ISO date such as 2024-01-15, or a unix time") from None
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=tz)).timestamp()


def local_start(ts: float, bucket: Bucket, tz: ZoneInfo) -> float:
    """The instant the local hour or day holding `ts` began."""
    moment = datetime.fromtimestamp(ts, tz)
    if bucket == "hour":
        return moment.replace(minute=0, second=0, microsecond=0).timestamp()
    return moment.replace(hour=0, minute=0, second=0, microsecond=0, fold=0).timestamp()


def _connect(path: Path) -> sqlite3.Connection:
    # Read-only: a report can never write to the ledger. check_same_thread off: a streamed
    # export is read batch by batch from whichever executor thread is free, never two at once.
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0, check_same_thread=False)


_QUARTER = 900


def history(path: Path, bucket: Bucket, filters: Filters, group_by: GroupBy | None,
            tz: ZoneInfo, now: float) -> dict[str, Any]:
    where, params = filters.where()
    group = f'"{group_by}"' if group_by else "NULL"
    conn = _connect(path)
    try:
        rows = conn.execute(
            f"""SELECT CAST(ts / {_QUARTER} AS INTEGER) AS q, {group} AS grp,
                       COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_usd),
                       SUM(outcome != 'ok'), SUM(estimated)
                FROM calls WHERE {where} GROUP BY q, grp""", params).fetchall()
    finally:
        conn.close()
    folded: dict[tuple[float, Any], list[float]] = {}
    hours: dict[int, list[int]] = {}
    days: dict[int, list[int]] = {}
    for quarter, grp, *sums in rows:
        start = quarter * _QUARTER
        into = folded.setdefault((local_start(start, bucket, tz), grp), [0, 0, 0, 0.0, 0, 0])
        for i, value in enumerate(sums):
            into[i] += value
        moment = datetime.fromtimestamp(start, tz)
        # isoweekday: Monday 1 .. Sunday 7; % 7 makes Sunday 0, as _WEEKDAYS lists them.
        for table, key in ((hours, moment.hour), (days, moment.isoweekday() % 7)):
            counts = table.setdefault(key, [0, 0])
            counts[0] += sums[0]
            counts[1] += sums[1] + sums[2]
    buckets = []
    for (start, grp), (requests, prompt, completion, cost, errors, estimated) in sorted(
            folded.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        entry: dict[str, Any] = {"start": start, "start_local": _local(start, tz),
                                 "requests": int(requests), "prompt_tokens": int(prompt),
                                 "completion_tokens": int(completion), "total_tokens": int(prompt + completion),
                                 "cost_usd": round(cost, 6), "errors": int(errors), "estimated_calls": int(estimated)}
        if group_by:
            entry[group_by] = grp
        buckets.append(entry)
    busiest = sorted(hours.items(), key=lambda kv: (-kv[1][0], kv[0]))
    weekdays = sorted(days.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return {
        "bucket": bucket, "group_by": group_by, "since": filters.since, "until": filters.until,
        "timezone": str(tz.key), "buckets": buckets,
        "busiest_hours": [{"hour": h, "requests": n, "tokens": t} for h, (n, t) in busiest],
        "busiest_weekdays": [{"weekday": _WEEKDAYS[d], "requests": n, "tokens": t} for d, (n, t) in weekdays],
    }


def _local(ts: float, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(ts, tz).replace(tzinfo=None).isoformat(timespec="seconds")


def recent_costs(path: Path, since: float) -> tuple[dict[int, float], float | None]:
    """Cost per UTC day since `since`, and the ledger's first call time: seeds the projection."""
    conn = _connect(path)
    try:
        rows = conn.execute("SELECT CAST(ts / 86400 AS INTEGER) AS d, SUM(cost_usd) FROM calls "
                            "WHERE ts >= ? GROUP BY d", (since,)).fetchall()
        first = conn.execute("SELECT MIN(ts) FROM calls").fetchone()[0]
    finally:
        conn.close()
    return {int(day): float(cost) for day, cost in rows}, first


def csv_chunks(path: Path, filters: Filters, tz: ZoneInfo, batch: int = 2000) -> Generator[bytes, None, None]:
    """The ledger's rows as CSV, a header then `batch` rows at a time: memory stays flat. Each row
    carries its time twice: `ts` (unix seconds) and `time` (ISO 8601 with the stats zone's offset)."""
    where, params = replace(filters, attempts=True).where()
    conn = _connect(path)
    try:
        cursor = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM calls WHERE {where} ORDER BY ts, id", params)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(("ts", "time", *COLUMNS[1:]))
        while True:
            rows = cursor.fetchmany(batch)
            writer.writerows((row[0], datetime.fromtimestamp(row[0], tz).isoformat(timespec="milliseconds"),
                              *map(safe_cell, row[1:])) for row in rows)
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
            if not rows:
                return
    finally:
        conn.close()


def snapshot_row(stats: dict[str, Any], now: datetime) -> list[object]:
    """The seed's periodic CSV line: time, total requests, total tokens, cost, success rate."""
    return [safe_cell(value) for value in (str(now), str(stats["total_requests"]), str(stats["tokens"]["total"]),
                                           stats["costo_estimado_usd"], stats["tasa_exito"])]


# OWASP's CSV injection rule: a spreadsheet runs a cell that starts with one of these as a
# formula. Model, user and type names come from clients, so text cells starting so are prefixed
# with a single quote (shown, not run); numbers are never text here and stay numbers.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: object) -> object:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
