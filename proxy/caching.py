"""The answer cache on a call's path: before the call is admitted, a hit answers it (in the shape
the caller asked for, charged to no limit, booked as `cache_hit` with what it saved); after a
live answer, `keep` stores it if it is complete. Identical misses that arrive together make one
upstream call: the first leads, the others wait for its entry. A semantic rule's miss asks the
embedding upstream for the question's vector: a metered call of its own, type `cache`.

What the cache decides is `cache/__init__.py`'s; this module only does the calls.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

import orjson
from aiohttp import web

from . import dialects
from .cache import Bypass, Lookup, replay
from .cache.store import Entry
from .call import Call
from .dialects import CallInfo, Dialect
from .errors import REFUSED_OUTCOMES, ProxyError
from .keys import ACCOUNTING, ADMISSION, CACHE, CONFIG, ESTIMATOR, METRICS, UPSTREAMS
from .tickets import finish_ticket, hold, refused
from .upstream import UpstreamError, request_headers

if TYPE_CHECKING:
    from .cache.semantic import Vector

log = logging.getLogger("tollgate.cache")


async def answer(request: web.Request, call: Call, info: CallInfo) -> web.StreamResponse | None:
    """A hit's response, or None: the call goes to its upstream (`call.capture` set if its answer
    is to be kept, `call.cache_status` set for the header)."""
    app = request.app
    cache = app[CACHE]
    if not cache.enabled:   # no rule: nothing to decide on every call's path
        return None
    assert call.upstream is not None
    decision = cache.decide(call.dialect, call.endpoint, call.upstream.name, call.model, call.type, call.key_id,
                            info.body, request.headers)
    if decision is None:
        return None
    if isinstance(decision, Bypass):
        call.cache_status = "bypass"
        _count(app, "bypass")
        return None
    call.cache = decision
    if not decision.refresh:
        entry = await cache.find(decision)
        if entry is None and decision.question is not None:
            call.cache_vector = await _embed(request, call, decision.question)
            if call.cache_vector is not None:
                entry = await cache.similar(decision, call.cache_vector)
        if entry is None:
            flight = cache.flights.join(decision.key)
            if flight is None:
                call.cache_leads = True
            else:
                try:
                    entry = await asyncio.wait_for(asyncio.shield(flight), cache.policy.wait_s)
                except TimeoutError:
                    entry = None
        if entry is not None:
            served = await _serve(request, call, info, entry)
            if served is not None:
                _count(app, "hit")
                return served
    call.cache_status = "miss"
    _count(app, "miss")
    call.capture = bytearray()
    return None


async def keep(app: web.Application, call: Call, streamed: bool) -> None:
    """Store the live answer the call relayed, if it is complete and the cache may keep it. A
    leader's waiting followers get the entry (or None, and ask for themselves)."""
    cache = app[CACHE]
    lookup = call.cache
    entry: Entry | None = None
    try:
        if (lookup is not None and call.capture is not None and call.outcome == "ok" and call.status == 200
                and not call.fallback_from and not call.clamped and call.upstream is not None):
            entry = await cache.keep(lookup, call.dialect, call.endpoint, bytes(call.capture), streamed,
                                     call.cache_vector)
            if entry is not None:
                app[METRICS].cache_held(*cache.held)
    finally:
        call.capture = None
        if call.cache_leads and lookup is not None:
            call.cache_leads = False
            cache.flights.land(lookup.key, entry)


async def held(app: web.Application) -> None:
    """What the store holds now, for /stats and /metrics (at start and after a purge; each
    answer kept brings its own figures)."""
    cache = app[CACHE]
    try:
        cache.held = await cache.store.size()
    except Exception:  # noqa: BLE001 (figures only: the next answer kept asks again)
        return
    app[METRICS].cache_held(*cache.held)


def _count(app: web.Application, result: str) -> None:
    app[CACHE].lookups[result] += 1
    app[METRICS].cache_lookups.labels(result).inc()


def leave(app: web.Application, call: Call) -> None:
    """A leader that never got to `keep` (refused, failed, cancelled): its followers go on alone."""
    if call.cache_leads and call.cache is not None:
        call.cache_leads = False
        app[CACHE].flights.land(call.cache.key, None)


async def _serve(request: web.Request, call: Call, info: CallInfo, entry: Entry) -> web.StreamResponse | None:
    """The entry written in the caller's shape, as the upstream would have answered live."""
    app = request.app
    stored = replay.read(call.dialect, call.endpoint, entry.body, streamed=False)
    if stored is None or call.upstream is None:
        return None   # not ours to replay (never kept so): a miss
    now = app[CACHE].clock()
    answer = _fresh(stored, now)
    price = app[CONFIG].price(call.upstream, call.model)
    call.outcome, call.status, call.completed = "cache_hit", 200, True
    call.saved = (answer.prompt_tokens + answer.completion_tokens,
                  price.cost(answer.prompt_tokens, answer.completion_tokens, 0))
    headers = {"X-Tollgate-Cache": "hit", "Age": str(entry.age(now)), "X-Tollgate-Upstream": call.upstream.name}
    call.cache_status = "hit"
    if not info.stream:
        return web.Response(body=replay.json_body(answer), content_type="application/json", headers=headers)
    content_type = "text/event-stream" if call.dialect == "openai" else "application/x-ndjson"
    out = web.StreamResponse(headers={**headers, "Content-Type": content_type})
    await out.prepare(request)
    call.headers_sent = True
    call.ttft = time.perf_counter() - call.started
    await out.write(b"".join(replay.stream(answer, include_usage=_asked_usage(info))))
    await out.write_eof()
    return out


def _asked_usage(info: CallInfo) -> bool:
    options = info.body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _fresh(answer: replay.Answer, now: float) -> replay.Answer:
    """The stored answer with its own id and time, as a new live answer would have: a client
    that tells answers apart by id is not handed the same one twice."""
    if answer.dialect == "ollama":
        when = datetime.fromtimestamp(now, timezone.utc).isoformat().replace("+00:00", "Z")
        return replace(answer, created_at=when)
    prefix = "chatcmpl-" if answer.endpoint == "chat" else "cmpl-"
    return replace(answer, id=prefix + secrets.token_urlsafe(18), created=int(now))


# --- embeddings for semantic rules -----------------------------------------------------------


async def _embed(request: web.Request, asking: Call, text: str) -> Vector | None:
    """The question's unit vector from `[cache.semantic]`'s upstream, booked as a call of type
    `cache` for the caller's key and user; None if it cannot be had (a refusal by a limit, an
    upstream error, a timeout): the call is then an ordinary miss."""
    app = request.app
    policy = app[CONFIG].cache.semantic
    assert policy.upstream is not None
    upstream = app[CONFIG].upstreams[policy.upstream]
    dialect: Dialect = "ollama" if upstream.kind == "ollama" else "openai"
    prefix: Literal["v1", "api"] = "api" if dialect == "ollama" else "v1"
    endpoint, rest = ("embed", "embed") if dialect == "ollama" else ("embedding", "embeddings")
    raw = orjson.dumps({"model": policy.model, "input": text})
    call = Call(dialect=dialect, endpoint=endpoint, upstream=upstream, model=policy.model, type="cache",
                user=asking.user, key_id=asking.key_id)
    call.info = dialects.parse_request(dialect, endpoint, raw)
    vector: Vector | None = None
    try:
        plan = await app[ADMISSION].admit(call.info, upstream, policy.model, call.user, call.key_id,
                                          set(app[CONFIG].upstreams), None)
        hold(app, call, plan)
        client = app[UPSTREAMS][upstream.name]
        async with asyncio.timeout(policy.timeout_s):
            async with await client.send("POST", client.target(prefix, rest), request_headers({}, upstream),
                                         raw) as response:
                call.status = response.status
                body = await client.read(response)
        if call.status != 200:
            call.outcome = "upstream_rate_limited" if call.status == 429 else "upstream_status"
        else:
            call.answered = True
            parsed = orjson.loads(body)
            call.usage, call.prompt_missing = dialects.body_usage(dialect, parsed)
            from .cache.semantic import unit
            vector = unit(_vector_of(dialect, parsed))
    except ProxyError as exc:
        if exc.outcome in REFUSED_OUTCOMES:   # a limit or a budget: counted, never a ledger row
            refused(app, exc.outcome)
            finish_ticket(app, call, 0)
            return None
        call.fail(exc, status_sent=False)
    except TimeoutError:
        call.outcome, call.status = "timeout", 504
    except (orjson.JSONDecodeError, UpstreamError, ValueError, TypeError, KeyError, IndexError):
        call.outcome, call.status = "bad_upstream_response", 502
    record = call.record(app[CONFIG], app[ESTIMATOR], app[ACCOUNTING].clock())
    finish_ticket(app, call, record.total_tokens)
    app[ACCOUNTING].record(record)
    if vector is None and call.outcome == "ok":
        log.warning("cache: %s gave no usable embedding; questions are matched exactly only", upstream.name)
    return vector


def _vector_of(dialect: Dialect, body: Any) -> list[float]:
    if dialect == "ollama":
        return list(body["embeddings"][0])
    return list(body["data"][0]["embedding"])
