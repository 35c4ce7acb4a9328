"""Reports over the ledger: usage per hour or day, busiest hours and weekdays, CSV exports.

Everything here is SQL run by SQLite (aggregation in C over the `ts` index), on the caller's
thread: the app calls it through an executor, never on the event loop. Buckets are in the
stats time zone, using its UTC offset now (a report that spans a DST change shifts the buckets
on one side of it by an hour).
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


def utc_offset(tz: ZoneInfo | None, now: float) -> float:
    """Seconds east of UTC of `tz` (None: the machine's local zone) at `now`."""
    moment = datetime.fromtimestamp(now, tz) if tz is not None else datetime.fromtimestamp(now).astimezone()
    offset = moment.utcoffset()
    return offset.total_seconds() if offset is not None else 0.0


def parse_time(value: str) -> float:
    """A unix time, or an ISO date/time (2024-01-15, 2024-01-15T14:00) in the machine's zone."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ValueError(f"{value!r} is not a time: expected an ISO date such as 2024-01-15, or a unix time") from None


def _connect(path: Path) -> sqlite3.Connection:
    # Read-only: a report can never write to the ledger. check_same_thread off: a streamed
    # export is read batch by batch from whichever executor thread is free, never two at once.
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0, check_same_thread=False)


def history(path: Path, bucket: Bucket, filters: Filters, group_by: GroupBy | None,
            tz: ZoneInfo | None, now: float) -> dict[str, Any]:
    size, offset = _SIZES[bucket], utc_offset(tz, now)
    where, params = filters.where()
    group = f'"{group_by}"' if group_by else "NULL"
    conn = _connect(path)
    try:
        rows = conn.execute(
            f"""SELECT CAST((ts + ?) / ? AS INTEGER) * ? - ? AS bucket, {group} AS grp,
                       COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_usd),
                       SUM(outcome != 'ok'), SUM(estimated)
                FROM calls WHERE {where} GROUP BY bucket, grp ORDER BY bucket, grp""",
            [offset, size, size, offset, *params]).fetchall()
        hours = conn.execute(
            f"""SELECT CAST(((ts + ?) % 86400) / 3600 AS INTEGER) AS h, COUNT(*), SUM(prompt_tokens + completion_tokens)
                FROM calls WHERE {where} GROUP BY h ORDER BY COUNT(*) DESC, h""", [offset, *params]).fetchall()
        days = conn.execute(
            f"""SELECT CAST(strftime('%w', ts + ?, 'unixepoch') AS INTEGER) AS d, COUNT(*),
                       SUM(prompt_tokens + completion_tokens)
                FROM calls WHERE {where} GROUP BY d ORDER BY COUNT(*) DESC, d""", [offset, *params]).fetchall()
    finally:
        conn.close()
    buckets = []
    for start, grp, requests, prompt, completion, cost, errors, estimated in rows:
        entry: dict[str, Any] = {"start": start, "start_local": _local(start, tz),
                                 "requests": requests, "prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion, "cost_usd": round(cost, 6),
                                 "errors": errors, "estimated_calls": estimated}
        if group_by:
            entry[group_by] = grp
        buckets.append(entry)
    return {
        "bucket": bucket, "group_by": group_by, "since": filters.since, "until": filters.until,
        "buckets": buckets,
        "busiest_hours": [{"hour": h, "requests": n, "tokens": t} for h, n, t in hours],
        "busiest_weekdays": [{"weekday": _WEEKDAYS[d], "requests": n, "tokens": t} for d, n, t in days],
    }


def _local(ts: float, tz: ZoneInfo | None) -> str:
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


def csv_chunks(path: Path, filters: Filters, batch: int = 2000) -> Generator[bytes, None, None]:
    """The ledger's rows as CSV, a header then `batch` rows at a time: memory stays flat."""
    where, params = replace(filters, attempts=True).where()
    conn = _connect(path)
    try:
        cursor = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM calls WHERE {where} ORDER BY ts, id", params)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(COLUMNS)
        while True:
            rows = cursor.fetchmany(batch)
            writer.writerows(rows)
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
            if not rows:
                return
    finally:
        conn.close()


def snapshot_row(stats: dict[str, Any], now: datetime) -> list[str]:
    """The seed's periodic CSV line: time, total requests, total tokens, cost, success rate."""
    return [str(now), str(stats["total_requests"]), str(stats["tokens"]["total"]),
            stats["costo_estimado_usd"], stats["tasa_exito"]]
