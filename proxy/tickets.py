"""What every metered call does at its end, whoever made it (the relay, or the cache asking for
an embedding): its place in the limits given back with the tokens it really took, and a refusal
counted where /stats and /metrics show it."""

from __future__ import annotations

from aiohttp import web

from .call import Call
from .keys import ACCOUNTING, ADMISSION, LIMITER, METRICS


def refused(app: web.Application, reason: str) -> None:
    app[ACCOUNTING].refuse(reason)
    app[LIMITER].refused(reason)
    app[METRICS].refused.labels(reason).inc()


def finish_ticket(app: web.Application, call: Call, tokens: int) -> None:
    if call.ticket is not None:
        app[LIMITER].finish(call.ticket, tokens)
        call.ticket = None
        app[ADMISSION].lines.notify()
