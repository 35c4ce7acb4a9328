"""What makes two requests the same question, for the answer cache.

A request's cache key is a hash of its namespace (the proxy key's name: tenants never share
answers), the upstream and model that answer it, the dialect and endpoint, and its body with the fields
that do not change the answer left out (`IGNORED`) and every object's keys in one order. Two
requests with the same key get the same answer from a deterministic model; `deterministic`
says whether this one asks for a deterministic answer at all. For semantic matching, `question`
splits a request into its last user message and everything else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from ..dialects import Dialect

# Top-level fields that change how an answer is delivered, who is billed or logged for it, or how
# long a model stays loaded, but not the answer itself.
IGNORED: dict[Dialect, frozenset[str]] = {
    "openai": frozenset({
        "stream",             # the same answer, whole or in frames (a hit is replayed in either shape)
        "stream_options",     # include_usage: handled at replay as for a live call
        "user",               # who asked (the namespace keeps tenants apart; users of one key share)
        "metadata",           # the caller's tags for its own logs
        "store",              # whether OpenAI keeps the completion for its dashboards
        "service_tier",       # which capacity pool serves it
        "prompt_cache_key",   # the upstream's own prompt-cache routing hint
        "safety_identifier",  # the end user, for the upstream's abuse checks
    }),
    "ollama": frozenset({
        "stream",             # as above
        "keep_alive",         # how long the model stays loaded afterwards
    }),
}


def key(dialect: Dialect, namespace: str | None, upstream: str, model: str, endpoint: str,
        body: Mapping[str, Any]) -> str:
    """The cache key: a hex SHA-256 of what decides the answer, in one canonical form. `body`
    is the request as orjson read it (so every integer fits 64 bits)."""
    ignored = IGNORED[dialect]
    kept = {k: v for k, v in body.items() if k not in ignored and k != "model"}
    canonical = orjson.dumps([namespace or "", upstream, model, dialect, endpoint, kept],
                             option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return hashlib.sha256(canonical).hexdigest()


def deterministic(dialect: Dialect, body: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether the request asks for one answer that bears repeating, and if not, why not. A
    sampled answer (temperature above 0, or the model's default, without a seed), several
    choices, or tools the answer may call are not cached unless a rule says so."""
    options = body.get("options") if dialect == "ollama" else body
    options = options if isinstance(options, Mapping) else {}
    temperature = options.get("temperature")
    seeded = options.get("seed") is not None
    if not seeded and (temperature is None or not isinstance(temperature, (int, float)) or temperature > 0):
        # Every upstream samples by default (OpenAI at 1, Ollama at 0.8): no temperature is not 0.
        return False, "sampled (temperature above 0 without a seed)"
    if dialect == "openai" and isinstance(body.get("n"), int) and body["n"] > 1:
        return False, "several choices (n > 1)"
    if body.get("tools") or body.get("functions"):
        return False, "tools the answer may call"
    return True, ""


def question(dialect: Dialect, endpoint: str, body: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """For semantic matching: the request's last user message, and the request without it (what
    must be identical for two questions to share an answer: system prompt, earlier turns, model,
    parameters). None when there is no plain-text last user message to compare."""
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        last = messages[-1]
        if not isinstance(last, Mapping) or last.get("role") != "user":
            return None
        text = _plain_text(last.get("content"))
        if text is None or last.keys() - {"role", "content"}:
            return None  # images, names or tool results: not a question to compare by meaning
        return text, {**body, "messages": messages[:-1]}
    field = "prompt"
    value = body.get(field)
    if not isinstance(value, str) or (dialect == "ollama" and body.get("images")):
        return None
    return value, {k: v for k, v in body.items() if k != field}


def _plain_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "\n".join(str(p.get("text", "")) for p in content)
    return None
