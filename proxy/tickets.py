"""What every metered call does around its upstream request, whoever made it (the relay, or the
cache asking for an embedding): its admission booked before it leaves, its place in the limits
given back with the tokens it really took, and a refusal counted where /stats and /metrics show
it."""

from __future__ import annotations

from aiohttp import web

from .admission import Plan
from .call import Call
from .keys import ACCOUNTING, ADMISSION, LEDGER, LIMITER, METRICS
from .ledger import COUNTED_BY_ROW, Admission


def refused(app: web.Application, reason: str) -> None:
    app[ACCOUNTING].refuse(reason)
    app[LIMITER].refused(reason)
    app[METRICS].refused.labels(reason).inc()


def hold(app: web.Application, call: Call, plan: Plan) -> None:
    """The call's admission, on the ledger's queue before the call leaves: a crash mid-call must
    not give the place back. Where no scope limits the call (they only count it), its own row
    will stand for the admission (ledger.COUNTED_BY_ROW)."""
    call.ticket = plan.ticket
    if plan.ticket is None:
        return
    if not plan.ticket.limits:
        call.admission = COUNTED_BY_ROW
        return
    call.admission = plan.ticket.key
    app[LEDGER].admit(Admission(plan.ticket.key, plan.ticket.admitted, plan.upstream.name, plan.model,
                                call.user, call.key_id, plan.ticket.tokens))


def finish_ticket(app: web.Application, call: Call, tokens: int) -> None:
    if call.ticket is not None:
        app[LIMITER].finish(call.ticket, tokens)
        if call.ticket.limits:   # a counting-only ticket gives back no place anyone waits for
            app[ADMISSION].lines.notify()
        call.ticket = None
