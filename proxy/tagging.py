"""Which request type and which user a call belongs to.

A bot that can set headers tags with `X-Tollgate-Type`; one that can only change its base URL
puts `/t/<type>/` in front of it; otherwise config rules match the system prompt or the last
user message. Images make a call `vision`. Explicit tags win over everything else.
"""

from __future__ import annotations

from collections.abc import Mapping

from .config import Config, ProxyKey
from .dialects import MAX_NAME_LEN, CallInfo
from .errors import BadRequest


def _bounded(what: str, value: str) -> str:
    if len(value) > MAX_NAME_LEN:
        raise BadRequest(f"{what} is {len(value):,} characters long; at most {MAX_NAME_LEN} are accepted.")
    return value


def request_type(config: Config, info: CallInfo, header: str | None, path_type: str | None) -> str:
    for explicit in (header, path_type):
        if explicit:
            name = _bounded("The request type", explicit).strip().lower()
            if name in config.types:
                return name
    if info.has_images:
        return "vision"
    system, last_user = info.system_text, info.last_user_text
    for rule in config.tagging.rules:
        if rule.on != "last_user" and system and rule.pattern.search(system):
            return rule.type
        if rule.on != "system" and last_user and rule.pattern.search(last_user):
            return rule.type
    return config.routing.default_type


def user(info: CallInfo | None, headers: Mapping[str, str], key: ProxyKey | None = None) -> str | None:
    """The body's `user`, else the X-Tollgate-User header, else the proxy key's user."""
    candidate = (info.user if info else None) or headers.get("X-Tollgate-User") or (key.user if key else None)
    if candidate is None:
        return None
    return _bounded("The user", candidate).strip() or None
