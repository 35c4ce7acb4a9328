"""`create_app(config)`: the wiring diagram, read top to bottom."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
from aiohttp import web

from . import caching, files, limits, logs, stats
from .ledger import ledger_for
from .accounting import DAY, Accounting, Aggregates, CostTrend
from .config import Config
from .dialects import Dialect, error_body
from .errors import ProxyError
from .admission import Admission, WaitLines
from .alerts import Alerts
from .guard import guard
from .books import Books
from .cache import AnswerCache
from .cache import store_for as cache_store_for
from .budgets import Budgets
from .access import AccessLog
from .keys import (ACCESS_LOG, ACCOUNTING, ADMISSION, ALERTS, BOOKS, BUDGETS, CACHE, CONFIG, ESTIMATOR, LEDGER, LIMITER,
                   METRICS, SESSIONS, UPSTREAMS)
from .limits import WindowStore
from .metrics import Metrics
from .routes import setup_routes
from .sessions import Sessions
from . import ledger as ledger_mod
from .ledger import LedgerStore
from .tasks import running
from .tokens import Estimator
from .upstream import UpstreamClient

log = logging.getLogger("tollgate")


def create_app(config: Config, clock: Callable[[], float] = time.time) -> web.Application:
    logs.install()  # aiohttp's own logging of malformed requests: one short, redacted line
    # One middleware: aiohttp adds a layer of its own to an app with any, and each layer is a
    # coroutine and a partial on every call; the guard runs inside the error handler instead.
    app = web.Application(middlewares=[error_middleware], client_max_size=config.server.max_body_bytes)

    ledger = ledger_for(config)
    app[CONFIG] = config
    app[LEDGER] = ledger
    app[ACCOUNTING] = Accounting(ledger, clock)
    # Several processes write one ledger (workers, or machines sharing PostgreSQL): the figures
    # they show are read back from it.
    app[BOOKS] = Books(ledger, app[ACCOUNTING], config.server.workers > 1 or config.ledger.backend == "postgresql",
                       config.server.stats_cache_s)
    app[ESTIMATOR] = Estimator(config.stats.estimate_max_chars)
    app[UPSTREAMS] = {name: UpstreamClient(u) for name, u in config.upstreams.items()}
    app[SESSIONS] = Sessions(config.server.session_ttl_h * 3600.0, clock)
    app[LIMITER] = limits.windows_for(config, clock, admissions_reader(ledger, config))
    app[BUDGETS] = Budgets(config, clock)
    app[ADMISSION] = Admission(config, app[LIMITER], WaitLines(), app[ESTIMATOR], app[BUDGETS])
    app[LIMITER].released.append(app[ADMISSION].lines.notify)
    app[ALERTS] = Alerts(config, app[ACCOUNTING], app[LIMITER], app[BOOKS])
    app[BUDGETS].alerts = app[ALERTS]
    app[METRICS] = Metrics(app[LIMITER], app[ADMISSION].lines, ledger, app[ALERTS], app[BUDGETS])
    app[CACHE] = AnswerCache(config.cache, cache_store_for(config, clock), clock)
    # Every finished call, after the ledger has it: counters, alert rules, the access log.
    app[ACCESS_LOG] = AccessLog()
    app[ACCOUNTING].listeners += [app[METRICS].observe, app[BUDGETS].on_call, app[ALERTS].on_call, app[ACCESS_LOG]]

    app.cleanup_ctx.append(ledger_ctx)
    app.cleanup_ctx.append(budgets_ctx)
    app.cleanup_ctx.append(app[LIMITER].lifecycle)
    app.cleanup_ctx.append(upstreams_ctx)
    app.cleanup_ctx.append(snapshot_ctx)
    app.cleanup_ctx.append(app[ALERTS].lifecycle)
    app.cleanup_ctx.append(app[METRICS].lifecycle)
    app.cleanup_ctx.append(app[ACCESS_LOG].lifecycle)
    app.cleanup_ctx.append(cache_ctx)

    setup_routes(app)
    return app


# --- resources ---------------------------------------------------------------------------


async def budgets_ctx(app: web.Application) -> AsyncIterator[None]:
    """This period's spend from the ledger, before the first call is checked against it."""
    budgets = app[BUDGETS]
    if not budgets.budgets:
        yield
        return
    async for _ in budgets.lifecycle(app[LEDGER], app[BOOKS].shared):
        yield


async def cache_ctx(app: web.Application) -> AsyncIterator[None]:
    """The answer cache's store: what it holds shown from the start, closed at the end."""
    cache = app[CACHE]
    if cache.enabled:
        await caching.held(app)
    yield
    await cache.store.close()


# How often the ledger is asked to prune what retention lets go (it works through it in batches).
PRUNE_INTERVAL_S = 600.0


async def ledger_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the ledger and rebuild /stats and the limiter's windows from it; prune old rows now
    and then; flush it at the end."""
    ledger, acc, limiter = app[LEDGER], app[ACCOUNTING], app[LIMITER]
    loop = asyncio.get_running_loop()

    def open_and_replay() -> None:
        ledger.open(acc.clock())
        replay_ledger(ledger, acc, limiter)

    await loop.run_in_executor(None, open_and_replay)

    async def retention() -> None:
        keep = app[CONFIG].ledger.keep_raw_days
        while True:
            now = acc.clock()
            # Admissions only ever rebuild the last day's windows; two days keeps a margin.
            ledger.prune(now - keep * DAY if keep is not None else None, now - 2 * DAY)
            await asyncio.sleep(PRUNE_INTERVAL_S)

    async with running(retention()):
        yield
    # A failing ledger gets the drain time to recover, then gives up: shutdown never hangs on it.
    drain = app[CONFIG].server.drain_timeout_s
    await ledger.flush(timeout=drain)
    await loop.run_in_executor(None, ledger.close, 1.0)


def admissions_reader(ledger: LedgerStore, config: Config) -> Callable[[float], Awaitable[list[ledger_mod.Admission]]]:
    """What a shared limiter loads into a Redis that has forgotten its windows: the ledger's
    admissions since a time, this process's latest ones committed first."""
    async def since(ts: float) -> list[ledger_mod.Admission]:
        await ledger.flush(timeout=config.redis.rebuild_wait_s / 2)
        return await asyncio.get_running_loop().run_in_executor(None, lambda: list(ledger.replay_admissions(ts)))
    return since


def replay_ledger(ledger: LedgerStore, acc: Accounting, limiter: WindowStore) -> None:
    """Rebuild /stats (the epoch's rollup), the limiter's windows (the last day's admissions: the
    one source of every usage window) and the cost trend (a week of daily sums)."""
    now = acc.clock()
    acc.load(Aggregates.from_summary(*ledger.epoch_summary()))
    # Windows come from admissions, written as calls were let through, so calls in flight at a
    # crash still hold their places. A calendar day can start up to a day ago; a window is
    # never longer than that.
    for admission in ledger.replay_admissions(now - DAY):
        limiter.replay(admission)
    acc.trend.seed(*ledger.cost_by_day(now - (CostTrend.WEEK_DAYS + 1) * DAY))


async def upstreams_ctx(app: web.Application) -> AsyncIterator[None]:
    clients = app[UPSTREAMS].values()
    for client in clients:
        await client.start()
    yield
    for client in clients:
        await client.close()


async def snapshot_ctx(app: web.Application) -> AsyncIterator[None]:
    """Keep metrics.json (the seed's file) as a derived snapshot, rewritten while things change."""
    config, acc = app[CONFIG], app[ACCOUNTING]
    loop = asyncio.get_running_loop()

    failing = False

    async def write() -> None:
        # A derived file: a full disk must not take the proxy down with it. Said once per fault.
        nonlocal failing
        await app[BOOKS].refresh()
        data = orjson.dumps(stats.snapshot(config, acc), option=orjson.OPT_INDENT_2)
        try:
            await loop.run_in_executor(None, files.write_private_atomic, config.snapshot_path, data)
        except OSError as exc:
            if not failing:
                log.error("cannot write %s (%s); will retry", config.snapshot_path, exc.strerror or exc)
            failing = True
        else:
            failing = False

    async def every_interval() -> None:
        last = None
        while True:
            await asyncio.sleep(config.server.snapshot_interval_s)
            marker = (acc.current.totals.requests, acc.current.epoch_started)
            if marker != last:
                await write()
                last = marker

    async with running(every_interval()):
        yield
    await write()


# --- errors ------------------------------------------------------------------------------


def request_dialect(request: web.Request) -> Dialect:
    path = request.path
    return "ollama" if path.startswith("/api/") or (path.startswith("/t/") and "/api/" in path) else "openai"


def error_response(request: web.Request, status: int, message: str, type_: str, code: str) -> web.Response:
    return web.Response(status=status, content_type="application/json",
                        body=error_body(request_dialect(request), message, type_, code))


@web.middleware
async def error_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every failure leaves in the caller's dialect, with a message and never a traceback; the
    guard (allowed hosts, cross-site requests, CORS) sees each request first."""
    try:
        return await guard(request, handler)
    except ProxyError as exc:
        response = error_response(request, exc.status, exc.message, exc.type, exc.code)
        response.headers.update(exc.headers)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {404: f"No such endpoint: {request.method} {request.path}",
                   405: f"{request.method} is not allowed on {request.path}"}.get(exc.status, exc.reason)
        return error_response(request, exc.status, message, "invalid_request_error",
                              exc.reason.lower().replace(" ", "_"))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(request, 500, "Tollgate hit an internal error; it has been logged.",
                              "server_error", "internal_error")
