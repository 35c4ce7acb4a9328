"""The path of one call: read, parse, route, forward, relay as it arrives, account.

Metered endpoints (chat, completions, embeddings, responses; Ollama's chat, generate, embed,
embeddings) end in exactly one ledger row whatever happens: success, a bad body, an upstream
error, a stream cut short, a client that hung up (plus one row for each attempt a fallback took
over). Which paths are metered is endpoints.py's decision; the reply is relayed by reply.py;
everything else goes through passthrough.py or is refused.

Errors are raised, not formatted: the middleware in app.py renders them in the dialect's shape.
"""

from __future__ import annotations

import asyncio
import time

import orjson
from aiohttp import web

from . import auth, caching, dialects, endpoints, passthrough, routing, stats, tagging
from .admission import Plan, parse_retry_after
from .call import Call
from .config import Config, Upstream
from .dialects import CallInfo, Dialect
from .errors import (REFUSED_OUTCOMES, BadRequest, LedgerUnavailable, ProxyError, RateLimited, UnknownModel,
                     UnsupportedMediaType)
from .inbound import read_body
from .keys import ACCOUNTING, ADMISSION, BOOKS, CONFIG, ESTIMATOR, LEDGER, LIMITER, METRICS, UPSTREAMS
from .reply import relay_reply
from .tickets import finish_ticket, hold, refused
from .endpoints import Prefix
from .ledger import CallRecord
from .http1 import Response
from .upstream import Unreachable, UpstreamClient, UpstreamTimeout, request_headers


def _dialect(prefix: Prefix) -> Dialect:
    return "openai" if prefix == "v1" else "ollama"


async def openai_call(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "v1")


async def ollama_call(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "api")


async def _handle(request: web.Request, prefix: Prefix) -> web.StreamResponse:
    config = request.app[CONFIG]
    admin = auth.presents_admin_token(request)
    try:
        where = endpoints.route(config, prefix, request.method, request.match_info["rest"], admin)
    except ProxyError as exc:
        refused(request.app, exc.code)
        raise
    if isinstance(where, endpoints.Metered):
        return await metered(request, prefix, where.rest, where.endpoint)
    if not admin:  # the operator, with the admin token, needs no proxy key besides
        try:
            auth.proxy_key(config, request.headers)
        except ProxyError as exc:
            refused(request.app, exc.outcome)
            raise
    return await passthrough.passthrough(request, prefix, where)


async def metered(request: web.Request, prefix: Prefix, rest: str, endpoint: str) -> web.StreamResponse:
    app = request.app
    if request.content_type != "application/json":
        # Every SDK sends JSON as JSON; a browser page can only send text/plain or a form without
        # asking first (a "simple" request), so nothing else is taken.
        refused(app, UnsupportedMediaType.code)
        raise UnsupportedMediaType(f"Send the body as JSON, with 'Content-Type: application/json' (this request "
                                   f"said '{request.content_type[:100]}'); every OpenAI and Ollama SDK does.")
    if app[LEDGER].full and not app[LEDGER].drop_when_full:
        # on_ledger_full = "refuse": a call the books cannot take is not served at all.
        refused(app, LedgerUnavailable.code)
        health = app[LEDGER].health()
        raise LedgerUnavailable(f"Tollgate cannot record calls right now ({health.failing or 'ledger behind'}; "
                                f"{health.unwritten:,} rows waiting), so it is not forwarding any; try again later.",
                                {"Retry-After": "5"})
    call = Call(dialect=_dialect(prefix), endpoint=endpoint)
    app[METRICS].call_started()
    try:
        return await _metered(request, prefix, rest, call)
    except ProxyError as exc:
        call.fail(exc, status_sent=call.headers_sent)
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        # The client hung up: with handler cancellation on we are cancelled at once; without
        # it, the next write fails. Either way the upstream response is closed on the way out.
        # A client that leaves after the final frame (the openai SDK does, at [DONE]) has its
        # whole answer: that call stays a success.
        if not call.completed:
            call.outcome, call.status = "cancelled", 499
        raise
    except Exception:
        call.outcome, call.status = "internal", 500
        raise
    finally:
        app[METRICS].call_ended()
        if call.outcome in REFUSED_OUTCOMES:
            finish_ticket(app, call, 0)
            refused(app, call.outcome)
        elif not call.command:
            record = call.record(app[CONFIG], app[ESTIMATOR], app[ACCOUNTING].clock())
            finish_ticket(app, call, record.total_tokens)
            app[ACCOUNTING].record(record)


def _route(config: Config, call: Call, info: CallInfo) -> Upstream:
    if call.dialect == "openai":
        if not info.model:
            raise BadRequest("The request body needs a 'model'.")
        upstream = routing.upstream_for(config, info.model)
    else:
        upstream = routing.ollama_upstream(config, info.model)
    if upstream is None:
        raise UnknownModel(f"The model '{info.model}' is not served by any configured upstream.")
    return upstream


async def _metered(request: web.Request, prefix: Prefix, rest: str, call: Call) -> web.StreamResponse:
    app = request.app
    config = app[CONFIG]
    key = auth.proxy_key(config, request.headers)
    call.key_id = key.name if key else None
    call.user = tagging.user(None, request.headers, key)
    raw = await read_body(request, config)
    try:
        info = dialects.parse_request(call.dialect, call.endpoint, raw)
    except dialects.BadRequest as exc:
        raise BadRequest(str(exc)) from None
    call.info, call.model = info, info.model or ""
    call.user = tagging.user(info, request.headers, key)
    if _is_stats_command(config, call, info):
        # Answered here with the stats text: not forwarded, not limited, not a metered call.
        call.command = True
        await app[LIMITER].refresh()
        await app[BOOKS].refresh()
        body, content_type = dialects.reply(info, stats.stats_text(config, app[ACCOUNTING], app[LIMITER], config.commands.lang),
                                            app[ACCOUNTING].clock())
        return web.Response(body=body, headers={"Content-Type": content_type, "X-Tollgate-Command": "stats"})
    call.type = tagging.request_type(config, info, request.headers.get("X-Tollgate-Type"),
                                     request.match_info.get("type"))
    call.upstream = _route(config, call, info)
    try:
        hit = await caching.answer(request, call, info)
        if hit is not None:
            return hit
        strip_usage = dialects.wants_injected_usage(info)
        response, plan, client = await _send(request, prefix, rest, call, info, raw, strip_usage)
        call.clamped = plan.clamp_output is not None
        async with response:
            out = await relay_reply(request, call, response, plan, client, strip_usage,
                                    config.cache.max_entry_bytes)
        if call.cache is not None:
            await caching.keep(app, call, response.content_type in ("text/event-stream", "application/x-ndjson"))
        return out
    finally:
        caching.leave(app, call)


async def _send(request: web.Request, prefix: Prefix, rest: str, call: Call, info: CallInfo, raw: bytes,
                strip_usage: bool) -> tuple[Response, Plan, UpstreamClient]:
    """Admit the call and send it; on a refusal (ours or the upstream's) try the fallback,
    once per upstream. Returns the response to relay, with the plan and client that got it.

    Every attempt that does not answer the client leaves its own ledger row (final = False) on
    the upstream that refused or failed it, with that upstream's admission: the served row and
    its window entries belong to the upstream that served it alone."""
    app = request.app
    admission, limiter = app[ADMISSION], app[LIMITER]
    assert call.upstream is not None
    upstream, model, fallback_from = call.upstream, call.model, None
    tried: set[str] = set()
    earlier: list[str] = []  # why the upstreams before this one did not serve it
    while True:
        plan = await admission.admit(info, upstream, model, call.user, call.key_id, tried, fallback_from)
        if plan.waited:
            # A caller who hung up while it waited is not forwarded. Its hang-up may be read but
            # not yet delivered: one turn of the loop lets it cancel this handler first.
            call.ticket = plan.ticket
            await asyncio.sleep(0)
            if request.transport is None or request.transport.is_closing():
                raise ConnectionResetError("the client left while waiting for a place")
        for refused_by, refused_model, denial in plan.refused:
            _attempt(app, call, refused_by, refused_model, RateLimited.outcome, RateLimited.status, None)
            earlier.append(f"Upstream '{refused_by.name}' refused the call: {denial.message}")
        call.upstream, call.model = plan.upstream, plan.model
        call.fallback_from = fallback_from = plan.fallback_from
        call.admission = None
        hold(app, call, plan)
        client = app[UPSTREAMS][plan.upstream.name]
        headers = request_headers(request.headers, plan.upstream)
        try:
            response = await client.send("POST", client.target(prefix, rest, request.rel_url.raw_query_string),
                                         headers, _upstream_body(raw, info, plan, strip_usage))
        except (Unreachable, UpstreamTimeout) as exc:
            nxt = routing.fallback_for(app[CONFIG], plan.upstream, tried, call.dialect)
            if nxt is None:
                if earlier:  # a fallback that failed too: the caller hears of both
                    raise type(exc)(f"{earlier[0]} Its fallback: {exc.message}") from None
                raise
            failed = (exc.outcome, exc.status)
            earlier.append(exc.message)
        else:
            if response.status == 429:
                wait = parse_retry_after(response.headers, app[CONFIG].limits.max_upstream_retry_after_s, time.time())
                limiter.upstream_refused(plan.upstream.name, wait)
            nxt = None
            if response.status == 429 or response.status >= 500:
                nxt = routing.fallback_for(app[CONFIG], plan.upstream, tried, call.dialect)
            if nxt is None:
                return response, plan, client
            response.release()
            failed = ("upstream_rate_limited" if response.status == 429 else "upstream_status", response.status)
            earlier.append(f"Upstream '{plan.upstream.name}' answered HTTP {response.status}.")
        # Falling back: the failed attempt holds no tokens, and the fallback gets its own admission.
        _attempt(app, call, plan.upstream, plan.model, *failed, call.admission)
        finish_ticket(app, call, 0)
        call.admission = None
        tried.add(plan.upstream.name)
        fallback_from = fallback_from or plan.upstream.name
        upstream, model = nxt, routing.fallback_model(plan.upstream, plan.model)


def _attempt(app: web.Application, call: Call, upstream: Upstream, model: str, outcome: str, status: int,
             admission: str | None) -> None:
    """The ledger row of an attempt a fallback took over from: no tokens, no cost, not final."""
    app[ACCOUNTING].record(CallRecord(
        ts=app[ACCOUNTING].clock(), upstream=upstream.name, model=model, dialect=call.dialect,
        endpoint=call.endpoint, type=call.type, user=call.user, stream=bool(call.info and call.info.stream),
        status=status, outcome=outcome, prompt_tokens=0, completion_tokens=0, cached_tokens=0, estimated=False,
        latency_s=time.perf_counter() - call.started, ttft_s=None, cost_usd=0.0, fallback_from=call.fallback_from,
        key_id=call.key_id, admission=admission, final=False))


def _is_stats_command(config: Config, call: Call, info: CallInfo) -> bool:
    chat = call.endpoint == "chat" or (call.dialect == "ollama" and call.endpoint == "generate")
    return chat and info.last_user_text.strip().lower() in config.commands.stats


def _upstream_body(raw: bytes, info: CallInfo, plan: Plan, strip_usage: bool) -> bytes:
    """The client's body as the upstream must see it: its model name, usage asked, output capped."""
    body = info.body
    if strip_usage:
        body = dialects.with_injected_usage(info)
    upstream_model = routing.upstream_model(plan.upstream, plan.model)
    if upstream_model != info.model:
        body = {**body, "model": upstream_model}
    if plan.clamp_output is not None:
        body = dialects.with_max_output(info, body, plan.clamp_output)
    return raw if body is info.body else orjson.dumps(body)


