"""Which upstream serves a call: models and their globs, the defaults, aliases and fallbacks.

The config says what each upstream serves; this module reads it the one way every caller needs:
the metered relay, admission (which falls back when an upstream is out of quota), `GET /v1/models`
and the paths the endpoints pass through.
"""

from __future__ import annotations

import fnmatch

from .config import Config, Upstream
from .dialects import Dialect


def serves(upstream: Upstream, model: str) -> bool:
    return any(fnmatch.fnmatchcase(model, pattern) for pattern in upstream.models)


def upstream_model(upstream: Upstream, model: str) -> str:
    """The name the upstream wants for the model the client named (its aliases)."""
    return upstream.aliases.get(model, model)


def listed_models(upstream: Upstream) -> tuple[str, ...]:
    """Model names given literally (not as globs), for GET /v1/models."""
    return tuple(m for m in upstream.models if not any(c in m for c in "*?["))


def upstream_for(config: Config, model: str | None) -> Upstream | None:
    """The upstream that serves `model` on /v1: first match in file order, else the default."""
    if model:
        for upstream in config.upstreams.values():
            if serves(upstream, model):
                return upstream
    if config.routing.default_upstream:
        return config.upstreams[config.routing.default_upstream]
    return None


def ollama_upstream(config: Config, model: str | None) -> Upstream | None:
    """Where an /api/ call goes: the Ollama upstream serving the model, else the default one."""
    if model:
        for upstream in config.upstreams.values():
            if upstream.kind == "ollama" and serves(upstream, model):
                return upstream
    if config.routing.ollama_upstream:
        return config.upstreams[config.routing.ollama_upstream]
    return None


def fallback_for(config: Config, upstream: Upstream, tried: set[str], dialect: Dialect) -> Upstream | None:
    """The upstream that takes a call `upstream` cannot serve, if any is left to try."""
    name = upstream.fallback
    if name is None or name in tried:
        return None
    fallback = config.upstreams[name]
    # The Ollama dialect (/api/...) can only be served by another Ollama server.
    if dialect == "ollama" and fallback.kind != "ollama":
        return None
    return fallback


def fallback_model(upstream: Upstream, model: str) -> str:
    """The model to ask `upstream`'s fallback for, when a call to `model` falls back."""
    return upstream.fallback_model or model
