"""Operator endpoints: /stats (JSON and WhatsApp text), /metrics/reset, /cache/purge, /healthz.

All but /healthz need the admin token when one is configured.
"""

from __future__ import annotations

import asyncio
import csv
import hmac
import io
import os
from pathlib import Path
from datetime import datetime

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from aiohttp import web

from . import caching, reports, stats
from . import auth
from .auth import require_admin
from .errors import OUTCOMES, BadRequest
from . import config as config_mod
from .keys import ACCOUNTING, BOOKS, BUDGETS, CACHE, CONFIG, LEDGER, LIMITER, METRICS, SESSIONS


# Shipped as package data beside this module (pyproject's package-data).
_DASHBOARD = Path(__file__).with_name("dashboard.html").read_text(encoding="utf-8")


# How long a report waits for the ledger to commit what is queued before reading without it.
_REPORT_FLUSH_S = 5.0


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def get_stats(request: web.Request) -> web.Response:
    require_admin(request)
    config, acc = request.app[CONFIG], request.app[ACCOUNTING]
    await request.app[LIMITER].refresh()
    await request.app[BOOKS].refresh()
    if request.query.get("format") == "text":
        lang = request.query.get("lang", "es")
        return web.Response(text=stats.stats_text(config, acc, request.app[LIMITER], lang), content_type="text/plain")
    return _json(stats.stats_json(config, acc, request.app[LIMITER], cache=request.app[CACHE],
                                  budgets=request.app[BUDGETS]))


async def reset(request: web.Request) -> web.Response:
    require_admin(request)
    config, acc = request.app[CONFIG], request.app[ACCOUNTING]
    started = acc.reset()
    if request.app[BOOKS].shared:  # the other workers read the new epoch from the ledger: commit it now
        await request.app[LEDGER].flush(timeout=_REPORT_FLUSH_S)
        request.app[BOOKS].forget()
    return _json({"message": "Métricas reiniciadas exitosamente",
                  "nuevo_inicio": stats.fmt_time(config, started)})


async def purge_cache(request: web.Request) -> web.Response:
    """Empty the answer cache: `?namespace=<proxy key name>` (`namespace=` for calls without a
    key) for one tenant's answers, or everything."""
    require_admin(request)
    namespace = request.query.get("namespace")
    if namespace is not None and namespace and namespace not in request.app[CONFIG].keys:
        raise BadRequest(f"No proxy key is named '{namespace[:100]}'; a namespace is a key's name from [keys].")
    gone = await request.app[CACHE].purge(namespace)
    await caching.held(request.app)
    entries, held = request.app[CACHE].held
    return _json({"purged": gone, "namespace": namespace, "entries": entries, "bytes": held})


def _filters(request: web.Request) -> reports.Filters:
    """since/until (ISO or unix time) and equality filters on upstream, model, type, user."""
    query = request.query
    try:
        tz = request.app[CONFIG].stats.tz
        since = reports.parse_time(query["since"], tz) if "since" in query else None
        until = reports.parse_time(query["until"], tz) if "until" in query else None
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    equals = tuple((name, query[name]) for name in reports.GROUPS if name in query)
    return reports.Filters(since, until, equals)


async def history(request: web.Request) -> web.Response:
    require_admin(request)
    config, acc = request.app[CONFIG], request.app[ACCOUNTING]
    asked_bucket = request.query.get("bucket", "hour")
    if asked_bucket not in ("hour", "day"):
        raise BadRequest(f"bucket={asked_bucket!r}: expected 'hour' or 'day'.")
    bucket: reports.Bucket = "day" if asked_bucket == "day" else "hour"
    asked_group = request.query.get("group_by") or None
    group_by = next((g for g in reports.GROUPS if g == asked_group), None)
    if asked_group is not None and group_by is None:
        raise BadRequest(f"group_by={asked_group!r}: expected one of {', '.join(reports.GROUPS)}.")
    filters = _filters(request)
    # The report includes every call finished so far, unless the ledger is failing: then it says
    # how many rows it could not include rather than wait.
    written = await request.app[LEDGER].flush(timeout=_REPORT_FLUSH_S)
    data = await asyncio.get_running_loop().run_in_executor(
        None, reports.history, request.app[LEDGER], bucket, filters, group_by, config.stats.tz, acc.clock())
    now = acc.clock()
    if request.query.get("fill") == "1":
        # A chart's time axis: every bucket of the period, those no call fell in included.
        since, until = filters.since if filters.since is not None else now - 86400, filters.until or now
        data["starts"] = reports.starts(bucket, since, until, config.stats.tz)
        data["latency"] = await asyncio.get_running_loop().run_in_executor(
            None, reports.latency, request.app[LEDGER], bucket, since, until, config.stats.tz)
        # Refused before any model was asked: not ledger rows, so this process's count since it started.
        data["refused"] = {str(start): count for start, count in
                           acc.refusals_by(bucket, config.stats.tz, since, until).items()}
    if not written:
        data["unwritten_rows"] = request.app[LEDGER].unwritten
    data["cost_last_7_days_usd"] = round(acc.trend.last_week(now), 6)
    data["cost_projection_month_usd"] = round(acc.trend.monthly(now), 4)
    return _json(data)


# The recent-calls table: a page at a time, newest first.
_CALLS_PAGE, _CALLS_MAX = 50, 500


async def recent_calls(request: web.Request) -> web.Response:
    """`GET /stats/calls?limit=&until=&outcome=&user=&upstream=...`: the newest calls, what an
    operator opens first when a user says "the bot didn't answer". The ledger never holds
    message text, so neither does this."""
    require_admin(request)
    filters = _filters(request)
    try:
        limit = min(_CALLS_MAX, max(1, int(request.query.get("limit", _CALLS_PAGE))))
    except ValueError:
        raise BadRequest("limit: expected a whole number of calls, at most 500.") from None
    outcome = request.query.get("outcome") or None
    if outcome is not None and outcome not in OUTCOMES:
        raise BadRequest(f"outcome={outcome[:40]!r}: expected one of {', '.join(OUTCOMES)}.")
    await request.app[LEDGER].flush(timeout=_REPORT_FLUSH_S)
    rows = await asyncio.get_running_loop().run_in_executor(
        None, request.app[LEDGER].recent, filters, outcome, limit + 1)
    tz = request.app[CONFIG].stats.tz
    calls = [{"ts": r.ts, "time": datetime.fromtimestamp(r.ts, tz).isoformat(timespec="seconds"),
              "upstream": r.upstream, "model": r.model, "type": r.type, "user": r.user, "key": r.key_id,
              "endpoint": r.endpoint, "stream": r.stream, "status": r.status, "outcome": r.outcome,
              "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
              "estimated": r.estimated, "latency_s": round(r.latency_s, 4), "cost_usd": round(r.cost_usd, 6),
              "fallback_from": r.fallback_from, "saved_tokens": r.saved_tokens} for r in rows[:limit]]
    # The next page: calls before the last one shown (`until` is exclusive).
    more = {"until": rows[limit - 1].ts} if len(rows) > limit else None
    return _json({"calls": calls, "next": more})


_CHART_JS = (Path(__file__).parent / "static" / "chart.umd.min.js").read_bytes()


async def chart_js(request: web.Request) -> web.Response:
    """Chart.js, vendored (static/SOURCE.md): the dashboard loads nothing from outside Tollgate."""
    return web.Response(body=_CHART_JS, content_type="application/javascript",
                        headers={"Cache-Control": "public, max-age=86400"})


async def export_csv(request: web.Request) -> web.StreamResponse:
    """The ledger's rows as CSV, streamed batch by batch: a million rows never sit in memory."""
    require_admin(request)
    filters = _filters(request)
    app = request.app
    await app[LEDGER].flush(timeout=_REPORT_FLUSH_S)
    loop = asyncio.get_running_loop()
    chunks = reports.csv_chunks(app[LEDGER], filters, app[CONFIG].stats.tz)
    headers = {"Content-Type": "text/csv; charset=utf-8",
               "Content-Disposition": 'attachment; filename="tollgate-ledger.csv"'}
    if app[CONFIG].ledger.keep_raw_days is not None:
        # Retention deletes old rows (their sums stay in the rollups): say from when rows exist.
        oldest = await loop.run_in_executor(None, app[LEDGER].raw_since)
        if oldest is not None:
            headers["X-Tollgate-Rows-Since"] = datetime.fromtimestamp(oldest, app[CONFIG].stats.tz).isoformat()
    out = web.StreamResponse(headers=headers)
    await out.prepare(request)
    try:
        while (chunk := await loop.run_in_executor(None, next, chunks, b"")):
            await out.write(chunk)
    finally:
        await loop.run_in_executor(None, chunks.close)
    await out.write_eof()
    return out


async def snapshot_csv(request: web.Request) -> web.Response:
    """The seed's one-line CSV snapshot, for a cron job that appends it to a file."""
    require_admin(request)
    config, acc = request.app[CONFIG], request.app[ACCOUNTING]
    await request.app[LIMITER].refresh()
    await request.app[BOOKS].refresh()
    buffer = io.StringIO()
    csv.writer(buffer).writerow(reports.snapshot_row(stats.stats_json(config, acc, request.app[LIMITER]), datetime.now()))
    return web.Response(text=buffer.getvalue(), content_type="text/csv")


async def metrics(request: web.Request) -> web.Response:
    require_admin(request)
    await request.app[LIMITER].refresh()
    response = web.Response(body=request.app[METRICS].exposition())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


_LOGIN = """<!doctype html><html lang="es"><head><meta charset="utf-8"><title>Tollgate</title>
<link rel="icon" href="data:,"></head>
<body style="font:16px system-ui;margin:15vh auto;max-width:22em">
<form method="post" action="/dashboard/login"><h1>Tollgate</h1>{error}
<label>Token de administración<br><input name="token" type="password" autofocus style="width:100%"></label>
<p><button type="submit">Entrar</button></p></form></body></html>"""
_WRONG = '<p role="alert" style="color:#b00">Token incorrecto. / Wrong token.</p>'


def _login(status: int, wrong: bool = False) -> web.Response:
    return web.Response(text=_LOGIN.format(error=_WRONG if wrong else ""), status=status, content_type="text/html",
                        headers={"Cache-Control": "no-store"})


def _dashboard_session(request: web.Request, token: str) -> web.Response:
    """A valid token once (query or form) starts a session: a random id in an HttpOnly,
    SameSite=Strict cookie, held server-side until it expires or the operator logs out."""
    configured = request.app[CONFIG].server.admin_token()
    if configured is None or not hmac.compare_digest(token.encode(), configured.encode()):
        return _login(401, wrong=True)
    sessions = request.app[SESSIONS]
    response = web.Response(status=303, headers={"Location": "/dashboard"})
    response.set_cookie(auth.COOKIE, sessions.create(), httponly=True, samesite="Strict", path="/",
                        secure=request.secure, max_age=int(sessions.ttl_s))
    return response


async def dashboard_logout(request: web.Request) -> web.Response:
    """End this browser's session; its cookie opens nothing afterwards."""
    cookie = request.cookies.get(auth.COOKIE)
    if cookie is not None:
        request.app[SESSIONS].end(cookie)
    response = web.Response(status=303, headers={"Location": "/dashboard"})
    response.del_cookie(auth.COOKIE, path="/")
    return response


async def dashboard(request: web.Request) -> web.Response:
    if "token" in request.query:
        return _dashboard_session(request, request.query["token"])
    if not auth.is_admin(request):
        return _login(401)
    return web.Response(text=_DASHBOARD, content_type="text/html",
                        headers={"Cache-Control": "no-store", "Content-Security-Policy":
                                 "default-src 'self'; img-src data:; style-src 'unsafe-inline'; script-src 'self' 'unsafe-inline'"})


async def dashboard_login(request: web.Request) -> web.Response:
    try:
        form = await request.post()
    except ValueError:  # a malformed form body (aiohttp's form parsers raise ValueError)
        return _login(400)
    return _dashboard_session(request, str(form.get("token", "")))


async def healthz(request: web.Request) -> web.Response:
    """200 while all is well (with warnings, such as a secret's variable unset); 503 with the
    reason while the ledger cannot keep up, or while the shared limits store cannot be reached
    and calls that limits apply to are refused for it (`redis.unavailable = "closed"`)."""
    health = request.app[LEDGER].health()
    limits = request.app[LIMITER].state
    refusing = limits.get("mode") == "refusing"
    ok = health.ok and not refusing
    body: dict[str, object] = {"status": "ok" if ok else "degraded"}
    if request.app[CONFIG].server.workers > 1:
        body["worker_pid"] = os.getpid()  # which of the port's workers answered
    if not health.ok:
        body["ledger"] = health.as_dict()
    if limits.get("backend") != "memory" and (refusing or not limits.get("reachable", True)):
        body["limits"] = limits
    warnings = config_mod.missing_secrets(request.app[CONFIG])
    if warnings:
        body["warnings"] = warnings
    return _json(body, status=200 if ok else 503)
