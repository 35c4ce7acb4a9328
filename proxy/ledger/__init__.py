"""The ledger as the rest of Tollgate sees it: the records it keeps, the questions it answers,
and `LedgerStore`, the one interface every engine implements: `sqlite.py` (one machine) and
`postgresql.py` (every machine of a deployment).

Nothing outside this package knows which engine is behind a `LedgerStore`: the app gets one
from `ledger_for(config)`, and reports, accounting, metrics and the CLI speak only the methods
below, in the types defined here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from ..config import Config


@dataclass(slots=True)
class CallRecord:
    ts: float                 # wall clock (unix seconds) when the call finished
    upstream: str             # upstream that served it, "" when none was chosen
    model: str                # the model name the client used
    dialect: str              # "openai" or "ollama"
    endpoint: str             # chat, completion, embedding, responses, generate, embed, ...
    type: str                 # request type (chat, presentacion, ...)
    user: str | None
    stream: bool
    status: int               # HTTP status the client saw
    outcome: str              # errors.OUTCOMES
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    estimated: bool           # tokens are tiktoken estimates, not the upstream's report
    latency_s: float
    ttft_s: float | None      # time to first streamed chunk
    cost_usd: float
    fallback_from: str | None = None  # the upstream that could not take the call
    key_id: str | None = None         # the proxy key's name (never the key itself)
    admission: str | None = None      # the key of its row in `admissions`, if a limit admitted it;
                                      # COUNTED_BY_ROW if only counted (see there)
    # False for an attempt that did not answer the client: refused by a limit or failed at its
    # upstream, after which a fallback took the call (whose row is final, with fallback_from).
    final: bool = True
    # A cache hit (outcome "cache_hit") spends nothing itself: these are the tokens and cost of
    # the live call it stood in for, what the cache saved.
    saved_tokens: int = 0
    saved_usd: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def ok(self) -> bool:
        return self.outcome in SUCCESSES


@dataclass(slots=True)
class Admission:
    """A call let through the limiter, written when it is let through, not when it ends: after a
    crash the windows still count the calls that were in flight."""

    key: str
    ts: float                 # limiter clock at admission
    upstream: str
    model: str
    user: str | None
    key_id: str | None
    tokens: int               # what admission counted; the finished call's row has the real figure


COLUMNS = tuple(f.name for f in fields(CallRecord))

# The `admission` of a call let through scopes that only count it (the upstream /stats shows,
# with no limit of its own): no admission row was written, since nothing is held back by it,
# and its call row stands for one in `replay_admissions`, with the key "call:<row id>". The
# row of an admission costs the writer as much as a call's; counting every call to the tracked
# upstream cost each a second row. Only a call in flight at a crash goes uncounted after it.
COUNTED_BY_ROW = ""

# Outcomes that answered the caller: everything else is an error in the books. A cache hit is
# an answer too, from Tollgate's cache instead of an upstream.
SUCCESSES = frozenset({"ok", "cache_hit"})
# The same in SQL, for the sums the engines keep.
IS_ERROR_SQL = "outcome NOT IN ('ok', 'cache_hit')"


GroupBy = Literal["upstream", "model", "type", "user"]
GROUPS: tuple[GroupBy, ...] = ("upstream", "model", "type", "user")


@dataclass(frozen=True)
class Filters:
    """Which rows a report or an export covers."""

    since: float | None = None
    until: float | None = None
    equals: tuple[tuple[GroupBy, str], ...] = ()  # e.g. (("upstream", "gpt4o_cloud"),)
    # Reports count calls; an export shows every row, the attempts before a fallback included.
    attempts: bool = False


# One piece of a history: its UTC start, its group's value, and its sums: requests, prompt and
# completion tokens, cost, errors, estimated calls. A piece lies within one local hour.
Piece = tuple[float, Any, int, int, int, float, int, int]


# What calls cost since a time, by upstream, model, proxy key and user (the budgets' start).
Spend = tuple[str, str, str | None, str | None, float]


# Where a table names only its busiest entries, the rest are summed under this name.
OTHERS = "(others)"

# Summary.latency's kinds.
LATENCY, TTFT = 0, 1


@dataclass
class Summary:
    """An epoch's sums, in engine-neutral rows: `calls` are (upstream, model, type, endpoint,
    key_id, outcome, fallback_from, final, named, requests, prompt, completion, cached, estimated calls,
    estimated tokens, cost, latency sum, TTFT count, TTFT sum, last time); `users` are (user,
    requests, errors, prompt, completion, cached, estimated calls, estimated tokens, cost, last
    time); `latency` are (kind, bucket index, count)."""

    calls: list[tuple[object, ...]] = field(default_factory=list)     # KEY..., SUMS..., last_ts
    users: list[tuple[object, ...]] = field(default_factory=list)     # user, USER_SUMS..., last_ts
    latency: list[tuple[int, int, int]] = field(default_factory=list)  # kind, idx, n


@dataclass(frozen=True)
class Snapshot:
    """What the books read back from a shared ledger: the current epoch's start and sums, and the
    cost by UTC day (with the ledger's first call time) for the projection."""

    started: float
    summary: Summary
    days: dict[int, float]
    first: float | None


class LedgerError(Exception):
    """The ledger cannot be opened or written at start; the message is one line for the operator."""


@dataclass(frozen=True)
class LedgerHealth:
    """What the writer is doing now: for /healthz, /stats, /metrics and the alert rule."""

    failing: str | None       # the last write's error while it has not succeeded since
    failing_since: float | None
    unwritten: int            # rows and admissions queued or being retried
    dropped: int              # rows given up because the backlog was full (on_ledger_full = "serve")
    full: bool                # the backlog has reached its bound

    @property
    def ok(self) -> bool:
        return self.failing is None and not self.full

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "failing": self.failing, "unwritten_rows": self.unwritten,
                "dropped_rows": self.dropped, "full": self.full}


class LedgerStore(Protocol):
    """Append call rows and admissions, start epochs, and answer: the epoch's sums, admissions
    since a time, history pieces for a period, export rows, retention."""

    path: Path
    drop_when_full: bool
    pruned: int

    def open(self, now: float) -> None: ...
    def close(self, timeout: float | None = None) -> None: ...
    @property
    def unwritten(self) -> int: ...
    @property
    def full(self) -> bool: ...
    def health(self) -> LedgerHealth: ...
    def append(self, record: CallRecord) -> bool: ...
    def admit(self, admission: Admission) -> bool: ...
    def new_epoch(self, started: float) -> None: ...
    async def flush(self, timeout: float | None = None) -> bool: ...
    async def snapshot(self, since: float, timeout: float) -> Snapshot: ...
    def prune(self, cutoff: float | None, admissions_cutoff: float) -> None: ...
    def epoch_summary(self, epoch: int | None = None) -> tuple[float, Summary]: ...
    def replay_admissions(self, since: float) -> Iterator[Admission]: ...
    def cost_by_day(self, since: float) -> tuple[dict[int, float], float | None]: ...
    def history_pieces(self, filters: Filters, group_by: GroupBy | None, whole_hours: bool,
                       top_users: int | None = None) -> list[Piece]: ...
    def export_rows(self, filters: Filters, batch: int = 2000) -> Iterator[list[tuple[Any, ...]]]: ...
    def raw_since(self) -> float | None: ...
    def spend(self, since: float) -> list[Spend]: ...
    def latency_hours(self, start_hour: int, end_hour: int) -> list[tuple[int, int, int, int]]: ...
    def recent(self, filters: Filters, outcome: str | None, limit: int) -> list[CallRecord]: ...
    def rows(self, since: float | None = None, until: float | None = None) -> Iterator[CallRecord]: ...
    def count(self) -> int: ...


# --- the engine ------------------------------------------------------------------------


def ledger_for(config: Config) -> LedgerStore:
    """The config's ledger: the one place that picks the engine (SQLite, or PostgreSQL)."""
    server = config.server
    drop = server.on_ledger_full == "serve"
    if config.ledger.backend == "postgresql":
        from .postgresql import PgLedger  # psycopg is an optional dependency

        dsn = config.ledger.dsn()
        if dsn is None:
            raise LedgerError(f"ledger.backend = 'postgresql' but ${config.ledger.dsn_env} is unset")
        return PgLedger(dsn, server.data_dir / "ledger-outbox.sqlite3", config.ledger.pool_size,
                        server.ledger_max_backlog, drop)
    from .sqlite import Ledger

    return Ledger(config.db_path, server.ledger_busy_timeout_s, server.ledger_max_backlog, drop)


def describe(config: Config) -> str:
    """The ledger as a message names it (never the connection string: it may hold a password)."""
    if config.ledger.backend == "postgresql":
        return f"PostgreSQL (${config.ledger.dsn_env})"
    return str(config.db_path)


def ledger_exists(config: Config) -> bool:
    """Whether there is a ledger to read (a database is always there to ask)."""
    return config.ledger.backend == "postgresql" or config.db_path.exists()


def probe(config: Config) -> tuple[bool, str] | None:
    """For `tollgate check`: whether the database the config names answers, in a few words
    (never its connection string); None where the ledger is a local file."""
    if config.ledger.backend != "postgresql":
        return None
    from .postgresql import probe as ask

    return ask(config.ledger.dsn() or "")
