"""Operator endpoints: /stats (JSON and WhatsApp text), /metrics/reset, /healthz.

All but /healthz need the admin token when one is configured.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from . import stats
from .auth import require_admin
from .keys import ACCOUNTING, CONFIG, LIMITER


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def get_stats(request: web.Request) -> web.Response:
    require_admin(request)
    config, acc = request.app[CONFIG], request.app[ACCOUNTING]
    if request.query.get("format") == "text":
        lang = request.query.get("lang", "es")
        return web.Response(text=stats.stats_text(config, acc, lang), content_type="text/plain")
    return _json(stats.stats_json(config, acc, request.app[LIMITER]))


async def reset(request: web.Request) -> web.Response:
    require_admin(request)
    config, acc = request.app[CONFIG], request.app[ACCOUNTING]
    started = acc.reset()
    return _json({"message": "Métricas reiniciadas exitosamente",
                  "nuevo_inicio": stats.fmt_time(config, started)})


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})
