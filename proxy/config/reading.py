"""Reading `config.toml`: msgspec reads it against the schema; `explain` turns its errors into one
line naming the file, the key, the bad value and what was expected, with "did you mean" for a
misspelt key; what no single key can say (a fallback naming another upstream, a zone that
exists) is checked in `_finish`."""

from __future__ import annotations

import difflib
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from msgspec import Meta
from msgspec.structs import replace

from .environment import _bracketed
from .schema import OLLAMA_PASSTHROUGH, Config, ConfigError, Limits, RequestType, Upstream

# --- reading -----------------------------------------------------------------------------


def load(path: str | Path) -> Config:
    """Read and validate `path`; raise ConfigError with a one-line reason."""
    source = Path(path)
    try:
        with source.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}")
    return parse(raw, source)


def _decode(kind: type, value: Any) -> Any:
    """The two values TOML has no type for: a path and a regular expression."""
    if kind is Path and isinstance(value, str):
        return Path(value)
    if (typing.get_origin(kind) or kind) is re.Pattern and isinstance(value, str):
        try:
            return re.compile(value)
        except re.error as exc:
            raise ValueError(str(exc)) from None
    raise TypeError(f"expected {kind}")


def parse(raw: dict[str, Any], source: Path = Path("<config>")) -> Config:
    try:
        config = msgspec.convert(raw, Config, dec_hook=_decode)
    except msgspec.ValidationError as exc:
        raise explain(exc, raw, source) from None
    for section, table in (("upstreams", config.upstreams), ("alerts.webhooks", config.alerts.webhooks),
                           ("keys", config.keys), ("types", config.types)):
        for name in table:
            entry = _at(raw, section.split("."))[name]
            if "name" in entry:
                raise ConfigError(f"{source}: {section}.{_key(name)}.name = {_show(entry['name'])}: no such key "
                                  f"(the name is the table's own, [{section}.{_key(name)}])")
    return _finish(replace(config, source=source), raw, source)


def _at(raw: dict[str, Any], path: list[str]) -> Any:
    for part in path:
        raw = raw.get(part, {})
    return raw


def _finish(config: Config, raw: dict[str, Any], source: Path) -> Config:
    """What the schema cannot say: values worked out from others, and names that must exist."""

    def fail(key: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key} = {_show(value)}: expected {expected}")

    server = config.server
    data_dir = server.data_dir if server.data_dir.is_absolute() else (source.parent / server.data_dir).resolve()
    server = replace(server, data_dir=data_dir,
                     allowed_hosts=frozenset({h.lower() for h in server.allowed_hosts}
                                             | {"localhost", "127.0.0.1", "[::1]", _bracketed(server.host)}),
                     cors_origins=frozenset(o.lower().rstrip("/") for o in server.cors_origins))

    if not config.upstreams:
        raise fail("upstreams", {}, "at least one [upstreams.<name>] table")
    names = sorted(config.upstreams)
    upstreams: dict[str, Upstream] = {}
    for name, upstream in config.upstreams.items():
        key, given = f"upstreams.{_key(name)}", raw["upstreams"][name]
        parts = urlsplit(upstream.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise fail(f"{key}.base_url", upstream.base_url, "an http:// or https:// URL with a host")
        if upstream.fallback is not None and (upstream.fallback not in config.upstreams or upstream.fallback == name):
            raise fail(f"{key}.fallback", upstream.fallback, f"another configured upstream, one of {names}")
        credentials = {"authorization", "cookie", "host", "api-key", "x-api-key"}
        forward = frozenset(h.lower() for h in upstream.forward_headers)
        if forward & credentials:
            raise fail(f"{key}.forward_headers", sorted(upstream.forward_headers),
                       "names other than credentials and Host (the upstream key is Tollgate's to send)")
        ollama = upstream.kind == "ollama"
        upstreams[name] = replace(
            upstream, name=name, base_url=upstream.base_url.rstrip("/"),
            label=upstream.label or name, short_name=upstream.short_name or name,
            free=upstream.free if "free" in given else ollama,
            passthrough=tuple(p.lower().rstrip("/") for p in upstream.passthrough) if "passthrough" in given
            else (OLLAMA_PASSTHROUGH if ollama else ()),
            forward_headers=forward, limits=_zoned(upstream.limits, f"{key}.limits", fail))

    request_types = {name: replace(t, name=name, label=t.label or name, label_en=t.label_en or t.label or name)
                     for name, t in config.types.items()}
    for required in ("chat", "vision"):
        request_types.setdefault(required, RequestType(name=required, label=required.capitalize(),
                                                       label_en=required.capitalize()))
    if any(r.semantic for r in config.cache.rules):
        # The semantic cache's own embedding calls are booked under this type.
        request_types.setdefault("cache", RequestType(name="cache", label="Caché semántica",
                                                      label_en="Semantic cache"))

    routing = config.routing
    if routing.default_upstream is not None and routing.default_upstream not in upstreams:
        raise fail("routing.default_upstream", routing.default_upstream, f"one of the configured upstreams {names}")
    ollamas = [u.name for u in upstreams.values() if u.kind == "ollama"]
    if routing.ollama_upstream is None and ollamas:
        routing = replace(routing, ollama_upstream=ollamas[0])
    elif routing.ollama_upstream is not None and routing.ollama_upstream not in ollamas:
        raise fail("routing.ollama_upstream", routing.ollama_upstream, f"one of the ollama upstreams {ollamas}")
    if routing.default_type not in request_types:
        raise fail("routing.default_type", routing.default_type, f"one of the request types {sorted(request_types)}")

    stats = config.stats
    _zone(stats.timezone, "stats.timezone", fail)
    if stats.limits_upstream is not None and stats.limits_upstream not in upstreams:
        raise fail("stats.limits_upstream", stats.limits_upstream, f"one of {names}")

    policy = config.limits
    policy = replace(policy, per_user=_zoned(policy.per_user, "limits.per_user", fail),
                     models={k: _zoned(v, f"limits.models.{_key(k)}", fail) for k, v in policy.models.items()},
                     users={k: _zoned(v, f"limits.users.{_key(k)}", fail) for k, v in policy.users.items()})
    keys = {name: replace(k, name=name, limits=_zoned(k.limits, f"keys.{_key(name)}.limits", fail))
            for name, k in config.keys.items()}

    alerts = config.alerts
    hooks = {name: replace(hook, name=name) for name, hook in alerts.webhooks.items()}
    default_port = {"starttls": 587, "tls": 465, "none": 25}
    emails = {name: replace(mail, name=name, port=mail.port or default_port[mail.security],
                            lang=mail.lang or config.commands.lang)
              for name, mail in alerts.email.items()}
    rules = []
    default_upstream = stats.limits_upstream or next(iter(upstreams))
    for i, rule in enumerate(alerts.rules):
        if not all(h in hooks for h in rule.webhooks):
            raise fail(f"alerts.rules[{i}].webhooks", list(rule.webhooks), f"names from [alerts.webhooks]: {sorted(hooks)}")
        if not all(e in emails for e in rule.emails):
            raise fail(f"alerts.rules[{i}].emails", list(rule.emails), f"names from [alerts.email]: {sorted(emails)}")
        whose = rule.upstream or default_upstream
        if whose not in upstreams:
            raise fail(f"alerts.rules[{i}].upstream", whose, f"one of {names}")
        rules.append(replace(rule, name=rule.name or rule.metric, upstream=whose))
    alerts = replace(alerts, rules=tuple(rules), webhooks=hooks, email=emails)

    budgets = {}
    for name, budget in config.budgets.items():
        key = f"budgets.{_key(name)}"
        if budget.upstream is not None and budget.upstream not in upstreams:
            raise fail(f"{key}.upstream", budget.upstream, f"one of {names}")
        if budget.key is not None and budget.key not in keys:
            raise fail(f"{key}.key", budget.key, f"one of the proxy keys {sorted(keys)}")
        if budget.per_user and budget.user is not None:
            raise fail(f"{key}.per_user", True, "false when `user` names one user")
        for field_name, destinations, table in (("webhooks", set(hooks), "[alerts.webhooks]"),
                                                ("emails", set(emails), "[alerts.email]")):
            missing = [n for n in getattr(budget, field_name) if n not in destinations]
            if missing:
                raise fail(f"{key}.{field_name}", missing[0], f"names from {table}: {sorted(destinations)}")
        budgets[name] = replace(budget, name=name, alert_at=tuple(sorted(set(budget.alert_at))))
    if any(b.period == "month" for b in budgets.values()) and (config.ledger.keep_raw_days or 32) < 32:
        raise fail("ledger.keep_raw_days", config.ledger.keep_raw_days,
                   "32 or more with a monthly budget (its spend is read back from the month's call rows)")

    for i, tag in enumerate(config.tagging.rules):
        if tag.type not in request_types:
            raise fail(f"tagging.rules[{i}].type", tag.type, f"one of the request types {sorted(request_types)}")
    commands = replace(config.commands, stats=tuple(p.strip().lower() for p in config.commands.stats))

    cache = config.cache
    for i, cache_rule in enumerate(cache.rules):
        for field_name, known in (("upstreams", upstreams), ("types", request_types), ("keys", keys)):
            unknown = [n for n in getattr(cache_rule, field_name) if n not in known]
            if unknown:
                raise fail(f"cache.rules[{i}].{field_name}", unknown[0], f"one of {sorted(known)}")
    embedder = cache.semantic.upstream or (ollamas[0] if ollamas else None)
    if embedder is not None and embedder not in upstreams:
        raise fail("cache.semantic.upstream", embedder, f"one of {names}")
    if embedder is None and any(r.semantic for r in cache.rules):
        raise fail("cache.semantic.upstream", None, "an upstream to embed questions with (there is no ollama one)")
    cache = replace(cache, semantic=replace(cache.semantic, upstream=embedder))

    return replace(config, server=server, upstreams=upstreams, types=request_types, routing=routing,
                   limits=policy, keys=keys, alerts=alerts, commands=commands, cache=cache, budgets=budgets)


def _zone(name: str, key: str, fail: typing.Callable[[str, Any, str], ConfigError]) -> None:
    if name == "local":
        return
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise fail(key, name, "an IANA time zone such as 'America/Mexico_City', or 'local'") from None


def _zoned(limits: Limits, key: str, fail: typing.Callable[[str, Any, str], ConfigError]) -> Limits:
    if limits.timezone is not None:
        _zone(limits.timezone, f"{key}.timezone", fail)
    return limits


# --- one line per error ------------------------------------------------------------------

_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>.*)`)?$", re.S)
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\[\.\.\.\]")


def explain(error: msgspec.ValidationError, raw: Any, source: Path) -> ConfigError:
    """msgspec's "Expected `int` >= 1 - at `$.upstreams[...].limits.rpm`" as a person reads it:
    `config.toml: upstreams.github.limits.rpm = 0: expected a positive whole number`."""
    found = _AT.match(str(error))
    assert found is not None
    what, path = found["what"], found["path"] or ""
    kind: Any = Config
    value: Any = raw
    keys: list[str] = []
    meta: list[Meta] = []
    for step in _STEP.finditer(path):
        name, index = step.group(1), step.group(2)
        if name is not None:
            kind, meta = _field(kind, name)
            value = value.get(name) if isinstance(value, dict) else None
            keys.append(name)
        elif index is not None:
            item = _unwrap(kind)[0]
            item_kind = typing.get_args(item)[0] if typing.get_args(item) else Any
            if not _is_struct(_unwrap(item_kind)[0]):
                break  # a list of plain values: the whole list is the value in question
            kind, meta = item_kind, []
            value = value[int(index)] if isinstance(value, list) else None
            keys[-1] += f"[{index}]"
        else:  # a table of tables: msgspec does not say which entry, so find the one that fails
            entry_kind = typing.get_args(_unwrap(kind)[0])[1]
            name = next((k for k, v in value.items() if _fails(v, entry_kind)), "?") if isinstance(value, dict) else "?"
            kind, meta = entry_kind, []
            value = value.get(name) if isinstance(value, dict) else None
            keys.append(_key(name))
    where = ".".join(keys)
    if unknown := re.match(r"Object contains unknown field `(.+)`", what):
        name = unknown[1]
        known = [n for n in _fields(kind) if not _derived(kind, n)]
        # A close spelling here, else the same key one table down (`rpm` belongs in `limits`).
        near = difflib.get_close_matches(name, known, n=1, cutoff=0.6) or [
            f"{k}.{name}" for k in known if name in _fields(_field(kind, k)[0])][:1]
        full = f"{where}.{_key(name)}" if where else _key(name)
        bad = value.get(name) if isinstance(value, dict) else None
        hint = f"; did you mean `{near[0]}`?" if near else " (see the README's config reference)"
        if isinstance(bad, dict):  # a whole table under a wrong name: say so, do not dump it
            return ConfigError(f"{source}: [{full}]: no such table{hint}")
        return ConfigError(f"{source}: {full} = {_show(bad)}: no such key{hint}")
    if missing := re.match(r"Object missing required field `(.+)`", what):
        kind, meta = _field(kind, missing[1])
        full = f"{where}.{missing[1]}" if where else missing[1]
        return ConfigError(f"{source}: {full}: missing; expected {_expected(kind, meta, what)}")
    return ConfigError(f"{source}: {where or '<top>'} = {_show(value)}: expected {_expected(kind, meta, what)}")


def _fails(value: Any, kind: Any) -> bool:
    try:
        msgspec.convert(value, kind, dec_hook=_decode)
    except msgspec.ValidationError:
        return True
    return False


def _unwrap(kind: Any) -> tuple[Any, list[Meta]]:
    """The type under Annotated and Optional, with the Metas met on the way, outermost first."""
    metas: list[Meta] = []
    while True:
        if typing.get_origin(kind) is Annotated:
            kind, *extra = typing.get_args(kind)
            metas += [m for m in extra if isinstance(m, Meta)]
        elif typing.get_origin(kind) in (typing.Union, types.UnionType):
            options = [a for a in typing.get_args(kind) if a is not type(None)]
            if len(options) != 1:
                return kind, metas
            kind = options[0]
        else:
            return kind, metas


def _is_struct(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, msgspec.Struct)


def _fields(kind: Any) -> dict[str, Any]:
    bare = _unwrap(kind)[0]
    return typing.get_type_hints(bare, include_extras=True) if _is_struct(bare) else {}


def _field(kind: Any, name: str) -> tuple[Any, list[Meta]]:
    hint = _fields(kind).get(name, Any)
    return hint, _unwrap(hint)[1]


def _derived(kind: Any, name: str) -> bool:
    return any(m.extra and m.extra.get("derived") for m in _field(kind, name)[1])


def _expected(kind: Any, meta: list[Meta], fallback: str) -> str:
    """What a key takes, in words: its own, its value type's, or said from its type."""
    for m in meta:
        if m.extra and m.extra.get("expected"):
            return str(m.extra["expected"])
    bare = _unwrap(kind)[0]
    if typing.get_origin(bare) is Literal:
        options = [repr(v) for v in typing.get_args(bare)]
        return ", ".join(options[:-1]) + " or " + options[-1]
    words = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}
    if bare in words:
        return words[bare]
    if _is_struct(bare) or typing.get_origin(bare) is dict:
        return "a table"
    return fallback[0].lower() + fallback[1:]


def _key(name: str) -> str:
    """A key as TOML writes it: bare when it can be, else quoted."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else '"' + name.replace('"', '\\"') + '"'


def _show(value: Any) -> str:
    text = ("true" if value else "false") if isinstance(value, bool) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
