"""The least an aiohttp relay can do: read the body, POST it upstream, pass the reply on.

    python bench/bare_relay.py PORT UPSTREAM_URL

No metering, no parsing, no ledger: the ceiling any aiohttp-based proxy can reach on this
machine. A whole reply is returned in one write; a stream (SSE or NDJSON) is passed on chunk by
chunk as it arrives, as a streaming relay must, so the streaming comparison is fair.
bench/overhead.py and bench/cpu.py measure it beside the direct call and Tollgate, in one run.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))
    yield
    await app[SESSION].close()


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    async with request.app[SESSION].post(UPSTREAM + "/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"}) as r:
        if r.content_type not in ("text/event-stream", "application/x-ndjson"):
            return web.Response(body=await r.read(), status=r.status, content_type=r.content_type)
        out = web.StreamResponse(status=r.status, headers={"Content-Type": r.content_type})
        await out.prepare(request)
        async for chunk in r.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out


if __name__ == "__main__":
    PORT, UPSTREAM = int(sys.argv[1]), sys.argv[2]
    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", relay)
    web.run_app(app, host="127.0.0.1", port=PORT, access_log=None, loop=uvloop.new_event_loop(),
                print=lambda _: print("bare relay ready", flush=True))
