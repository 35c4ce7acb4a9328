"""The config's schema, declared once: a tree of frozen msgspec Structs that reject unknown
fields. Each key is declared once, with its type, its constraint, its meaning (the README's
reference is generated from it, `tools/config_reference.py`) and, through the value types below,
what an error says it expected.

Secrets never enter these objects: the config names the environment variable that holds a
key, and the key is read from the environment at the moment it is sent upstream. So no repr,
log line or traceback of a config object can carry one.
"""

from __future__ import annotations

import fnmatch
import os
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from msgspec import Meta, field

Kind = Literal["openai", "ollama"]
DayMode = Literal["rolling", "calendar"]
RuleScope = Literal["system", "last_user", "any"]
OnLimit = Literal["reject", "wait"]
AlertMetric = Literal["cost_usd", "error_rate_pct", "daily_requests_pct", "tpm_pct", "total_tokens",
                      "ledger_unwritten_rows"]
WebhookFormat = Literal["slack", "discord", "json"]
OnLedgerFull = Literal["refuse", "serve"]
OutputCap = Literal["clamp", "reject"]
LimitsBackend = Literal["memory", "redis"]
RedisUnavailable = Literal["closed", "local"]
LedgerBackend = Literal["sqlite", "postgresql"]
CacheBackend = Literal["memory", "sqlite", "redis"]
BudgetPeriod = Literal["day", "month"]
OnBudget = Literal["reject", "fallback"]
SmtpSecurity = Literal["starttls", "tls", "none"]
Lang = Literal["es", "en"]


class ConfigError(Exception):
    """A config problem, worded as one line: file, key, value, what was expected."""


# --- what a value may be: its type, its constraint and the words an error uses -------------


def expects(words: str) -> Meta:
    return Meta(extra={"expected": words})


def doc(meaning: str, default: str | None = None) -> Meta:
    """A key's meaning, and its default where words say it better than the value."""
    return Meta(description=meaning, extra={"default": default} if default else None)


# The key comes from the table's own name ([upstreams.<name>]); the file may not set it.
FROM_TABLE_NAME = Meta(extra={"derived": True})

Positive = Annotated[float, Meta(gt=0), expects("a positive number")]
Fraction = Annotated[float, Meta(gt=0, le=1), expects("a fraction above 0, at most 1 (0.8 for 80%)")]
Count = Annotated[int, Meta(gt=0), expects("a positive whole number")]
Limit = Annotated[int, Meta(gt=0), expects("a positive whole number (omit the key for no limit)")]
Usd = Annotated[float, Meta(ge=0), expects("USD per 1,000 tokens, zero or more")]
EnvName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"), expects("the name of an environment variable")]
Port = Annotated[int, Meta(ge=0, le=65535), expects("a port number from 0 to 65535")]
ZoneName = Annotated[str, expects("an IANA time zone such as 'America/Mexico_City', or 'local'")]
UpstreamName = Annotated[str, expects("the name of an upstream")]
NonEmpty = Annotated[str, Meta(min_length=1)]
Header = Annotated[str, Meta(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")]
PathGlob = Annotated[str, Meta(pattern=r"^/(v1|api)/")]
HostName = Annotated[str, Meta(min_length=1, pattern=r"^[^/]+$")]
Origin = Annotated[str, Meta(pattern=r"(?i)^https?://[^/]+/?$")]
Phrase = Annotated[str, Meta(pattern=r"\S")]


class Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, dict=True):
    """A config table: unknown keys are errors (a misspelt limit ignored is a limit not enforced)."""


class Limits(Table, frozen=True, kw_only=True):
    """Limits of one scope: an upstream, the models matching a glob, one named user, or every user
    separately (`per_user`, which a named user's own table replaces). All keys optional; an absent
    key is no limit. A call must fit every scope it is in; `/stats` shows each scope's usage
    (`detail.limits`)."""

    rpm: Annotated[Limit | None, doc("requests per minute", "no limit")] = None
    rpd: Annotated[Limit | None, doc("requests per day", "no limit")] = None
    tpm: Annotated[Limit | None, doc("tokens per minute", "no limit")] = None
    concurrency: Annotated[Limit | None, doc("calls in flight at once", "no limit")] = None
    max_input_tokens: Annotated[Limit | None, doc("largest prompt of one call", "no limit")] = None
    max_output_tokens: Annotated[Limit | None, doc("largest requested output of one call", "no limit")] = None
    day: Annotated[DayMode, doc('`"rolling"` (the last 24 h) or `"calendar"` (since midnight in `timezone`)')] \
        = "rolling"
    timezone: Annotated[ZoneName | None, doc("zone of a calendar day", "the stats zone (`stats.timezone`)")] = None

    @cached_property
    def any(self) -> bool:
        return any(
            v is not None
            for v in (self.rpm, self.rpd, self.tpm, self.concurrency,
                      self.max_input_tokens, self.max_output_tokens)
        )


# A local Ollama's read-only endpoints: no key, no tokens spent.
OLLAMA_PASSTHROUGH = ("/api/tags", "/api/show", "/api/ps", "/api/version")


class Upstream(Table, frozen=True, kw_only=True):
    """Upstreams are tried in file order; the first whose `models` match the body's `model` serves
    it (`proxy/routing.py`)."""

    name: Annotated[str, FROM_TABLE_NAME] = ""
    kind: Annotated[Kind, doc('`"openai"` (receives `base_url + /<path>`) or `"ollama"` (receives '
                              '`base_url + /v1/<path>` and `/api/<path>`)')]
    base_url: Annotated[str, expects("an http:// or https:// URL with a host"),
                        doc("e.g. `https://models.github.ai/inference`, `https://api.openai.com/v1`, "
                            "`http://127.0.0.1:11434`")]
    api_key_env: Annotated[EnvName | None, doc(
        "environment variable with the upstream key, sent as `Authorization: Bearer`; the client's own "
        "`Authorization` is never forwarded", "unset")] = None
    label: Annotated[str, doc("display name in the text (`GPT-4o (cloud)`)", "the name")] = ""
    short_name: Annotated[str, doc("key suffix in `metrics.json` (`total_tokens_<short_name>`)", "the name")] = ""
    models: Annotated[tuple[NonEmpty, ...], expects("a list of model names or glob patterns"),
                      doc('model names or glob patterns this upstream serves (`"gpt-4o*"`, `"*"`)')] = ()
    aliases: Annotated[dict[str, str], expects("a table of model names"),
                       doc('table renaming models on the way: `"gpt-4o" = "openai/gpt-4o"`; stats keep the '
                           "client's name")] = {}
    free: Annotated[bool, doc("a free upstream costs nothing whatever the prices say", "`true` for ollama")] = False
    connect_timeout_s: Annotated[Positive, doc("connect timeout; failing gives 502")] = 10.0
    read_timeout_s: Annotated[Positive, doc("longest wait for headers or between two chunks; failing gives 504")] \
        = 300.0
    max_response_bytes: Annotated[Count, doc(
        "a reply larger than this is cut off (502, or an error event once streaming)")] = 64 << 20
    limits: Annotated[Limits, doc("this upstream's limits (a limits table, below)", "none")] = field(
        default_factory=Limits)
    fallback: Annotated[UpstreamName | None, doc(
        "another upstream that takes the call when this one is out of quota here, answers 429 or 5xx, or "
        "cannot be reached (an Ollama upstream serves OpenAI-dialect calls on its `/v1` endpoint); when it "
        "fails too, the error names both", "unset")] = None
    fallback_model: Annotated[str | None, doc('the model to ask the fallback for (`"llama3.2"`)',
                                              "the client's model")] = None
    # Paths forwarded without metering: an explicit choice, since whatever goes this way spends
    # the upstream's key past every limit and the ledger.
    passthrough: Annotated[tuple[PathGlob, ...], expects('a list of path patterns such as "/v1/files*" or "/api/tags"'),
                           doc("paths (globs on the lower-cased path, e.g. `\"/v1/files*\"`) forwarded to this "
                               "upstream **without metering**, with its key. Anything Tollgate does not meter "
                               "and no upstream lists is refused with 403, so nothing reaches an upstream "
                               "around the ledger and the limits by default",
                               "`[]`; an `ollama` upstream: `" + str(list(OLLAMA_PASSTHROUGH)).replace("'", '"')
                               + "`")] = ()
    forward_headers: Annotated[frozenset[Header], expects('a list of HTTP header names such as "X-Request-Id"'),
                               doc("request headers forwarded to this upstream beyond the protocols' own. Headers "
                                   "go up from an allow-list: `Content-Type`, `Accept`, `User-Agent`, "
                                   "`OpenAI-Beta`, `OpenAI-Organization`, `OpenAI-Project`, `Idempotency-Key` "
                                   "and the SDKs' `X-Stainless-*`, plus these; never a credential (the "
                                   "upstream's key is Tollgate's to send), never one the client named in "
                                   "`Connection`", "`[]`")] = frozenset()
    allow_management: Annotated[bool, doc(
        "forward Ollama's `pull`, `push`, `create`, `copy`, `delete` and `blobs` without the admin token")] = False

    def api_key(self) -> str | None:
        if not self.api_key_env:
            return None
        return os.environ.get(self.api_key_env) or None


class LimitPolicy(Table, frozen=True, kw_only=True):
    """How limits are applied, and the scopes beyond upstreams."""

    backend: Annotated[LimitsBackend, doc(
        '`"memory"`: the windows live in this process (exact for one process); `"redis"`: in the Redis of '
        "`[redis]`, shared by every process and machine of a deployment, one atomic script per admission "
        "(needed for `serve --workers` above 1)")] = "memory"
    on_limit: Annotated[OnLimit, doc('`"reject"` answers 429 at once; `"wait"` holds the call, first come first '
                                     "served, when a place frees within `max_wait_s`")] = "reject"
    max_wait_s: Annotated[Positive, doc("longest a call waits in `wait` mode")] = 30.0
    count_output_tokens: Annotated[bool, doc(
        "TPM admission counts the requested output (`max_tokens`, or the scope's `max_output_tokens`) besides "
        "the estimated input")] = True
    output_cap: Annotated[OutputCap, doc('a request asking for more than `max_output_tokens`: `"clamp"` lowers it, '
                                         '`"reject"` answers 400')] = "clamp"
    no_retry_over_s: Annotated[Positive, doc(
        "a 429 whose wait is longer says `x-should-retry: false` (the openai SDK honours waits up to 120 s)")] = 120.0
    concurrency_retry_s: Annotated[Positive, doc(
        "the `Retry-After` of a refusal for concurrency, where no exact time exists")] = 1.0
    # A broken or hostile upstream must not park the proxy for a year.
    max_upstream_retry_after_s: Annotated[Positive, doc(
        "the longest an upstream's own 429 `Retry-After` (or `retry-after-ms`) holds calls back; non-numeric, "
        "negative, infinite or NaN values are ignored")] = 3600.0
    models: Annotated[dict[str, Limits], doc("limits tables per model glob (`[limits.models.\"gpt-4o\"]`)",
                                             "`{}`")] = {}
    users: Annotated[dict[str, Limits], doc("limits tables per named user (`[limits.users.\"5215512345678\"]`)",
                                            "`{}`")] = {}
    per_user: Annotated[Limits, doc("limits applied to each user separately", "none")] = field(default_factory=Limits)


class RedisPolicy(Table, frozen=True, kw_only=True):
    """The Redis that holds the limiter's windows when `limits.backend = "redis"`."""

    url_env: Annotated[EnvName, doc(
        "environment variable holding its URL (`redis://host:6379/0`, `rediss://…` for TLS, "
        "`unix:///run/redis.sock`); it may carry a password, so it never sits in this file")] = "TOLLGATE_REDIS_URL"
    prefix: Annotated[NonEmpty, doc(
        "what every key starts with (as a Redis Cluster hash tag, so all of a deployment's keys share a slot); "
        "deployments sharing one Redis need different prefixes")] = "tollgate"
    timeout_ms: Annotated[Positive, doc(
        "longest one admission waits for Redis (its reply, or a connection of the process's pool) before the "
        "`unavailable` policy applies to it; Redis is skipped for `retry_s` only when it cannot be reached. It "
        "bounds a Redis that hangs (one that is down answers at once); it includes the process's own queue, so "
        "too tight a bound refuses calls when the process is merely busy")] = 2000.0
    unavailable: Annotated[RedisUnavailable, doc(
        'when Redis cannot be reached: `"closed"` answers metered calls 503 (no limit can be broken), `"local"` '
        "lets each process hold every limit alone in its own memory (up to N times a limit across N processes) "
        "until Redis is back; either way Redis is tried again every `retry_s`, no restart needed")] = "closed"
    retry_s: Annotated[Positive, doc("how long after a failure Redis is tried again")] = 1.0
    lease_s: Annotated[Positive, doc(
        "a concurrency place's lease: renewed while its call runs, so a killed process's places free "
        "themselves at most this long after it died")] = 30.0
    refresh_s: Annotated[Positive, doc(
        "how often a process reads the shared figures that `/stats`, `/metrics` and the alerts show between "
        "its own calls (each call and each `/stats` reads them anyway)")] = 2.0
    rebuild_wait_s: Annotated[Positive, doc(
        "longest a call waits while another process loads the windows from the ledger into a fresh or "
        "flushed Redis")] = 10.0

    def url(self) -> str | None:
        return os.environ.get(self.url_env) or None


class Webhook(Table, frozen=True, kw_only=True):
    """A webhook alerts are posted to, by name."""

    name: Annotated[str, FROM_TABLE_NAME] = ""
    url_env: Annotated[EnvName, doc(
        "environment variable holding the webhook URL (Slack and Discord URLs are secrets)")]
    format: Annotated[WebhookFormat, doc('`"slack"` (`{"text"}`), `"discord"` (`{"content"}`) or `"json"` (alert, '
                                         "metric, value, threshold, time, message)")] = "json"
    timeout_s: Annotated[Positive, doc(
        "a webhook slower than this is abandoned; delivery runs apart from calls and never delays them")] = 5.0

    def url(self) -> str | None:
        return os.environ.get(self.url_env) or None


class AlertRule(Table, frozen=True, kw_only=True):
    """Each rule fires once when its figure goes above `above`, logs a warning and posts to its
    webhooks; it re-arms when the figure falls back to or below the threshold."""

    metric: Annotated[AlertMetric, doc(
        "`cost_usd` (this epoch), `error_rate_pct` (over `window_min`), `daily_requests_pct` / `tpm_pct` (of "
        "`upstream`'s limits), `total_tokens` (this epoch), `ledger_unwritten_rows` (rows the ledger could not "
        "write yet)")]
    above: Annotated[float, expects("the threshold, a number"), doc("the threshold")]
    name: Annotated[str, doc("the rule's name in the message", "the metric")] = ""
    window_min: Annotated[Positive, doc("minutes an error rate is measured over")] = 5.0
    upstream: Annotated[UpstreamName, doc(
        "whose limits the `_pct` metrics read (the limiter's windows; for `stats.limits_upstream`, the tightest "
        "window of `stats.limits_model`)", "`stats.limits_upstream`, else the first upstream")] = ""
    webhooks: Annotated[tuple[str, ...], expects("a list of webhook names"),
                        doc("names of webhooks to post to", "`[]`")] = ()
    emails: Annotated[tuple[str, ...], expects("a list of e-mail destination names"),
                      doc("names of `[alerts.email.<name>]` destinations to e-mail", "`[]`")] = ()


class Email(Table, frozen=True, kw_only=True):
    """An SMTP server and the people alerts are e-mailed to, by name. Sent apart from calls, once
    per crossing like the webhooks; the password comes from the environment, never this file."""

    name: Annotated[str, FROM_TABLE_NAME] = ""
    host: Annotated[HostName, doc("the SMTP server (`smtp.gmail.com`)")]
    port: Annotated[Port, doc("its port", "587 with `starttls`, 465 with `tls`, 25 with `none`")] = 0
    security: Annotated[SmtpSecurity, doc(
        '`"starttls"` (upgrade a plain connection, port 587), `"tls"` (TLS from the start, port 465) or '
        '`"none"` (plain text: only for a relay on this machine)')] = "starttls"
    sender: Annotated[NonEmpty, doc("the From address (`tollgate@example.com`)")]
    to: Annotated[tuple[NonEmpty, ...], Meta(min_length=1), expects("a list of e-mail addresses"),
                  doc("the recipients")]
    username_env: Annotated[EnvName | None, doc("environment variable holding the login name", "no login")] = None
    password_env: Annotated[EnvName | None, doc("environment variable holding the password", "no login")] = None
    ca_file: Annotated[Path | None, doc(
        "a PEM file of the certificate authorities to trust (a server with its own certificate)",
        "the system's")] = None
    lang: Annotated[Lang | None, doc('the language of the message: `"es"` or `"en"`', "`commands.lang`")] = None
    timeout_s: Annotated[Positive, doc("a server slower than this is abandoned (the alert counts as failed)")] = 15.0

    def username(self) -> str | None:
        return os.environ.get(self.username_env) or None if self.username_env else None

    def password(self) -> str | None:
        return os.environ.get(self.password_env) or None if self.password_env else None


class AlertPolicy(Table, frozen=True, kw_only=True):
    """Alert rules over live figures, and where they are posted."""

    rules: Annotated[tuple[AlertRule, ...], doc("alert rules (`[[alerts.rules]]`, below)", "`[]`")] = ()
    webhooks: Annotated[dict[str, Webhook], doc("webhooks by name (`[alerts.webhooks.<name>]`, below)",
                                                "`{}`")] = {}
    email: Annotated[dict[str, Email], doc("e-mail destinations by name (`[alerts.email.<name>]`, below)",
                                           "`{}`")] = {}
    check_interval_s: Annotated[Positive, doc(
        "how often rules are checked besides after every call (figures that fall with time)")] = 15.0


Similarity = Annotated[float, Meta(gt=0, le=1), expects("a cosine similarity above 0, at most 1")]


class CacheRule(Table, frozen=True, kw_only=True):
    """Which calls the answer cache may answer, and how. A call is cached by the first rule that
    matches it (every list it sets names the call's upstream, type and proxy key); no rule, no
    cache. Only chat and completion calls are cached (OpenAI's chat and completions, Ollama's chat
    and generate)."""

    upstreams: Annotated[tuple[UpstreamName, ...], expects("a list of upstream names"),
                         doc("the upstreams whose answers it keeps", "any")] = ()
    types: Annotated[tuple[str, ...], expects("a list of request types"),
                     doc("the request types it keeps (`faq`)", "any")] = ()
    keys: Annotated[tuple[str, ...], expects("a list of proxy key names"),
                    doc("the proxy keys whose calls it keeps", "any")] = ()
    ttl_s: Annotated[Positive, doc("how long an answer is kept")] = 3600.0
    sampled: Annotated[bool, doc(
        "keep answers to requests that ask for a sampled answer (temperature above 0 without a seed, the "
        "models' default), several choices or tools; off, those are passed on uncached (`bypass`)")] = False
    semantic: Annotated[bool, doc(
        "on a miss, look for an earlier question close in meaning (`[cache.semantic]`): same system prompt, "
        "earlier turns, model and parameters, and a last user message whose embedding is within "
        "`similarity`")] = False
    similarity: Annotated[Similarity, doc("the cosine similarity a semantic match needs")] = 0.95


class SemanticCache(Table, frozen=True, kw_only=True):
    """Where the semantic cache gets its embeddings, and how many questions it compares."""

    upstream: Annotated[UpstreamName | None, doc(
        "the upstream that embeds questions (an ollama one calls `/api/embed`, an openai one "
        "`/v1/embeddings`); each embedding is a metered call of type `cache`", "the ollama upstream")] = None
    model: Annotated[NonEmpty, doc("the embedding model")] = "nomic-embed-text"
    max_entries: Annotated[Count, doc(
        "most questions kept for comparison (the oldest go first); each holds one vector: at 768 dimensions "
        "3.4 KiB, so 20,000 take 66 MiB; 100,000 are searched in about 16 ms, off the event loop")] = 20_000
    timeout_s: Annotated[Positive, doc("an embedding slower than this is abandoned: the call is a miss")] = 5.0


class CachePolicy(Table, frozen=True, kw_only=True):
    """The answer cache: off unless a rule turns it on. Entries hold message text and answers,
    which the ledger never does: they stay within `max_bytes`, the least recently used leaving
    first, and `POST /cache/purge` empties them."""

    backend: Annotated[CacheBackend, doc(
        '`"memory"`: this process\'s own; `"sqlite"`: `data_dir/cache.sqlite3` (owner-only), kept across '
        'restarts and shared by the workers of one machine; `"redis"`: the `[redis]` server, shared by every '
        "replica")] = "memory"
    max_bytes: Annotated[Count, doc("most bytes the entries take, answers and keys")] = 64 * 1024 * 1024
    max_entry_bytes: Annotated[Count, doc("an answer larger than this is never kept")] = 256 * 1024
    wait_s: Annotated[Positive, doc(
        "longest an identical request waits for the one already asking the upstream, before asking "
        "itself")] = 60.0
    rules: Annotated[tuple[CacheRule, ...], doc("cache rules (`[[cache.rules]]`, below)", "`[]`")] = ()
    semantic: Annotated[SemanticCache, doc("semantic matching (`[cache.semantic]`, below)", "its defaults")] = field(
        default_factory=SemanticCache)


class Budget(Table, frozen=True, kw_only=True):
    """A ceiling on spend (at the configured prices) per day or month, for the calls it covers: an
    upstream's, a model's, a proxy key's, a user's, every user's each, or everything (set none).
    Checked before each call with the call's estimated cost, like the other limits; spend is read
    from the ledger at start, so restarts and stats resets do not forget it."""

    name: Annotated[str, FROM_TABLE_NAME] = ""
    usd: Annotated[float, Meta(gt=0), expects("a positive amount of US dollars"), doc("the ceiling, in USD")]
    period: Annotated[BudgetPeriod, doc(
        '`"day"` or `"month"`, calendar ones in `stats.timezone`')] = "month"
    upstream: Annotated[UpstreamName | None, doc("only this upstream's calls", "any")] = None
    model: Annotated[str | None, doc('only models matching this glob (`"gpt-4o*"`)', "any")] = None
    key: Annotated[str | None, doc("only this proxy key's calls", "any")] = None
    user: Annotated[str | None, doc("only this user's calls", "any")] = None
    per_user: Annotated[bool, doc("a ceiling for every user separately (calls naming no user are not held)")] = False
    alert_at: Annotated[tuple[Fraction, ...], expects("a list of fractions of the ceiling"),
                        doc("alert once a period as spend passes each fraction")] = (0.5, 0.8, 1.0)
    on_budget: Annotated[OnBudget, doc(
        'at the ceiling: `"reject"` answers 429 in the dialect\'s shape, `"fallback"` sends the call to the '
        "upstream's `fallback` (the local model, the natural choice for a bot)")] = "reject"
    webhooks: Annotated[tuple[str, ...], expects("a list of webhook names"),
                        doc("webhooks its alerts are posted to", "`[]`")] = ()
    emails: Annotated[tuple[str, ...], expects("a list of e-mail destination names"),
                      doc("e-mail destinations its alerts are sent to", "`[]`")] = ()

    def covers(self, upstream: str, model: str, key: str | None, user: str | None) -> bool:
        return ((self.upstream is None or upstream == self.upstream)
                and (self.model is None or fnmatch.fnmatchcase(model, self.model))
                and (self.key is None or key == self.key)
                and (self.user is None or user == self.user)
                and (not self.per_user or user is not None))


class Commands(Table, frozen=True, kw_only=True):
    """A chat call (OpenAI or Ollama dialect, streaming or not) whose last user message is one of
    these is answered by Tollgate itself with the `/stats` text, in the exact shape the client
    asked for; it is not forwarded and counts against no limit. Anyone who can chat with the bot
    can read the stats this way; set `stats = []` to turn it off."""

    stats: Annotated[tuple[Phrase, ...], expects("a list of chat messages"), doc(
        "the messages (compared trimmed and case-insensitively)")] = (
        "/raymundo stats", "/raymundo estadisticas", "/raymundo estado")
    lang: Annotated[Lang, doc('language of the reply: `"es"` or `"en"`')] = "es"


class Price(Table, frozen=True, kw_only=True):
    """USD per 1,000 tokens, matched against the model name the client used, first match wins."""

    input: Annotated[Usd, doc("prompt tokens")] = 0.0
    output: Annotated[Usd, doc("completion tokens")] = 0.0
    cached_input: Annotated[Usd | None, doc("prompt tokens the upstream reports as cached", "`input`")] = None

    def cost(self, prompt: int, completion: int, cached: int) -> float:
        cached = min(cached, prompt)
        cached_price = self.input if self.cached_input is None else self.cached_input
        return ((prompt - cached) * self.input + cached * cached_price + completion * self.output) / 1000.0


FREE = Price()


class RequestType(Table, frozen=True, kw_only=True):
    """The request types and their labels in the text; `chat` and `vision` always exist."""

    name: Annotated[str, FROM_TABLE_NAME] = ""
    label: Annotated[str, doc("Spanish label (`Presentaciones`)", "the name")] = ""
    label_en: Annotated[str, doc("English label, for `lang=en`", "`label`")] = ""


class TagRule(Table, frozen=True, kw_only=True):
    """A rule of `[[tagging.rules]]`: the first that matches tags the call."""

    type: Annotated[str, expects("the name of a request type"), doc("the request type it gives (one of `[types]`)")]
    pattern: Annotated[re.Pattern[str], expects("a valid regular expression"),
                       doc("a Python regular expression, searched in that text")]
    on: Annotated[RuleScope, doc('what it reads: `"system"` (the system prompt), `"last_user"` (the last user '
                                 'message) or `"any"`')] = "any"


class Tagging(Table, frozen=True, kw_only=True):
    """Request types from the text of a call, when neither the path nor a header names one."""

    rules: Annotated[tuple[TagRule, ...], doc("rules, tried in order (`[[tagging.rules]]`, below)", "`[]`")] = ()


class ProxyKey(Table, frozen=True, kw_only=True):
    """Proxy keys (virtual keys). When any is configured, every `/v1` and `/api` call must present
    one (`Authorization: Bearer <key>`, or `api-key` / `x-api-key`), else 401 in the dialect's
    shape. The bot holds only its proxy key; the upstream key is added by Tollgate from
    `api_key_env`. Keys are compared in constant time and never logged or stored; the ledger keeps
    the key's name."""

    name: Annotated[str, FROM_TABLE_NAME] = ""
    key_env: Annotated[EnvName, doc("environment variable holding the key (`tollgate serve` refuses to start if it "
                                    "is unset)")]
    user: Annotated[str | None, doc("the user of calls made with this key, when the body and headers name none",
                                    "unset")] = None
    limits: Annotated[Limits, doc("a limits table for everything this key sends", "none")] = field(
        default_factory=Limits)

    def secret(self) -> str | None:
        return os.environ.get(self.key_env) or None


class Server(Table, frozen=True, kw_only=True):
    """Where and how Tollgate listens, and where it keeps its data."""

    host: Annotated[str, doc("address to bind; anything but loopback requires an admin token")] = "127.0.0.1"
    port: Annotated[Port, doc("port to bind (the seed's scripts call `localhost:5000`); 0 lets the system pick "
                              "one, which `tollgate stats` and `reset` still find")] = 5000
    workers: Annotated[Count, doc(
        "processes serving the port (`serve --workers N` overrides it): one supervisor starts them, each bound "
        "with SO_REUSEPORT, and restarts one that dies. Above 1 needs `limits.backend = \"redis\"` (one set of "
        "limits for all of them); they share the ledger in `data_dir`, so each serves the same `/stats`, "
        "`/metrics` and stats epoch")] = 1
    stats_cache_s: Annotated[float, Meta(ge=0), expects("zero or more seconds"), doc(
        "with several processes writing the ledger, how long one reuses the ledger's sums for `/stats` and the "
        "alerts before reading them again (0: every time)")] = 1.0
    admin_token_env: Annotated[EnvName | None, doc(
        "environment variable holding the admin token; when it is set, the admin endpoints (`/stats`, "
        "`/stats/history`, `/stats/export.csv`, `/stats/snapshot.csv`, `/metrics`, `/metrics/reset`, "
        "`/dashboard`) need `Authorization: Bearer <token>` or a dashboard session, and so do Ollama's "
        "management endpoints unless `allow_management` is set", "unset")] = None
    max_body_bytes: Annotated[Count, doc("largest request body accepted; larger gets 413")] = 10 * 1024 * 1024
    body_timeout_s: Annotated[Positive, doc("longest a client may take to send its body; slower gets 408")] = 30.0
    data_dir: Annotated[Path, expects("a directory path"), doc(
        "where the ledger, `metrics.json` and `server.json` (where the running server listens) live, "
        "relative to the config file", '`"data"`')] = Path("data")
    snapshot_interval_s: Annotated[Positive, doc(
        "how often `metrics.json` is rewritten while traffic changes it")] = 5.0
    drain_timeout_s: Annotated[Positive, doc(
        "on SIGTERM/SIGINT, how long in-flight calls may finish (and a failing ledger may recover before the "
        "rows it still holds are given up, with a log line counting them)")] = 10.0
    ledger_busy_timeout_s: Annotated[Positive, doc(
        "how long a ledger write waits on a lock another process holds before it counts as failed and is "
        "retried")] = 5.0
    ledger_max_backlog: Annotated[Count, doc(
        "most rows kept in memory while the ledger cannot write (full disk, lock, I/O error); about 0.5 KB "
        "each")] = 100_000
    on_ledger_full: Annotated[OnLedgerFull, doc(
        'when that backlog is full: `"refuse"` answers metered calls 503 in the dialect\'s shape (nothing is '
        'served unmetered); `"serve"` keeps serving and counts each dropped row (`/stats` '
        "`detail.ledger.dropped_rows`, `tollgate_ledger_dropped_rows_total`)")] = "refuse"
    session_ttl_h: Annotated[Positive, doc(
        "how long a dashboard login lasts; `POST /dashboard/logout` ends it sooner. The cookie holds a random "
        "session id (HttpOnly, SameSite=Strict, Path=/, Secure over TLS), never the token")] = 12.0
    max_connections: Annotated[Count, doc(
        "most client connections open at once; more wait in the kernel's listen backlog and cost the process "
        "no file descriptor until one closes")] = 1024
    idle_timeout_s: Annotated[Positive, doc(
        "an idle keep-alive connection, or one whose request headers have not all arrived, is closed this long "
        "after it opened or after its last response (slow bodies: `body_timeout_s`)")] = 15.0
    # Host names this proxy answers for (421 otherwise: DNS rebinding), and the browser origins
    # whose pages may call the LLM endpoints (CORS).
    allowed_hosts: Annotated[frozenset[HostName], expects('a list of host names such as "bot.example.org", or ["*"]'),
                             doc("host names this proxy answers for besides the bind address, `localhost`, "
                                 "`127.0.0.1` and `[::1]` (a `Host` header naming any other gets 421, which "
                                 'closes DNS rebinding); `["*"]` for any, behind a proxy that checks it',
                                 "`[]`")] = frozenset()
    cors_origins: Annotated[frozenset[Origin], expects('a list of origins such as "https://app.example.org" (no path)'),
                            doc('browser origins (`"https://app.example.org"`) whose pages may call the LLM '
                                "endpoints; preflights from them are answered. A page from any other origin gets "
                                "403, and state-changing admin requests (reset, login, logout) never come from "
                                "another origin, another port of this host included", "`[]`")] = frozenset()

    def admin_token(self) -> str | None:
        if not self.admin_token_env:
            return None
        return os.environ.get(self.admin_token_env) or None


class LedgerPolicy(Table, frozen=True, kw_only=True):
    """Where the ledger lives, and how long it keeps each call's own row. Its hourly, daily and
    per-epoch sums are kept for good: `/stats`, history and the projection never lose a call to
    retention; only the CSV export and history's partial hours need the rows themselves."""

    backend: Annotated[LedgerBackend, doc(
        '`"sqlite"`: `data_dir/ledger.sqlite3`, for one machine (its workers share the file); `"postgresql"`: '
        "the database of `dsn_env`, shared by every process and machine, rows written with COPY, call rows "
        "partitioned by month, and a local outbox (`data_dir/ledger-outbox.sqlite3`) holding what could not be "
        "written while the database was unreachable, replayed in order once it is back")] = "sqlite"
    dsn_env: Annotated[EnvName, doc(
        "with `postgresql`: environment variable holding the connection string "
        "(`postgresql://user:password@host:5432/tollgate`), never written in this file")] = "TOLLGATE_LEDGER_DSN"
    pool_size: Annotated[Count, doc(
        "with `postgresql`: most connections one process holds (its writer and its readers); machines × "
        "workers × this must stay under the server's `max_connections`")] = 4

    keep_raw_days: Annotated[Positive | None, doc(
        "call rows older than this many days are deleted, a few hundred at a time between the "
        "writer's commits, with the hourly sums per user and per latency bucket (a history by user "
        "covers the kept days; daily and epoch sums stay); the space they held is given back to the "
        "file system (a ledger created by an older version reuses it instead). Admissions are kept "
        "two days whatever this says. With `postgresql`, whole months of call rows go at once (a partition "
        "dropped) when all their rows are older",
        "forever")] = None

    def dsn(self) -> str | None:
        return os.environ.get(self.dsn_env) or None


class Stats(Table, frozen=True, kw_only=True):
    """What `/stats` and its WhatsApp text say, and in which zone."""

    title: Annotated[str, doc("the name in the WhatsApp text's title (`ESTADÍSTICAS DE <TITLE>`)")] = "TOLLGATE"
    plan: Annotated[str, doc("the plan line of the text (falls back to `tier`)")] = ""
    tier: Annotated[str, doc("the `tier` value of `/stats`")] = "🆓 Gratuito"
    timezone: Annotated[ZoneName, doc(
        'the one zone of "today" and of every local time: the times shown (`inicio`, `ultimo_request`), '
        "calendar-day limits that name no zone, `/stats/history` buckets (local hours and days, right across "
        "DST changes), `since`/`until` without an offset, and the CSV export's `time` column. An IANA name, or "
        "`local` (the machine's zone: `$TZ`, else `/etc/localtime`)")] = "local"
    active_window_min: Annotated[Positive, doc('a user is "active" if seen within this many minutes')] = 30.0
    limits_upstream: Annotated[UpstreamName | None, doc(
        "whose limits the seed's `rate_limits` strings describe; its requests per day and tokens per minute "
        "are counted even where no limit is set (then shown as `N / ∞`)", "first upstream with limits")] = None
    limits_label: Annotated[str | None, doc('the name in "Rate Limits (...)"', "that upstream's `label`")] = None
    # The seed's rate_limits strings describe the tightest window of a call to this model (its
    # model scope, else its upstream's), not always the upstream's.
    limits_model: Annotated[str | None, doc(
        'the model the bot uses (`"gpt-4o"`): the strings then describe the tightest window of a call to it, '
        "its model's limits (`[limits.models]`) or its upstream's. Every figure is read from the limiter's own "
        "windows, the same ones that refuse calls, send the `x-ratelimit-*` headers, feed the alerts and "
        "`/metrics`", "unset")] = None
    estimate_max_chars: Annotated[Count, doc(
        "most characters of a call the estimator reads (bounds CPU per call)")] = 200_000

    @property
    def active_window_s(self) -> float:
        return 60.0 * self.active_window_min

    @cached_property
    def tz(self) -> ZoneInfo:
        """The one zone of "today" and of every bucket: /stats, calendar-day limits that name
        none of their own, history, since/until, the text."""
        return local_zone() if self.timezone == "local" else ZoneInfo(self.timezone)


class Routing(Table, frozen=True, kw_only=True):
    """Where a call goes when no upstream's `models` match it."""

    default_upstream: Annotated[UpstreamName | None, doc(
        "where a `/v1` call goes when no upstream's `models` match; unset means 404", "unset")] = None
    ollama_upstream: Annotated[UpstreamName | None, doc(
        "where `/api` calls go when no ollama upstream matches the model", "first `ollama` upstream")] = None
    default_type: Annotated[str, expects("the name of a request type"),
                            doc("request type when nothing else tags the call")] = "chat"


class Config(Table, frozen=True, kw_only=True):
    """The whole file."""

    source: Annotated[Path, FROM_TABLE_NAME] = Path("<config>")
    server: Server = field(default_factory=Server)
    ledger: LedgerPolicy = field(default_factory=LedgerPolicy)
    stats: Stats = field(default_factory=Stats)
    routing: Routing = field(default_factory=Routing)
    upstreams: Annotated[dict[str, Upstream], expects("at least one [upstreams.<name>] table")]
    prices: dict[str, Price] = {}
    types: dict[str, RequestType] = {}
    tagging: Tagging = field(default_factory=Tagging)
    limits: LimitPolicy = field(default_factory=LimitPolicy)
    redis: RedisPolicy = field(default_factory=RedisPolicy)
    keys: dict[str, ProxyKey] = {}
    alerts: AlertPolicy = field(default_factory=AlertPolicy)
    commands: Commands = field(default_factory=Commands)
    cache: CachePolicy = field(default_factory=CachePolicy)
    budgets: dict[str, Budget] = {}

    def price(self, upstream: Upstream, model: str) -> Price:
        if upstream.free:
            return FREE
        for pattern, price in self.prices.items():
            if fnmatch.fnmatchcase(model, pattern):
                return price
        return FREE

    @property
    def db_path(self) -> Path:
        return self.server.data_dir / "ledger.sqlite3"

    @property
    def snapshot_path(self) -> Path:
        return self.server.data_dir / "metrics.json"


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
