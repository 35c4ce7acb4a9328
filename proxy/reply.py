"""The upstream's answer, passed on to the client as it arrives, learning its usage on the way.

Status and filtered headers first (with the call's x-ratelimit-* figures, never looser than the
upstream's own), then the body: a small whole reply in one write; a stream frame by frame,
byte for byte, less only the usage Tollgate asked for on the client's behalf; a large body
chunk by chunk, keeping its tail to read usage from.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import orjson
from aiohttp import web
from multidict import CIMultiDict

from . import dialects, framing
from .admission import Plan
from .call import Call
from .dialects import StreamState
from .http1 import Response
from .keys import LIMITER
from .limits.windows import HEADER_NAMES
from .upstream import BadResponse, UpstreamClient, UpstreamError, response_headers

# A non-streamed reply is relayed as it arrives; this much of it is also kept to read usage
# from. A larger reply keeps only its tail, where both protocols put usage.
_KEEP_BYTES = 1 << 20
_TAIL_BYTES = 64 << 10


async def relay_reply(request: web.Request, call: Call, response: Response, plan: Plan,
                      client: UpstreamClient, strip_usage: bool, capture_limit: int = 0) -> web.StreamResponse:
    """Pass the upstream's answer on as it arrives, learning its usage on the way."""
    call.status = response.status
    if response.status == 429:
        call.outcome = "upstream_rate_limited"
    elif response.status >= 400:
        call.outcome = "upstream_status"
    else:
        call.answered = True
    out_headers = response_headers(response.headers)
    if plan.ticket is not None and plan.ticket.limits:
        _add_limit_headers(out_headers, request.app[LIMITER].headers(plan.ticket.scopes))
    out_headers["X-Tollgate-Upstream"] = plan.upstream.name
    if call.cache_status is not None:
        out_headers["X-Tollgate-Cache"] = call.cache_status
    if call.fallback_from:
        out_headers["X-Tollgate-Fallback-From"] = call.fallback_from
    content_type = response.content_type
    streamed = content_type in ("text/event-stream", "application/x-ndjson")
    rest_of_body = client.chunks(response)
    if call.capture is not None and call.answered:
        rest_of_body = _captured(call, rest_of_body, capture_limit)
    head = b""
    if not streamed:
        head, more = await client.read_up_to(rest_of_body, _KEEP_BYTES)
        if not more:
            # A small whole reply: checked, then sent in one write, headers and body together.
            _learn_from_body(call, head, content_type)
            return web.Response(body=head, status=response.status, reason=response.reason, headers=out_headers)
    out = _Streamed(status=response.status, reason=response.reason, headers=out_headers)
    try:
        if content_type == "text/event-stream":
            await _relay_frames(request, call, rest_of_body, out, framing.sse_framer(),
                                _openai_scanner(strip_usage), lambda: response.ended)
        elif content_type == "application/x-ndjson":
            await _relay_frames(request, call, rest_of_body, out, framing.ndjson_framer(), _ollama_scanner,
                                lambda: response.ended)
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


class _Streamed(web.StreamResponse):
    """A reply relayed as it arrives, whose status line and headers leave with its first bytes.

    aiohttp's StreamResponse sends its headers the moment it is prepared, a write of their own;
    web.Response holds them for the body, and so does this. A client can do nothing with the
    headers of a stream before its first frame, and under load a whole stream often comes in one
    read: its headers, frames and end then leave in one write instead of three (each write to a
    socket is a system call, and on loopback the receiver's TCP work is charged to it too).
    The switch is aiohttp's own, the one web.Response turns off."""

    _send_headers_immediately = False


async def _captured(call: Call, body: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """The body as it arrives, a copy kept for the answer cache (the upstream's bytes, usage
    frames included) until it passes `limit`, when the copy is dropped: too large to keep."""
    async for chunk in body:
        if call.capture is not None:
            if len(call.capture) + len(chunk) > limit:
                call.capture = None
            else:
                call.capture += chunk
        yield chunk


def _add_limit_headers(out: CIMultiDict[str], ours: dict[str, str]) -> None:
    """Our x-ratelimit-* figures for requests and for tokens, unless the upstream sent its own
    and they leave less: a client must see the tighter of the two, never the looser."""
    for names in HEADER_NAMES:
        remaining = names[1]
        mine = ours.get(remaining)
        if mine is None:
            continue
        theirs = out.get(remaining)
        if theirs is not None and _as_int(theirs) <= int(mine):
            continue
        for name in names:
            out[name] = ours[name]


def _as_int(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return float("inf")  # unreadable: ours wins


def _openai_scanner(strip_usage: bool) -> Callable[[list[bytes], StreamState], bytes]:
    def scan(frames: list[bytes], state: StreamState) -> bytes:
        return dialects.scan_openai_frames(frames, state, strip_usage)
    return scan


def _ollama_scanner(lines: list[bytes], state: StreamState) -> bytes:
    for line in lines:
        dialects.scan_ollama_line(line, state)
    return lines[0] if len(lines) == 1 else b"".join(lines)


async def _relay_frames(request: web.Request, call: Call, body: AsyncIterator[bytes],
                        out: web.StreamResponse, framer: framing.Framer,
                        scan: Callable[[list[bytes], StreamState], bytes], ended: Callable[[], bool]) -> None:
    """Forward a stream as it arrives, each read's whole frames at once, learning usage and text
    on the way. `ended()` says whether the read just taken was the upstream body's last: its
    frames then go out with the end of our body, in one write."""
    state = StreamState()
    await out.prepare(request)
    call.headers_sent = True
    eof_sent = False
    try:
        async for chunk in body:
            frames = framer.feed(chunk)
            last = ended()
            if last and (rest := framer.rest()).strip():
                frames.append(rest)  # a last frame without its terminator: still the upstream's words
            forwarded = scan(frames, state) if frames else b""
            if forwarded and call.ttft is None:
                call.ttft = time.perf_counter() - call.started
            if last:
                await out.write_eof(forwarded)
                eof_sent = True
            elif forwarded:
                await out.write(forwarded)
            else:
                continue
            call.completed = state.done and state.error is None
        if not eof_sent and (rest := framer.rest()).strip():
            # The body ended without a last read (cut off, or ended after the frames we had).
            last_frames = scan([rest], state)
            if last_frames:
                await out.write(last_frames)
                call.completed = state.done and state.error is None
    finally:
        call.usage, call.prompt_missing = state.usage, state.prompt_missing
        if state.usage is None:
            # Only a stream without usage is estimated from its text: the others never parse it.
            call.text = state.text
    if state.error is not None and call.outcome == "ok":
        call.outcome = "stream_error"
    elif not state.done and state.usage is None and call.outcome == "ok":
        call.outcome = "broken_stream"
    if eof_sent:
        return
    try:
        await out.write_eof()
    except ConnectionResetError:
        if not call.completed:
            raise


async def _relay_body(request: web.Request, call: Call, body: AsyncIterator[bytes], head: bytes,
                      out: web.StreamResponse) -> None:
    """Forward a large body as it arrives, keeping only its tail to read usage from."""
    await out.prepare(request)  # its headers leave with `head`
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
    call.usage, call.prompt_missing = dialects.body_usage(call.dialect, obj)
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
