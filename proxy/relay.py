"""The path of one call: read, parse, route, forward, relay as it arrives, account.

Metered endpoints (chat, completions, embeddings, responses; Ollama's chat, generate, embed,
embeddings) end in exactly one ledger row whatever happens: success, a bad body, an upstream
error, a stream cut short, a client that hung up. Every other /v1/ and /api/ path is passed
through to its upstream and not counted as an LLM call.

Errors are raised, not formatted: the middleware in app.py renders them in the dialect's shape.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from . import auth, dialects, framing, routing, stats, tagging
from .config import Config, Upstream
from .dialects import CallInfo, Dialect, StreamState, Usage
from .errors import (BadRequest, BodyTimeout, LedgerUnavailable, PayloadTooLarge, ProxyError, RateLimited,
                     UnknownModel)
from .admission import Plan, parse_retry_after
from .keys import ACCOUNTING, ADMISSION, CONFIG, ESTIMATOR, LEDGER, LIMITER, METRICS, UPSTREAMS
from .limits import Ticket
from .store import Admission, CallRecord
from .tokens import Estimator
from .upstream import (BadResponse, Unreachable, UpstreamClient, UpstreamError, UpstreamTimeout,
                       request_headers, response_headers)

Prefix = Literal["v1", "api"]

# A non-streamed reply is relayed as it arrives; this much of it is also kept to read usage
# from. A larger reply keeps only its tail, where both protocols put usage.
_KEEP_BYTES = 1 << 20
_TAIL_BYTES = 64 << 10


@dataclass
class Call:
    """One metered call in flight: what is known so far, turned into a ledger row at the end."""

    dialect: Dialect
    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    info: CallInfo | None = None
    upstream: Upstream | None = None
    model: str = ""
    type: str = "chat"
    user: str | None = None
    status: int = 200
    outcome: str = "ok"
    answered: bool = False      # the upstream accepted the call (2xx): tokens were spent
    usage: Usage | None = None
    prompt_missing: bool = False
    text: str = ""
    ttft: float | None = None
    headers_sent: bool = False  # past this, errors can only be told inside the body
    # The final frame ([DONE], response.completed, Ollama's done) was handed to the client:
    # the call is answered, whatever happens to either connection afterwards.
    completed: bool = False
    ticket: Ticket | None = None
    fallback_from: str | None = None
    key_id: str | None = None
    admission: str | None = None
    command: bool = False  # answered by the proxy itself: no ledger row

    def fail(self, exc: ProxyError, status_sent: bool) -> None:
        if self.completed:
            return
        self.outcome = exc.outcome
        if not status_sent:
            self.status = exc.status

    def record(self, config: Config, estimator: Estimator, now: float) -> CallRecord:
        usage, estimated = self.usage, False
        if self.info is not None and self.answered:
            if usage is None:
                # The upstream said nothing (no usage chunk, cut short, client gone): estimate.
                usage = Usage(self.info.estimate_prompt(estimator),
                              estimator.text(self.text, self.model))
                estimated = True
            elif self.prompt_missing:
                usage = Usage(self.info.estimate_prompt(estimator), usage.completion, usage.cached)
                estimated = True
        usage = usage or Usage()
        price = config.price(self.upstream, self.model) if self.upstream else None
        return CallRecord(
            ts=now, upstream=self.upstream.name if self.upstream else "", model=self.model,
            dialect=self.dialect, endpoint=self.endpoint, type=self.type, user=self.user,
            stream=bool(self.info and self.info.stream), status=self.status, outcome=self.outcome,
            prompt_tokens=usage.prompt, completion_tokens=usage.completion,
            cached_tokens=usage.cached, estimated=estimated,
            latency_s=time.perf_counter() - self.started, ttft_s=self.ttft,
            cost_usd=price.cost(usage.prompt, usage.completion, usage.cached) if price else 0.0,
            fallback_from=self.fallback_from, key_id=self.key_id, admission=self.admission,
        )


def _dialect(prefix: Prefix) -> Dialect:
    return "openai" if prefix == "v1" else "ollama"


async def _read_body(request: web.Request, config: Config) -> bytes:
    """The whole request body, bounded in size and in time (a client trickling bytes must not
    hold a connection and its memory open forever)."""
    limit = config.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"The request body is {request.content_length:,} bytes; "
                              f"this proxy accepts at most {limit:,}.")

    try:
        if request.content.is_eof():  # already all here (the usual case): no timer needed
            body = await request.content.read()
            if len(body) > limit:
                raise PayloadTooLarge(f"The request body is over {limit:,} bytes, the most this proxy accepts.")
            return body
        chunks, size = [], 0
        # asyncio.timeout, not wait_for: no extra task per call.
        async with asyncio.timeout(config.server.body_timeout_s):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"The request body is over {limit:,} bytes, the most this proxy accepts.")
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout(f"The request body did not arrive within {config.server.body_timeout_s:g} s.") from None
    except web.RequestPayloadError:
        # aiohttp decodes a compressed body as it arrives; this one was not what its header said.
        coding = request.headers.get("Content-Encoding", "its Content-Encoding")
        raise BadRequest(f"The request body could not be decoded as {coding}.") from None
    return b"".join(chunks)


async def openai_call(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "v1")


async def ollama_call(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "api")


async def _handle(request: web.Request, prefix: Prefix) -> web.StreamResponse:
    config = request.app[CONFIG]
    admin = auth.presents_admin_token(request)
    try:
        where = routing.route(config, prefix, request.method, request.match_info["rest"], admin)
    except ProxyError as exc:
        request.app[METRICS].refused.labels(exc.code).inc()
        raise
    if isinstance(where, routing.Metered):
        return await metered(request, prefix, where.rest, where.endpoint)
    if not admin:  # the operator, with the admin token, needs no proxy key besides
        auth.proxy_key(config, request.headers)
    return await passthrough(request, prefix, where)


async def metered(request: web.Request, prefix: Prefix, rest: str, endpoint: str) -> web.StreamResponse:
    app = request.app
    if app[LEDGER].full and not app[LEDGER].drop_when_full:
        # on_ledger_full = "refuse": a call the books cannot take is not served at all.
        app[METRICS].refused.labels(LedgerUnavailable.code).inc()
        health = app[LEDGER].health()
        raise LedgerUnavailable(f"Tollgate cannot record calls right now ({health.failing or 'ledger behind'}; "
                                f"{health.unwritten:,} rows waiting), so it is not forwarding any; try again later.",
                                {"Retry-After": "5"})
    call = Call(dialect=_dialect(prefix), endpoint=endpoint)
    app[METRICS].in_flight.inc()
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
        app[METRICS].in_flight.dec()
        if not call.command:
            record = call.record(app[CONFIG], app[ESTIMATOR], app[ACCOUNTING].clock())
            _finish_ticket(app, call, record.total_tokens)
            app[ACCOUNTING].record(record)


def _route(config: Config, call: Call, info: CallInfo) -> Upstream:
    if call.dialect == "openai":
        if not info.model:
            raise BadRequest("The request body needs a 'model'.")
        upstream = config.upstream_for(info.model)
    else:
        upstream = config.ollama_upstream(info.model)
    if upstream is None:
        raise UnknownModel(f"The model '{info.model}' is not served by any configured upstream.")
    return upstream


async def _metered(request: web.Request, prefix: Prefix, rest: str, call: Call) -> web.StreamResponse:
    app = request.app
    config = app[CONFIG]
    key = auth.proxy_key(config, request.headers)
    call.key_id = key.name if key else None
    call.user = tagging.user(None, request.headers, key)
    raw = await _read_body(request, config)
    try:
        info = dialects.parse_request(call.dialect, call.endpoint, raw)
    except dialects.BadRequest as exc:
        raise BadRequest(str(exc)) from None
    call.info, call.model = info, info.model or ""
    call.user = tagging.user(info, request.headers, key)
    if _is_stats_command(config, call, info):
        # Answered here with the stats text: not forwarded, not limited, not a metered call.
        call.command = True
        body, content_type = dialects.reply(info, stats.stats_text(config, app[ACCOUNTING], app[LIMITER], config.commands.lang),
                                            app[ACCOUNTING].clock())
        return web.Response(body=body, headers={"Content-Type": content_type, "X-Tollgate-Command": "stats"})
    call.type = tagging.request_type(config, info, request.headers.get("X-Tollgate-Type"),
                                     request.match_info.get("type"))
    call.upstream = _route(config, call, info)
    strip_usage = dialects.wants_injected_usage(info)
    response, plan, client = await _send(request, prefix, rest, call, info, raw, strip_usage)

    async with response:
        return await _relay(request, call, response, plan, client, strip_usage)


async def _send(request: web.Request, prefix: Prefix, rest: str, call: Call, info: CallInfo, raw: bytes,
                strip_usage: bool) -> tuple[aiohttp.ClientResponse, Plan, UpstreamClient]:
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
    while True:
        plan = await admission.admit(info, upstream, model, call.user, call.key_id, tried, fallback_from)
        for refused_by, refused_model, denial in plan.refused:
            _attempt(app, call, refused_by, refused_model, RateLimited.outcome, RateLimited.status, None)
        call.upstream, call.model, call.ticket = plan.upstream, plan.model, plan.ticket
        call.fallback_from = fallback_from = plan.fallback_from
        call.admission = None
        if plan.ticket is not None:
            # On disk before the call leaves: a crash mid-call must not give the place back.
            call.admission = plan.ticket.key
            app[LEDGER].admit(Admission(plan.ticket.key, plan.ticket.admitted, plan.upstream.name, plan.model,
                                        call.user, call.key_id, plan.ticket.tokens))
        client = app[UPSTREAMS][plan.upstream.name]
        headers = request_headers(request.headers, plan.upstream.api_key())
        try:
            response = await client.send("POST", client.url(prefix, rest), headers,
                                         _upstream_body(raw, info, plan, strip_usage), request.query_string)
        except (Unreachable, UpstreamTimeout) as exc:
            nxt = admission.fallback_for(plan.upstream, tried, call.dialect)
            if nxt is None:
                raise
            failed = (exc.outcome, exc.status)
        else:
            if response.status == 429:
                wait = parse_retry_after(response.headers, app[CONFIG].limits.max_upstream_retry_after_s, time.time())
                limiter.upstream_refused(plan.upstream.name, wait)
            nxt = None
            if response.status == 429 or response.status >= 500:
                nxt = admission.fallback_for(plan.upstream, tried, call.dialect)
            if nxt is None:
                return response, plan, client
            response.release()
            failed = ("upstream_rate_limited" if response.status == 429 else "upstream_status", response.status)
        # Falling back: the failed attempt holds no tokens, and the fallback gets its own admission.
        _attempt(app, call, plan.upstream, plan.model, *failed, call.admission)
        _finish_ticket(app, call, 0)
        call.admission = None
        tried.add(plan.upstream.name)
        fallback_from = fallback_from or plan.upstream.name
        upstream, model = nxt, plan.upstream.fallback_model or plan.model


def _attempt(app: web.Application, call: Call, upstream: Upstream, model: str, outcome: str, status: int,
             admission: str | None) -> None:
    """The ledger row of an attempt a fallback took over from: no tokens, no cost, not final."""
    app[ACCOUNTING].record(CallRecord(
        ts=app[ACCOUNTING].clock(), upstream=upstream.name, model=model, dialect=call.dialect,
        endpoint=call.endpoint, type=call.type, user=call.user, stream=bool(call.info and call.info.stream),
        status=status, outcome=outcome, prompt_tokens=0, completion_tokens=0, cached_tokens=0, estimated=False,
        latency_s=time.perf_counter() - call.started, ttft_s=None, cost_usd=0.0, fallback_from=call.fallback_from,
        key_id=call.key_id, admission=admission, final=False))


async def _relay(request: web.Request, call: Call, response: aiohttp.ClientResponse, plan: Plan,
                 client: UpstreamClient, strip_usage: bool) -> web.StreamResponse:
    """Pass the upstream's answer on as it arrives, learning its usage on the way."""
    call.status = response.status
    if response.status == 429:
        call.outcome = "upstream_rate_limited"
    elif response.status >= 400:
        call.outcome = "upstream_status"
    else:
        call.answered = True
    out_headers = response_headers(response.headers)
    if plan.ticket is not None:
        _add_limit_headers(out_headers, request.app[LIMITER].headers(plan.ticket.scopes))
    out_headers["X-Tollgate-Upstream"] = plan.upstream.name
    if call.fallback_from:
        out_headers["X-Tollgate-Fallback-From"] = call.fallback_from
    content_type = response.content_type
    streamed = content_type in ("text/event-stream", "application/x-ndjson")
    rest_of_body = client.chunks(response)
    head = b""
    if not streamed:
        head, more = await client.read_up_to(rest_of_body, _KEEP_BYTES)
        if not more:
            # A small whole reply: checked, then sent in one write, headers and body together.
            _learn_from_body(call, head, content_type)
            return web.Response(body=head, status=response.status, reason=response.reason, headers=out_headers)
    out = web.StreamResponse(status=response.status, reason=response.reason, headers=out_headers)
    try:
        if content_type == "text/event-stream":
            await _relay_frames(request, call, rest_of_body, out, framing.sse_framer(),
                                _openai_scanner(strip_usage))
        elif content_type == "application/x-ndjson":
            await _relay_frames(request, call, rest_of_body, out, framing.ndjson_framer(), _ollama_scanner)
        else:
            await _relay_body(request, call, rest_of_body, head, out)
    except UpstreamError as exc:
        if not out.prepared:
            raise
        if call.completed:
            # Trouble after the final frame (the upstream cut its connection instead of closing
            # the stream cleanly) changes nothing the client got.
            return out
        call.fail(exc, status_sent=True)
        await _end_broken(request, call, out, exc)
    return out


def _add_limit_headers(out: CIMultiDict[str], ours: dict[str, str]) -> None:
    """Our x-ratelimit-* figures for requests and for tokens, unless the upstream sent its own
    and they leave less: a client must see the tighter of the two, never the looser."""
    for kind in ("requests", "tokens"):
        theirs = out.get(f"x-ratelimit-remaining-{kind}")
        mine = ours.get(f"x-ratelimit-remaining-{kind}")
        if mine is None or (theirs is not None and _as_int(theirs) <= int(mine)):
            continue
        for part in ("limit", "remaining", "reset"):
            out[f"x-ratelimit-{part}-{kind}"] = ours[f"x-ratelimit-{part}-{kind}"]


def _as_int(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return float("inf")  # unreadable: ours wins


def _is_stats_command(config: Config, call: Call, info: CallInfo) -> bool:
    chat = call.endpoint == "chat" or (call.dialect == "ollama" and call.endpoint == "generate")
    return chat and info.last_user_text.strip().lower() in config.commands.stats


def _upstream_body(raw: bytes, info: CallInfo, plan: Plan, strip_usage: bool) -> bytes:
    """The client's body as the upstream must see it: its model name, usage asked, output capped."""
    body = info.body
    if strip_usage:
        body = dialects.with_injected_usage(info)
    upstream_model = plan.upstream.upstream_model(plan.model)
    if upstream_model != info.model:
        body = {**body, "model": upstream_model}
    if plan.clamp_output is not None:
        body = dialects.with_max_output(info, body, plan.clamp_output)
    return raw if body is info.body else orjson.dumps(body)


def _finish_ticket(app: web.Application, call: Call, tokens: int) -> None:
    if call.ticket is not None:
        app[LIMITER].finish(call.ticket, tokens)
        call.ticket = None
        app[ADMISSION].lines.notify()


def _openai_scanner(strip_usage: bool) -> Callable[[bytes, StreamState], bytes | None]:
    def scan(frame: bytes, state: StreamState) -> bytes | None:
        return dialects.scan_openai_frame(frame, state, strip_usage)
    return scan


def _ollama_scanner(line: bytes, state: StreamState) -> bytes:
    dialects.scan_ollama_line(line, state)
    return line


async def _relay_frames(request: web.Request, call: Call, body: AsyncIterator[bytes],
                        out: web.StreamResponse, framer: framing.Framer,
                        scan: Callable[[bytes, StreamState], bytes | None]) -> None:
    """Forward a stream frame by frame as it arrives, learning usage and text on the way."""
    state = StreamState()
    await out.prepare(request)
    call.headers_sent = True
    try:
        async for chunk in body:
            forwarded = [f for f in (scan(frame, state) for frame in framer.feed(chunk)) if f]
            if forwarded:
                if call.ttft is None:
                    call.ttft = time.perf_counter() - call.started
                await out.write(b"".join(forwarded))
                call.completed = state.done and state.error is None
        rest = framer.rest()
        if rest.strip():
            # A last frame without its terminator: still the upstream's words, pass them on.
            last = scan(rest, state)
            if last:
                await out.write(last)
                call.completed = state.done and state.error is None
    finally:
        call.usage, call.prompt_missing, call.text = state.usage, state.prompt_missing, state.text
    if state.error is not None and call.outcome == "ok":
        call.outcome = "stream_error"
    elif not state.done and state.usage is None and call.outcome == "ok":
        call.outcome = "broken_stream"
    try:
        await out.write_eof()
    except ConnectionResetError:
        if not call.completed:
            raise


async def _relay_body(request: web.Request, call: Call, body: AsyncIterator[bytes], head: bytes,
                      out: web.StreamResponse) -> None:
    """Forward a large body as it arrives, keeping only its tail to read usage from."""
    await out.prepare(request)
    call.headers_sent = True
    await out.write(head)
    tail = head[-_TAIL_BYTES:]
    async for chunk in body:
        await out.write(chunk)
        tail = (tail + chunk)[-_TAIL_BYTES:]
    await out.write_eof()
    if call.answered:
        call.usage = dialects.tail_usage(call.dialect, tail)


def _learn_from_body(call: Call, body: bytes, content_type: str) -> None:
    """Usage (or, lacking it, the generated text) of a whole non-streamed reply.

    A success must be JSON: anything else (an HTML page from a captive portal or a broken
    gateway, a truncated object) is the upstream's failure, reported as 502, not relayed as
    if it were an answer.
    """
    if not call.answered:
        return
    name = call.upstream.name if call.upstream else "?"
    if content_type != "application/json":
        raise BadResponse(f"Upstream '{name}' answered with '{content_type or 'no content type'}' "
                          f"where JSON was expected.")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadResponse(f"Upstream '{name}' answered with malformed JSON.") from None
    call.usage = dialects.body_usage(call.dialect, obj)
    if call.dialect == "ollama" and call.usage is None and isinstance(obj, dict):
        found = dialects.ollama_usage(obj)
        if found is not None:
            call.usage, call.prompt_missing = found
    if call.usage is None:
        call.text = dialects.body_text(call.dialect, obj)


async def _end_broken(request: web.Request, call: Call, out: web.StreamResponse,
                      exc: UpstreamError) -> None:
    """The upstream failed after our status line went out: tell the client as best we can."""
    info = call.info
    streaming = info is not None and info.stream
    try:
        if streaming:
            await out.write(dialects.stream_error_frame(call.dialect, exc.message, exc.type, exc.code))
            await out.write_eof()
        elif request.transport is not None:
            # A half-sent JSON body must not look complete: drop the connection instead.
            request.transport.close()
    except ConnectionResetError:
        pass


async def passthrough(request: web.Request, prefix: Prefix, where: routing.PassThrough) -> web.StreamResponse:
    """Relay a call the config lets through unmetered (model lists, version, files...)."""
    app = request.app
    upstream = where.upstream
    client = app[UPSTREAMS][upstream.name]
    body = await _read_body(request, app[CONFIG]) if request.can_read_body else None
    headers = request_headers(request.headers, upstream.api_key())
    response = await client.send(request.method, client.url(prefix, where.rest), headers, body,
                                 request.query_string)
    async with response:
        out = web.StreamResponse(status=response.status, reason=response.reason,
                                 headers=response_headers(response.headers))
        out.headers["X-Tollgate-Upstream"] = upstream.name
        await out.prepare(request)
        try:
            async for chunk in client.chunks(response):
                await out.write(chunk)
        except UpstreamError:
            # Too late for an error status: cut the connection so the body cannot pass as whole.
            if request.transport is not None:
                request.transport.close()
            return out
        await out.write_eof()
        return out


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: what the configured upstreams serve, named as clients should name them."""
    app = request.app
    config = app[CONFIG]
    auth.proxy_key(config, request.headers)
    seen: dict[str, str] = {}
    for upstream in config.upstreams.values():
        names = list(upstream.listed_models) + list(upstream.aliases)
        if upstream.kind == "ollama":
            names += await _ollama_models(app[UPSTREAMS][upstream.name])
        for name in names:
            if upstream.serves(name) and config.upstream_for(name) is upstream:
                seen.setdefault(name, upstream.name)
    data = [{"id": name, "object": "model", "created": 0, "owned_by": owner}
            for name, owner in seen.items()]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}),
                        content_type="application/json")


async def _ollama_models(client: UpstreamClient) -> list[str]:
    """The models an Ollama server has pulled; an unreachable server just lists none."""
    try:
        response = await asyncio.wait_for(
            client.send("GET", client.url("api", "tags"), request_headers({}, None), None), 5.0)
        async with response:
            if response.status != 200:
                return []
            body = orjson.loads(await response.read())
    except (UpstreamError, asyncio.TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError):
        return []
    models = body.get("models") if isinstance(body, dict) else None
    return [m["name"] for m in models or () if isinstance(m, dict) and isinstance(m.get("name"), str)]
