"""The URL table, and nothing else."""

from __future__ import annotations

from aiohttp import web

from . import admin, passthrough, relay


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", admin.healthz)
    app.router.add_get("/stats", admin.get_stats)
    app.router.add_get("/stats/history", admin.history)
    app.router.add_get("/stats/calls", admin.recent_calls)
    app.router.add_get("/stats/export.csv", admin.export_csv)
    app.router.add_get("/stats/snapshot.csv", admin.snapshot_csv)
    app.router.add_post("/metrics/reset", admin.reset)
    app.router.add_post("/cache/purge", admin.purge_cache)
    app.router.add_get("/metrics", admin.metrics)
    app.router.add_get("/dashboard", admin.dashboard)
    app.router.add_get("/dashboard/chart.js", admin.chart_js)
    app.router.add_post("/dashboard/login", admin.dashboard_login)
    app.router.add_post("/dashboard/logout", admin.dashboard_logout)
    # OpenAI dialect; /t/<type>/ lets a client that can only set a base URL tag its calls.
    for prefix in ("", "/t/{type}"):
        app.router.add_get(prefix + "/v1/models", passthrough.list_models)
        app.router.add_route("*", prefix + "/v1/{rest:.+}", relay.openai_call)
        app.router.add_route("*", prefix + "/api/{rest:.+}", relay.ollama_call)
