"""Which requests are metered, which are passed through (explicitly), which are refused.

A path is normalised once, here, before any decision: trailing slashes go and case is folded,
so `/v1/Chat/Completions/` is the chat endpoint and is metered like it, never forwarded around
the books. Every request that would reach an upstream with the operator's key is either metered
or named in that upstream's `passthrough` list; anything else is refused with a message that
says how to allow it. Ollama's management endpoints (pull, push, create, copy, delete, blobs)
also need the admin token or the upstream's `allow_management`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

from .config import Config, Upstream
from .dialects import OLLAMA_ENDPOINTS, OPENAI_ENDPOINTS
from .errors import BadRequest, MethodNotAllowed, NotForwarded
from . import routing

Prefix = Literal["v1", "api"]  # the two dialects' roots

_MANAGEMENT = frozenset({"pull", "push", "create", "copy", "delete", "blobs"})


@dataclass(frozen=True)
class Metered:
    endpoint: str     # chat, completion, embedding, responses, generate, embed, embeddings
    rest: str         # the canonical path below the prefix, as forwarded


@dataclass(frozen=True)
class PassThrough:
    upstream: Upstream
    rest: str         # as the client sent it, less trailing slashes


Route = Metered | PassThrough


def check_path(rest: str) -> None:
    """Refuse paths that could climb out of the upstream's base URL."""
    segments = rest.split("/")
    if any(seg in ("", ".", "..") for seg in segments[:-1]) or segments[-1] in (".", "..") \
            or "\\" in rest or ":" in segments[0] or "%" in rest:
        raise BadRequest(f"The path '/{rest}' is not allowed.")


def route(config: Config, prefix: Prefix, method: str, rest: str, admin: bool) -> Route:
    """Where `<method> /<prefix>/<rest>` goes; raises the refusal when it goes nowhere."""
    rest = rest.rstrip("/")
    check_path(rest)
    key = rest.lower()
    table = OPENAI_ENDPOINTS if prefix == "v1" else OLLAMA_ENDPOINTS
    endpoint = table.get(key)
    if endpoint is not None and method == "POST":
        return Metered(endpoint, key)
    path = f"/{prefix}/{key}"
    if prefix == "api" and key.split("/", 1)[0] in _MANAGEMENT:
        upstream = routing.ollama_upstream(config, None)
        if upstream is None:
            raise NotForwarded("No Ollama upstream is configured.")
        if not (upstream.allow_management or admin):
            raise NotForwarded(f"{method} {path} changes the models of Ollama upstream '{upstream.name}': "
                               f"it needs the admin token, or allow_management = true on that upstream.")
        return PassThrough(upstream, rest)
    upstream = _passthrough_upstream(config, prefix, path)
    if upstream is not None:
        return PassThrough(upstream, rest)
    if endpoint is not None:
        raise MethodNotAllowed(f"{method} is not allowed on {path}: Tollgate meters POST there.",
                               {"Allow": "POST"})
    raise NotForwarded(f"Tollgate does not forward {method} {path}: it does not meter that endpoint, and no "
                       f"upstream lists it under `passthrough` (forwarding it unmetered is an explicit choice).")


def _passthrough_upstream(config: Config, prefix: Prefix, path: str) -> Upstream | None:
    """The upstream that lets `path` through unmetered: the default one if it does, else the
    first in file order. The Ollama dialect's paths only go to Ollama upstreams."""
    allowing = [u for u in config.upstreams.values()
                if (prefix == "v1" or u.kind == "ollama")
                and any(fnmatch.fnmatchcase(path, pattern) for pattern in u.passthrough)]
    default = routing.upstream_for(config, None) if prefix == "v1" else routing.ollama_upstream(config, None)
    if default is not None and default in allowing:
        return default
    return allowing[0] if allowing else None
