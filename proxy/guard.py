"""Who may reach the proxy, and from where: the Host allow-list, cross-site checks, CORS.

A proxy on loopback is still reachable from every web page the operator opens: a page can POST
to 127.0.0.1 (a "simple" request needs no permission), and a DNS name that an attacker re-points
at 127.0.0.1 can even read the answers. So:

- a Host header outside `server.allowed_hosts` (default: the bind address, localhost, 127.0.0.1
  and [::1]) gets 421, which closes DNS rebinding;
- a state-changing admin request (reset, login, logout) from another origin, another port of
  the same host included, gets 403 (browsers say where a request comes from in `Origin` and
  `Sec-Fetch-Site`; a client that sends neither is not a browser and still needs the token);
- an LLM request from a browser page on another origin gets 403 unless that origin is in
  `server.cors_origins`; then it gets CORS headers, and its preflight is answered here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from .errors import ProxyError
from .keys import CONFIG

# State-changing admin requests: never from another origin.
_ADMIN_WRITES = frozenset({"/metrics/reset", "/cache/purge", "/dashboard/login", "/dashboard/logout"})
_LLM_ROOTS = ("/v1/", "/api/", "/t/")
# Tollgate's own reply headers a page may read: which upstream answered, whether from the cache.
_EXPOSED = "age, x-tollgate-cache, x-tollgate-upstream, x-tollgate-fallback-from"
_CORS_HEADERS = "authorization, content-type, openai-beta, openai-organization, openai-project, " \
                "cache-control, x-tollgate-cache, x-tollgate-type, x-tollgate-user, x-stainless-arch, x-stainless-lang, x-stainless-os, " \
                "x-stainless-package-version, x-stainless-retry-count, x-stainless-runtime, " \
                "x-stainless-runtime-version, x-stainless-timeout, x-stainless-async"


class MisdirectedRequest(ProxyError):
    status, type, code, outcome = 421, "invalid_request_error", "misdirected_request", "bad_request"


class CrossOrigin(ProxyError):
    status, type, code, outcome = 403, "invalid_request_error", "cross_origin", "bad_request"


def host_name(host: str) -> str:
    """The name in a Host header, without its port ([::1]:5000 -> [::1])."""
    if host.startswith("["):
        return host[:host.find("]") + 1].lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


def own_origin(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}".lower()


def _cross_site(request: web.Request) -> str | None:
    """The other origin a browser says this request comes from, if any."""
    origin = request.headers.get("Origin")
    if origin is not None and origin.lower() != own_origin(request):
        return origin
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return origin or "another site"
    return None


async def guard(request: web.Request,
                handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every request, before its handler (app.py's error middleware calls it, so its refusals
    leave in the caller's dialect like any other error)."""
    server = request.app[CONFIG].server
    allowed = server.allowed_hosts
    if "*" not in allowed and host_name(request.host) not in allowed:
        raise MisdirectedRequest(f"This proxy does not answer for the host '{request.host[:100]}' "
                                 f"(server.allowed_hosts).")
    other = _cross_site(request)
    if request.path in _ADMIN_WRITES and request.method == "POST" and other is not None:
        raise CrossOrigin(f"{request.path} does not take requests from another origin ({other[:100]}).")
    if other is None or not request.path.startswith(_LLM_ROOTS):
        return await handler(request)
    if other not in server.cors_origins:
        raise CrossOrigin(f"Requests from {other[:100]} are not allowed: add it to server.cors_origins "
                          f"to let pages from it use this proxy.")
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response: web.StreamResponse = web.Response(status=204, headers={
            "Access-Control-Allow-Methods": "POST, GET",
            "Access-Control-Allow-Headers": _CORS_HEADERS,
            "Access-Control-Max-Age": "600"})
    else:
        response = await handler(request)
    response.headers["Access-Control-Allow-Origin"] = other
    response.headers["Access-Control-Expose-Headers"] = _EXPOSED
    response.headers["Vary"] = "Origin"
    return response
