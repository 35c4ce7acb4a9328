"""Reports over the ledger: usage per hour or day, busiest hours and weekdays, CSV exports.

The ledger gives sums by UTC piece (whole hours from its rollups, quarter-hours of raw rows at
the edges, `LedgerStore.history_pieces`); this module folds them into local hours and days of the
stats zone, right across DST changes: each piece folds into the local hour or day it falls in,
with zoneinfo's rules for that instant. The hour repeated when clocks go back is two buckets,
as it is two hours. It runs on the caller's thread: the app calls it through an executor.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Generator
from datetime import datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from .histogram import Histogram
from .ledger import COLUMNS, GROUPS, LATENCY, OTHERS, Filters, GroupBy, LedgerStore

__all__ = ["GROUPS", "Filters", "GroupBy", "history", "csv_chunks", "parse_time", "local_start", "snapshot_row"]

Bucket = Literal["hour", "day"]
_WEEKDAYS = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")


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


def whole_hours(tz: ZoneInfo, since: float | None, until: float | None) -> bool:
    """Whether every local hour of `tz` in the period starts on a UTC hour (no :30 or :45 offset
    at any point of it), so that hourly rollups fold into its hours and days exactly."""
    start = since if since is not None else 0.0
    end = until if until is not None else datetime.now().timestamp()
    moment, last = datetime.fromtimestamp(max(start, 0.0), tz), datetime.fromtimestamp(max(end, 0.0), tz)
    # Weekly samples: every offset a zone has kept (a DST season, a half-hour zone) lasts weeks.
    step = timedelta(days=7)
    while True:
        offset = moment.utcoffset()
        if offset is None or offset.total_seconds() % 3600:
            return False
        if moment >= last:
            return True
        moment = min(moment + step, last)


def starts(bucket: Bucket, since: float, until: float, tz: ZoneInfo) -> list[float]:
    """Every local hour or day that begins in [since, until) or holds `since`: a chart's time
    axis, with the buckets no call fell in."""
    out: list[float] = []
    moment = local_start(since, bucket, tz)
    step = 3600.0 if bucket == "hour" else 86400.0
    while moment < until and len(out) < 10_000:
        out.append(moment)
        # A day is 23 to 25 hours: the next local midnight, found from a point safely past it.
        moment = local_start(moment + step + (3 * 3600 if bucket == "day" else 0), bucket, tz)
    return out


def latency(ledger: LedgerStore, bucket: Bucket, since: float, until: float, tz: ZoneInfo) -> list[dict[str, Any]]:
    """Latency p50 and p95 and time-to-first-token p50 for each local bucket, from the hourly
    rollups' histograms (whole UTC hours: an hour partly in the period counts whole)."""
    by_start: dict[float, tuple[Histogram, Histogram]] = {}
    for hour, kind, index, count in ledger.latency_hours(int(since // 3600), -(-int(until) // 3600)):
        start = local_start(hour * 3600.0, bucket, tz)
        pair = by_start.setdefault(start, (Histogram(), Histogram()))
        histogram = pair[0] if kind == LATENCY else pair[1]
        histogram.buckets[index] = histogram.buckets.get(index, 0) + count
        histogram.count += count
    return [{"start": start, "p50_s": round(lat.quantile(0.5), 4), "p95_s": round(lat.quantile(0.95), 4),
             "ttft_p50_s": round(ttft.quantile(0.5), 4) if ttft.count else None, "calls": lat.count}
            for start, (lat, ttft) in sorted(by_start.items())]


def history(ledger: LedgerStore, bucket: Bucket, filters: Filters, group_by: GroupBy | None,
            tz: ZoneInfo, now: float) -> dict[str, Any]:
    pieces = ledger.history_pieces(filters, group_by, whole_hours(tz, filters.since, filters.until or now),
                                   TOP_USERS)
    folded: dict[tuple[float, Any], list[float]] = {}
    hours: dict[int, list[int]] = {}
    days: dict[int, list[int]] = {}
    # Many pieces share a start (one per group in each hour): its local facts are worked out once.
    places: dict[float, tuple[float, int, int]] = {}
    for start, grp, *sums in pieces:
        place = places.get(start)
        if place is None:
            moment = datetime.fromtimestamp(start, tz)
            # isoweekday: Monday 1 .. Sunday 7; % 7 makes Sunday 0, as _WEEKDAYS lists them.
            place = places[start] = (local_start(start, bucket, tz), moment.hour, moment.isoweekday() % 7)
        into = folded.setdefault((place[0], grp), [0, 0, 0, 0.0, 0, 0])
        for i, value in enumerate(sums):
            into[i] += value
        for table, key in ((hours, place[1]), (days, place[2])):
            counts = table.setdefault(key, [0, 0])
            counts[0] += int(sums[0])
            counts[1] += int(sums[1] + sums[2])
    if group_by == "user":
        folded = _top_users(folded)
    buckets = []
    named: dict[float, str] = {}  # each bucket's local name, once per bucket rather than per group
    for (start, grp), (requests, prompt, completion, cost, errors, estimated) in sorted(
            folded.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        local = named.get(start)
        if local is None:
            local = named[start] = _local(start, tz)
        entry: dict[str, Any] = {"start": start, "start_local": local,
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


# A history by user names the period's 20 busiest users (a chart of 20 lines); the rest are
# summed per bucket under OTHERS (the calls that named no user stay apart, as None), so a month
# of a bot with thousands of users is a reply of kilobytes, not megabytes.
TOP_USERS = 20


def _top_users(folded: dict[tuple[float, Any], list[float]]) -> dict[tuple[float, Any], list[float]]:
    totals: dict[Any, float] = {}
    for (_, user), sums in folded.items():
        if user is not None and user != OTHERS:
            totals[user] = totals.get(user, 0) + sums[0]
    if len(totals) <= TOP_USERS:
        return folded
    top = set(sorted(totals, key=lambda u: (-totals[u], u))[:TOP_USERS]) | {None}
    out: dict[tuple[float, Any], list[float]] = {}
    for (start, user), sums in folded.items():
        into = out.setdefault((start, user if user in top else OTHERS), [0, 0, 0, 0.0, 0, 0])
        for i, value in enumerate(sums):
            into[i] += value
    return out


def _local(ts: float, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(ts, tz).replace(tzinfo=None).isoformat(timespec="seconds")


def csv_chunks(ledger: LedgerStore, filters: Filters, tz: ZoneInfo) -> Generator[bytes, None, None]:
    """The ledger's rows as CSV, a header then a batch of rows at a time: memory stays flat. Each
    row carries its time twice: `ts` (unix seconds) and `time` (ISO 8601 with the stats zone's offset)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(("ts", "time", *COLUMNS[1:]))
    yield buffer.getvalue().encode()
    for rows in ledger.export_rows(filters):
        buffer.seek(0)
        buffer.truncate()
        writer.writerows((row[0], datetime.fromtimestamp(row[0], tz).isoformat(timespec="milliseconds"),
                          *map(safe_cell, row[1:])) for row in rows)
        yield buffer.getvalue().encode()


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
