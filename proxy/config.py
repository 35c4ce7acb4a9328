"""`config.toml` into frozen dataclasses, validated once.

Every problem is reported as one `ConfigError` line naming the file, the key, the bad value
and what was expected, so a typo stops start-up with a message a person can act on.
Unknown keys are errors too: a misspelt limit silently ignored is a limit not enforced.

Secrets never enter these objects: the config names the environment variable that holds a
key, and the key is read from the environment at the moment it is sent upstream. So no repr,
log line or traceback of a config object can carry one.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

Kind = Literal["openai", "ollama"]
DayMode = Literal["rolling", "calendar"]
RuleScope = Literal["system", "last_user", "any"]
OnLimit = Literal["reject", "wait"]
AlertMetric = Literal["cost_usd", "error_rate_pct", "daily_requests_pct", "tpm_pct", "total_tokens",
                      "ledger_unwritten_rows"]
WebhookFormat = Literal["slack", "discord", "json"]
ALERT_METRICS = ("cost_usd", "error_rate_pct", "daily_requests_pct", "tpm_pct", "total_tokens",
                 "ledger_unwritten_rows")
OnLedgerFull = Literal["refuse", "serve"]
OutputCap = Literal["clamp", "reject"]

T = TypeVar("T")


class ConfigError(Exception):
    """A config problem, worded as one line: file, key, value, what was expected."""


@dataclass(frozen=True)
class Limits:
    """Free-tier style limits of one scope; None means unlimited."""

    rpm: int | None = None
    rpd: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    day: DayMode = "rolling"
    timezone: str | None = None  # a calendar day's zone; None: the stats zone, like every "today"

    @cached_property
    def any(self) -> bool:
        return any(
            v is not None
            for v in (self.rpm, self.rpd, self.tpm, self.concurrency,
                      self.max_input_tokens, self.max_output_tokens)
        )


@dataclass(frozen=True)
class Upstream:
    name: str
    kind: Kind
    base_url: str
    label: str
    short_name: str
    models: tuple[str, ...]
    aliases: Mapping[str, str]
    free: bool
    api_key_env: str | None
    connect_timeout_s: float
    read_timeout_s: float
    limits: Limits
    max_response_bytes: int = 64 << 20
    fallback: str | None = None        # upstream that takes calls this one cannot
    fallback_model: str | None = None  # the model to ask the fallback for
    # Paths (globs such as "/v1/files*") forwarded without metering: an explicit choice, since
    # whatever goes this way spends the upstream's key past every limit and the ledger.
    passthrough: tuple[str, ...] = ()
    # Ollama's pull, push, create, copy and delete: refused unless this is set or the caller
    # presents the admin token.
    allow_management: bool = False
    # Request headers forwarded beyond the protocols' own (lower-case names).
    forward_headers: frozenset[str] = frozenset()

    def serves(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def upstream_model(self, model: str) -> str:
        """The name the upstream wants for the model the client named."""
        return self.aliases.get(model, model)

    def api_key(self) -> str | None:
        if not self.api_key_env:
            return None
        return os.environ.get(self.api_key_env) or None

    @property
    def listed_models(self) -> tuple[str, ...]:
        """Model names given literally (not as globs), for GET /v1/models."""
        return tuple(m for m in self.models if not any(c in m for c in "*?["))


@dataclass(frozen=True)
class LimitPolicy:
    """How limits are applied, and the scopes beyond upstreams."""

    on_limit: OnLimit = "reject"
    max_wait_s: float = 30.0
    count_output_tokens: bool = True
    output_cap: OutputCap = "clamp"
    # Beyond this wait, a 429 says x-should-retry: false (the openai SDK honours up to 120 s).
    no_retry_over_s: float = 120.0
    concurrency_retry_s: float = 1.0
    # An upstream's own Retry-After holds calls back at most this long (a broken or hostile
    # upstream must not park the proxy for a year).
    max_upstream_retry_after_s: float = 3600.0
    models: Mapping[str, Limits] = field(default_factory=dict)
    users: Mapping[str, Limits] = field(default_factory=dict)
    per_user: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class Webhook:
    name: str
    url_env: str
    format: WebhookFormat
    timeout_s: float

    def url(self) -> str | None:
        return os.environ.get(self.url_env) or None


@dataclass(frozen=True)
class AlertRule:
    name: str
    metric: AlertMetric
    above: float
    window_min: float          # error_rate_pct: over how many minutes
    upstream: str              # daily_requests_pct / tpm_pct: whose limits
    webhooks: tuple[str, ...]


@dataclass(frozen=True)
class AlertPolicy:
    rules: tuple[AlertRule, ...] = ()
    webhooks: Mapping[str, Webhook] = field(default_factory=dict)
    check_interval_s: float = 15.0


@dataclass(frozen=True)
class Commands:
    """Chat messages the proxy answers itself, with the /stats text."""

    stats: tuple[str, ...] = ("/raymundo stats", "/raymundo estadisticas", "/raymundo estado")
    lang: str = "es"


@dataclass(frozen=True)
class Price:
    """USD per 1,000 tokens."""

    input: float
    output: float
    cached_input: float

    def cost(self, prompt: int, completion: int, cached: int) -> float:
        cached = min(cached, prompt)
        return ((prompt - cached) * self.input + cached * self.cached_input
                + completion * self.output) / 1000.0


FREE = Price(0.0, 0.0, 0.0)


@dataclass(frozen=True)
class RequestType:
    name: str
    label: str
    label_en: str


@dataclass(frozen=True)
class TagRule:
    type: str
    on: RuleScope
    pattern: re.Pattern[str]


@dataclass(frozen=True)
class ProxyKey:
    """A key the bot presents to Tollgate (never the upstream's), read from the environment."""

    name: str
    key_env: str
    user: str | None
    limits: Limits

    def secret(self) -> str | None:
        return os.environ.get(self.key_env) or None


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    admin_token_env: str | None
    max_body_bytes: int
    body_timeout_s: float
    data_dir: Path
    snapshot_interval_s: float
    drain_timeout_s: float
    # The ledger: how long a write waits on a lock held by another process before it counts as
    # failed and is retried; how many unwritten rows may wait in memory; what happens past that.
    ledger_busy_timeout_s: float = 5.0
    ledger_max_backlog: int = 100_000
    on_ledger_full: OnLedgerFull = "refuse"
    session_ttl_h: float = 12.0   # a dashboard login lasts this long
    # Connections: at most this many open (more wait in the kernel's backlog); an idle one, or
    # one whose request headers have not all arrived, is closed after idle_timeout_s.
    max_connections: int = 1024
    idle_timeout_s: float = 15.0
    # Host names this proxy answers for (421 otherwise: DNS rebinding), "*" for any; and the
    # browser origins whose pages may call the LLM endpoints (CORS).
    allowed_hosts: frozenset[str] = frozenset()
    cors_origins: frozenset[str] = frozenset()

    def admin_token(self) -> str | None:
        if not self.admin_token_env:
            return None
        return os.environ.get(self.admin_token_env) or None


@dataclass(frozen=True)
class Stats:
    title: str
    plan: str
    tier: str
    timezone: str
    active_window_s: float
    limits_upstream: str | None
    limits_label: str | None
    # The model the bot uses: the seed's rate_limits strings describe the tightest window of a
    # call to it (its model scope, else its upstream's), not always the upstream's.
    limits_model: str | None
    # How many characters of a call's text the estimator may read; bounds CPU per call.
    estimate_max_chars: int

    @cached_property
    def tz(self) -> ZoneInfo:
        """The one zone of "today" and of every bucket: /stats, calendar-day limits that name
        none of their own, history, since/until, the text."""
        return local_zone() if self.timezone == "local" else ZoneInfo(self.timezone)


@dataclass(frozen=True)
class Routing:
    default_upstream: str | None
    ollama_upstream: str | None
    default_type: str


@dataclass(frozen=True)
class Config:
    source: Path
    server: Server
    stats: Stats
    routing: Routing
    upstreams: Mapping[str, Upstream]
    prices: tuple[tuple[str, Price], ...]
    types: Mapping[str, RequestType]
    rules: tuple[TagRule, ...] = field(default=())
    limits: LimitPolicy = field(default_factory=LimitPolicy)
    keys: Mapping[str, ProxyKey] = field(default_factory=dict)
    alerts: AlertPolicy = field(default_factory=AlertPolicy)
    commands: Commands = field(default_factory=Commands)

    def upstream_for(self, model: str | None) -> Upstream | None:
        """The upstream that serves `model`: first match in file order, else the default."""
        if model:
            for upstream in self.upstreams.values():
                if upstream.serves(model):
                    return upstream
        if self.routing.default_upstream:
            return self.upstreams[self.routing.default_upstream]
        return None

    def ollama_upstream(self, model: str | None) -> Upstream | None:
        """Where an /api/ call goes: the Ollama upstream serving the model, else the default one."""
        if model:
            for upstream in self.upstreams.values():
                if upstream.kind == "ollama" and upstream.serves(model):
                    return upstream
        if self.routing.ollama_upstream:
            return self.upstreams[self.routing.ollama_upstream]
        return None

    def price(self, upstream: Upstream, model: str) -> Price:
        if upstream.free:
            return FREE
        for pattern, price in self.prices:
            if fnmatch.fnmatchcase(model, pattern):
                return price
        return FREE

    @property
    def db_path(self) -> Path:
        return self.server.data_dir / "ledger.sqlite3"

    @property
    def snapshot_path(self) -> Path:
        return self.server.data_dir / "metrics.json"


# --- reading -----------------------------------------------------------------------------


class _Table:
    """One TOML table being read: remembers its dotted path and which keys were used."""

    def __init__(self, source: Path, path: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: {path or '<top>'} = {_show(data)}: expected a table")
        self.source, self.path, self.data = source, path, data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.key(name)} = {_show(value)}: expected {expected}")

    def get(self, name: str, kind: type[T], default: T, expected: str) -> T:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        # bool is an int in Python; a limit of `true` is a mistake, not 1.
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise self.fail(name, value, expected)
        return cast(T, value)

    def opt(self, name: str, kind: type[T], expected: str) -> T | None:
        self.used.add(name)
        if name not in self.data:
            return None
        return self.get(name, kind, cast(T, None), expected)

    def positive(self, name: str, default: float, integer: bool = False) -> Any:
        kind: type = int if integer else float
        expected = "a positive whole number" if integer else "a positive number"
        value = self.get(name, kind, default, expected)
        if value <= 0:
            raise self.fail(name, value, expected)
        return value

    def limit(self, name: str) -> int | None:
        value = self.opt(name, int, "a positive whole number (omit the key for no limit)")
        if value is not None and value <= 0:
            raise self.fail(name, value, "a positive whole number (omit the key for no limit)")
        return value

    def sub(self, name: str) -> _Table:
        self.used.add(name)
        return _Table(self.source, self.key(name), self.data.get(name, {}))

    def done(self) -> None:
        for name in self.data:
            if name not in self.used:
                raise self.fail(name, self.data[name], "no such key (see the README's config reference)")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bracketed(host: str) -> str:
    """A bind address as a Host header names it: IPv6 in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host.lower()


def local_zone() -> ZoneInfo:
    """The machine's zone, with its DST rules: $TZ if it names one, else /etc/localtime, else UTC."""
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    try:
        with open("/etc/localtime", "rb") as fh:
            return ZoneInfo.from_file(fh, key="localtime")
    except (OSError, ValueError):
        return ZoneInfo("UTC")


def _check_tz(table: _Table, name: str, value: str) -> str:
    if value == "local":
        return value
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise table.fail(name, value, "an IANA time zone such as 'America/Mexico_City', or 'local'")
    return value


def _limits(table: _Table) -> Limits:
    day = table.get("day", str, "rolling", "'rolling' or 'calendar'")
    if day not in ("rolling", "calendar"):
        raise table.fail("day", day, "'rolling' or 'calendar'")
    named = table.opt("timezone", str, "a time zone name")
    tz = _check_tz(table, "timezone", named) if named is not None else None
    limits = Limits(
        rpm=table.limit("rpm"), rpd=table.limit("rpd"), tpm=table.limit("tpm"),
        concurrency=table.limit("concurrency"),
        max_input_tokens=table.limit("max_input_tokens"),
        max_output_tokens=table.limit("max_output_tokens"),
        day=cast(DayMode, day), timezone=tz,
    )
    table.done()
    return limits


def _upstream(name: str, table: _Table) -> Upstream:
    kind = table.get("kind", str, "", "'openai' or 'ollama'")
    if kind not in ("openai", "ollama"):
        raise table.fail("kind", kind or None, "'openai' or 'ollama'")
    base_url = table.get("base_url", str, "", "an http:// or https:// URL")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise table.fail("base_url", base_url or None, "an http:// or https:// URL with a host")
    models = table.get("models", list, [], "a list of model names or glob patterns")
    if not all(isinstance(m, str) and m for m in models):
        raise table.fail("models", models, "a list of model names or glob patterns")
    aliases_t = table.sub("aliases")
    aliases: dict[str, str] = {}
    for alias in list(aliases_t.data):
        aliases[alias] = aliases_t.get(alias, str, "", "the model name the upstream expects")
    api_key_env = table.opt("api_key_env", str, "the name of an environment variable")
    if api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
        raise table.fail("api_key_env", api_key_env, "the name of an environment variable")
    upstream = Upstream(
        name=name,
        kind=cast(Kind, kind),
        base_url=base_url.rstrip("/"),
        label=table.get("label", str, name, "a display name"),
        short_name=table.get("short_name", str, name, "a short identifier"),
        models=tuple(models),
        aliases=aliases,
        free=table.get("free", bool, kind == "ollama", "true or false"),
        api_key_env=api_key_env,
        connect_timeout_s=table.positive("connect_timeout_s", 10.0),
        read_timeout_s=table.positive("read_timeout_s", 300.0),
        max_response_bytes=table.positive("max_response_bytes", 64 << 20, integer=True),
        limits=_limits(table.sub("limits")),
        fallback=table.opt("fallback", str, "the name of another upstream"),
        fallback_model=table.opt("fallback_model", str, "a model name"),
        passthrough=_passthrough(table, cast(Kind, kind)),
        allow_management=table.get("allow_management", bool, False, "true or false"),
        forward_headers=_forward_headers(table),
    )
    table.done()
    return upstream


# A local Ollama's read-only endpoints: no key, no tokens spent.
OLLAMA_PASSTHROUGH = ("/api/tags", "/api/show", "/api/ps", "/api/version")


def _forward_headers(table: _Table) -> frozenset[str]:
    expected = 'a list of HTTP header names such as "X-Request-Id"'
    names = table.get("forward_headers", list, [], expected)
    if not all(isinstance(n, str) and re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", n) for n in names):
        raise table.fail("forward_headers", names, expected)
    lowered = frozenset(n.lower() for n in names)
    if lowered & {"authorization", "cookie", "host", "api-key", "x-api-key"}:
        raise table.fail("forward_headers", names,
                         "names other than credentials and Host (the upstream key is Tollgate's to send)")
    return lowered


def _passthrough(table: _Table, kind: Kind) -> tuple[str, ...]:
    default = list(OLLAMA_PASSTHROUGH) if kind == "ollama" else []
    expected = 'a list of path patterns such as "/v1/files*" or "/api/tags"'
    patterns = table.get("passthrough", list, default, expected)
    if not all(isinstance(p, str) and p.startswith(("/v1/", "/api/")) for p in patterns):
        raise table.fail("passthrough", patterns, expected)
    return tuple(p.lower().rstrip("/") for p in patterns)


def _price(table: _Table) -> Price:
    expected = "USD per 1,000 tokens, zero or more"
    input_ = table.get("input", float, 0.0, expected)
    price = Price(input=input_, output=table.get("output", float, 0.0, expected),
                  cached_input=table.get("cached_input", float, input_, expected))
    for name, value in (("input", price.input), ("output", price.output),
                        ("cached_input", price.cached_input)):
        if value < 0:
            raise table.fail(name, value, expected)
    table.done()
    return price


def _env_name(table: _Table, name: str) -> str:
    value = table.get(name, str, "", "the name of an environment variable")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise table.fail(name, value or None, "the name of an environment variable")
    return value


def _alerts(table: _Table, upstreams: Mapping[str, Upstream], limits_upstream: str | None) -> AlertPolicy:
    hooks_t = table.sub("webhooks")
    webhooks: dict[str, Webhook] = {}
    for name in list(hooks_t.data):
        hook_t = hooks_t.sub(name)
        fmt = hook_t.get("format", str, "json", "'slack', 'discord' or 'json'")
        if fmt not in ("slack", "discord", "json"):
            raise hook_t.fail("format", fmt, "'slack', 'discord' or 'json'")
        webhooks[name] = Webhook(name, _env_name(hook_t, "url_env"), cast(WebhookFormat, fmt),
                                 hook_t.positive("timeout_s", 5.0))
        hook_t.done()
    default_upstream = limits_upstream or next(iter(upstreams))
    rules = []
    for i, raw in enumerate(table.get("rules", list, [], "a list of alert rules")):
        rule_t = _Table(table.source, f"{table.key('rules')}[{i}]", raw)
        metric = rule_t.get("metric", str, "", "one of " + ", ".join(ALERT_METRICS))
        if metric not in ALERT_METRICS:
            raise rule_t.fail("metric", metric or None, "one of " + ", ".join(ALERT_METRICS))
        hooks = rule_t.get("webhooks", list, [], "a list of webhook names")
        if not all(h in webhooks for h in hooks):
            raise rule_t.fail("webhooks", hooks, f"names from [alerts.webhooks]: {sorted(webhooks)}")
        upstream = rule_t.get("upstream", str, default_upstream, "the name of an upstream")
        if upstream not in upstreams:
            raise rule_t.fail("upstream", upstream, f"one of {sorted(upstreams)}")
        above = rule_t.get("above", float, -1.0, "the threshold, a number")
        if "above" not in raw:
            raise rule_t.fail("above", None, "the threshold, a number")
        rules.append(AlertRule(
            name=rule_t.get("name", str, metric, "a name"), metric=cast(AlertMetric, metric), above=above,
            window_min=rule_t.positive("window_min", 5.0), upstream=upstream, webhooks=tuple(hooks)))
        rule_t.done()
    policy = AlertPolicy(tuple(rules), webhooks, table.positive("check_interval_s", 15.0))
    table.done()
    return policy


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


def parse(raw: dict[str, Any], source: Path = Path("<config>")) -> Config:
    top = _Table(source, "", raw)

    s = top.sub("server")
    data_dir = Path(s.get("data_dir", str, "data", "a directory path"))
    if not data_dir.is_absolute():
        data_dir = (source.parent / data_dir).resolve()
    server = Server(
        host=s.get("host", str, "127.0.0.1", "an address to bind"),
        port=s.get("port", int, 5000, "a port number"),
        admin_token_env=s.opt("admin_token_env", str, "the name of an environment variable"),
        max_body_bytes=s.positive("max_body_bytes", 10 * 1024 * 1024, integer=True),
        body_timeout_s=s.positive("body_timeout_s", 30.0),
        data_dir=data_dir,
        snapshot_interval_s=s.positive("snapshot_interval_s", 5.0),
        drain_timeout_s=s.positive("drain_timeout_s", 10.0),
        ledger_busy_timeout_s=s.positive("ledger_busy_timeout_s", 5.0),
        ledger_max_backlog=s.positive("ledger_max_backlog", 100_000, integer=True),
        on_ledger_full=cast(OnLedgerFull, s.get("on_ledger_full", str, "refuse", "'refuse' or 'serve'")),
        session_ttl_h=s.positive("session_ttl_h", 12.0),
        max_connections=s.positive("max_connections", 1024, integer=True),
        idle_timeout_s=s.positive("idle_timeout_s", 15.0),
    )
    expected_hosts = 'a list of host names such as "bot.example.org", or ["*"]'
    expected_origins = 'a list of origins such as "https://app.example.org" (no path)'
    hosts = s.get("allowed_hosts", list, [], expected_hosts)
    origins = s.get("cors_origins", list, [], expected_origins)
    if not all(isinstance(h, str) and h and "/" not in h for h in hosts):
        raise s.fail("allowed_hosts", hosts, expected_hosts)
    if not all(isinstance(o, str) and o.startswith(("http://", "https://")) and o.count("/") == 2 for o in origins):
        raise s.fail("cors_origins", origins, expected_origins)
    default_hosts = {"localhost", "127.0.0.1", "[::1]", _bracketed(server.host)}
    server = replace(server, allowed_hosts=frozenset({h.lower() for h in hosts} | default_hosts),
                     cors_origins=frozenset(o.lower().rstrip("/") for o in origins))
    if server.on_ledger_full not in ("refuse", "serve"):
        raise s.fail("on_ledger_full", server.on_ledger_full, "'refuse' or 'serve'")
    if not 0 <= server.port <= 65535:
        raise s.fail("port", server.port, "a port number from 0 to 65535")
    s.done()

    ups_t = top.sub("upstreams")
    if not ups_t.data:
        raise ups_t.fail("", None, "at least one [upstreams.<name>] table")
    upstreams = {name: _upstream(name, ups_t.sub(name)) for name in list(ups_t.data)}

    t_t = top.sub("types")
    types: dict[str, RequestType] = {}
    for name in list(t_t.data):
        one = t_t.sub(name)
        label = one.get("label", str, name, "a display name")
        types[name] = RequestType(name, label, one.get("label_en", str, label, "a display name"))
        one.done()
    for required in ("chat", "vision"):
        types.setdefault(required, RequestType(required, required.capitalize(), required.capitalize()))

    r = top.sub("routing")
    routing = Routing(
        default_upstream=r.opt("default_upstream", str, "the name of an upstream"),
        ollama_upstream=r.opt("ollama_upstream", str, "the name of an ollama upstream"),
        default_type=r.get("default_type", str, "chat", "the name of a request type"),
    )
    if routing.default_upstream is not None and routing.default_upstream not in upstreams:
        raise r.fail("default_upstream", routing.default_upstream,
                     f"one of the configured upstreams {sorted(upstreams)}")
    ollamas = [u.name for u in upstreams.values() if u.kind == "ollama"]
    if routing.ollama_upstream is None and ollamas:
        routing = Routing(routing.default_upstream, ollamas[0], routing.default_type)
    elif routing.ollama_upstream is not None and routing.ollama_upstream not in ollamas:
        raise r.fail("ollama_upstream", routing.ollama_upstream, f"one of the ollama upstreams {ollamas}")
    if routing.default_type not in types:
        raise r.fail("default_type", routing.default_type, f"one of the request types {sorted(types)}")
    r.done()

    st = top.sub("stats")
    stats = Stats(
        title=st.get("title", str, "TOLLGATE", "a title"),
        plan=st.get("plan", str, "", "a plan description"),
        tier=st.get("tier", str, "🆓 Gratuito", "a tier description"),
        timezone=_check_tz(st, "timezone", st.get("timezone", str, "local", "a time zone name")),
        active_window_s=60.0 * st.positive("active_window_min", 30.0),
        limits_upstream=st.opt("limits_upstream", str, "the name of an upstream"),
        limits_label=st.opt("limits_label", str, "a display name for the limits' plan"),
        limits_model=st.opt("limits_model", str, "the model name the bot uses"),
        estimate_max_chars=st.positive("estimate_max_chars", 200_000, integer=True),
    )
    if stats.limits_upstream is not None and stats.limits_upstream not in upstreams:
        raise st.fail("limits_upstream", stats.limits_upstream, f"one of {sorted(upstreams)}")
    st.done()

    p_t = top.sub("prices")
    prices = tuple((pattern, _price(p_t.sub(pattern))) for pattern in list(p_t.data))

    for upstream in upstreams.values():
        if upstream.fallback is not None and (upstream.fallback not in upstreams or upstream.fallback == upstream.name):
            raise ups_t.sub(upstream.name).fail("fallback", upstream.fallback,
                                                f"another configured upstream, one of {sorted(upstreams)}")

    lim_t = top.sub("limits")
    on_limit = lim_t.get("on_limit", str, "reject", "'reject' or 'wait'")
    if on_limit not in ("reject", "wait"):
        raise lim_t.fail("on_limit", on_limit, "'reject' or 'wait'")
    output_cap = lim_t.get("output_cap", str, "clamp", "'clamp' or 'reject'")
    if output_cap not in ("clamp", "reject"):
        raise lim_t.fail("output_cap", output_cap, "'clamp' or 'reject'")
    models_t, users_t = lim_t.sub("models"), lim_t.sub("users")
    policy = LimitPolicy(
        on_limit=cast(OnLimit, on_limit),
        max_wait_s=lim_t.positive("max_wait_s", 30.0),
        count_output_tokens=lim_t.get("count_output_tokens", bool, True, "true or false"),
        output_cap=cast(OutputCap, output_cap),
        no_retry_over_s=lim_t.positive("no_retry_over_s", 120.0),
        concurrency_retry_s=lim_t.positive("concurrency_retry_s", 1.0),
        max_upstream_retry_after_s=lim_t.positive("max_upstream_retry_after_s", 3600.0),
        models={pattern: _limits(models_t.sub(pattern)) for pattern in list(models_t.data)},
        users={user: _limits(users_t.sub(user)) for user in list(users_t.data)},
        per_user=_limits(lim_t.sub("per_user")),
    )
    lim_t.done()

    keys_t = top.sub("keys")
    keys: dict[str, ProxyKey] = {}
    for name in list(keys_t.data):
        key_t = keys_t.sub(name)
        key_env = key_t.get("key_env", str, "", "the name of an environment variable holding the key")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env):
            raise key_t.fail("key_env", key_env or None, "the name of an environment variable holding the key")
        keys[name] = ProxyKey(name, key_env, key_t.opt("user", str, "a user name"), _limits(key_t.sub("limits")))
        key_t.done()

    alerts = _alerts(top.sub("alerts"), upstreams, stats.limits_upstream)
    cmd_t = top.sub("commands")
    phrases = cmd_t.get("stats", list, list(Commands.stats), "a list of chat messages")
    if not all(isinstance(p, str) and p.strip() for p in phrases):
        raise cmd_t.fail("stats", phrases, "a list of chat messages")
    lang = cmd_t.get("lang", str, "es", "'es' or 'en'")
    if lang not in ("es", "en"):
        raise cmd_t.fail("lang", lang, "'es' or 'en'")
    commands = Commands(tuple(p.strip().lower() for p in phrases), lang)
    cmd_t.done()

    tag_t = top.sub("tagging")
    raw_rules = tag_t.get("rules", list, [], "a list of {type, on, pattern} tables")
    rules = []
    for i, raw_rule in enumerate(raw_rules):
        rule_t = _Table(source, f"tagging.rules[{i}]", raw_rule)
        rtype = rule_t.get("type", str, "", "the name of a request type")
        if rtype not in types:
            raise rule_t.fail("type", rtype, f"one of the request types {sorted(types)}")
        on = rule_t.get("on", str, "any", "'system', 'last_user' or 'any'")
        if on not in ("system", "last_user", "any"):
            raise rule_t.fail("on", on, "'system', 'last_user' or 'any'")
        pattern = rule_t.get("pattern", str, "", "a regular expression")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise rule_t.fail("pattern", pattern, f"a valid regular expression ({exc})")
        rules.append(TagRule(rtype, cast(RuleScope, on), compiled))
        rule_t.done()
    tag_t.done()
    top.done()

    return Config(source=source, server=server, stats=stats, routing=routing,
                  upstreams=upstreams, prices=prices, types=types, rules=tuple(rules), limits=policy,
                  keys=keys, alerts=alerts, commands=commands)


def missing_secrets(config: Config) -> list[str]:
    """Environment variables the config names whose value is unset, each said as a person reads it."""
    found = []
    env = config.server.admin_token_env
    if env and config.server.admin_token() is None:
        found.append(f"server.admin_token_env names ${env}, which is unset: the admin endpoints (/stats, "
                     f"/metrics, /dashboard, /metrics/reset) are open to every program on this machine")
    for upstream in config.upstreams.values():
        if upstream.api_key_env and upstream.api_key() is None:
            found.append(f"upstreams.{upstream.name}.api_key_env names ${upstream.api_key_env}, which is unset: "
                         f"calls to it go without a key and will be refused")
    for hook in config.alerts.webhooks.values():
        if hook.url() is None:
            found.append(f"alerts.webhooks.{hook.name}.url_env names ${hook.url_env}, which is unset: "
                         f"its alerts cannot be delivered")
    return found


def with_bind(config: Config, host: str, port: int) -> Config:
    """`config` serving on `host`:`port` (command-line overrides), answering for that host too."""
    server = replace(config.server, host=host, port=port,
                     allowed_hosts=config.server.allowed_hosts | {_bracketed(host)})
    return replace(config, server=server)


def check_serve(config: Config) -> None:
    """What must hold before serving: a safe bind address, and every proxy key's secret set."""
    check_bind(config)
    for key in config.keys.values():
        if key.secret() is None:
            raise ConfigError(f"{config.source}: keys.{key.name}.key_env = {key.key_env!r}: "
                              f"expected that environment variable to hold the key, but it is unset")


def check_bind(config: Config) -> None:
    """Refuse to listen beyond loopback when nobody set an admin token."""
    if not _is_loopback(config.server.host) and config.server.admin_token() is None:
        env = config.server.admin_token_env or "<unset>"
        raise ConfigError(
            f"{config.source}: server.host = {config.server.host!r}: a non-loopback address needs "
            f"an admin token (set server.admin_token_env and the variable it names, now {env})"
        )
