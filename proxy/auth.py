"""Who is calling: the admin token for operator endpoints, proxy keys for the LLM endpoints.

Every comparison is constant-time (hmac.compare_digest), so response timing does not tell an
attacker how much of a guessed key was right. Secrets are read from the environment at the
moment of the check and never stored, logged or echoed.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from aiohttp import web

from .config import Config, ProxyKey
from .errors import Unauthorized
from .keys import CONFIG, SESSIONS


def presented(headers: Mapping[str, str]) -> str | None:
    """The key a client sent: `Authorization: Bearer`, or Azure-style `api-key`/`x-api-key`."""
    scheme, _, value = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("api-key") or headers.get("x-api-key") or None


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


COOKIE = "tollgate_admin"


def is_admin(request: web.Request) -> bool:
    """The admin token in the Authorization header, or a live dashboard session's cookie."""
    token = request.app[CONFIG].server.admin_token()
    if token is None:
        return True
    given = presented(request.headers)
    if given is not None and _same(given, token):
        return True
    cookie = request.cookies.get(COOKIE)
    return cookie is not None and request.app[SESSIONS].valid(cookie)


def presents_admin_token(request: web.Request) -> bool:
    """The caller holds the admin token: configured, and sent. (Unlike `is_admin`, an unset
    token never counts: this is what unlocks upstream-changing calls.)"""
    token = request.app[CONFIG].server.admin_token()
    given = presented(request.headers)
    return token is not None and given is not None and _same(given, token)


def require_admin(request: web.Request) -> None:
    if not is_admin(request):
        raise Unauthorized("This endpoint needs the admin token: send 'Authorization: Bearer <token>'.")


def proxy_key(config: Config, headers: Mapping[str, str]) -> ProxyKey | None:
    """The proxy key the call presents; None when no keys are configured. 401 otherwise."""
    if not config.keys:
        return None
    given = presented(headers)
    if given is not None:
        found = None
        for key in config.keys.values():
            secret = key.secret()
            # Compare against every key, match or not, so timing does not reveal which matched.
            if secret is not None and _same(given, secret):
                found = key
        if found is not None:
            return found
    raise Unauthorized("This proxy needs a key: send 'Authorization: Bearer <your Tollgate key>'.")
