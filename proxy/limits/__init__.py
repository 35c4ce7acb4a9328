"""The limiter as the rest of Tollgate uses it: `WindowStore`, and `windows_for`, which picks
the engine: this process's memory (`memory.py`) or Redis, shared by every process of a
deployment (`shared.py`, over the scripts of `redis_windows.py`). The pure windows, scopes,
refusals and tickets are in `windows.py`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from ..config import Config
from ..ledger import Admission
from .memory import Limiter
from .windows import DAY, MINUTE, Denial, Scope, Ticket, Window, format_duration

__all__ = ["DAY", "MINUTE", "Denial", "Limiter", "Scope", "Ticket", "Window", "WindowStore", "format_duration",
           "probe", "windows_for"]


class WindowStore(Protocol):
    """The limiter's windows as the rest of Tollgate uses them: which scopes a call is in, admit
    and finish, an upstream's own 429, the ledger's admissions at start, and the figures read
    from them (headers, /stats, /metrics, alerts). Callers get theirs from `windows_for`
    without knowing which engine it is: this process's memory (`Limiter`), or Redis, shared
    by every process of a deployment (`shared.SharedLimiter`)."""

    clock: Callable[[], float]
    # Told when a place is given back after `finish` returned (a shared store's reply): whoever
    # waits for one looks again.
    released: list[Callable[[], None]]

    def scopes(self, upstream: str, model: str, user: str | None, key: str | None = None) -> list[Scope]: ...
    def needs_estimate(self, scopes: list[Scope]) -> bool: ...
    def caps(self, scopes: list[Scope]) -> tuple[int | None, int | None]: ...
    async def admit(self, scopes: list[Scope], tokens: int) -> Ticket | Denial: ...
    def finish(self, ticket: Ticket, tokens: int) -> None: ...
    def upstream_refused(self, upstream: str, retry_after: float | None) -> None: ...
    def replay(self, admission: Admission) -> None: ...
    async def refresh(self) -> None:
        """Bring the figures up to date before a reader (/stats, /metrics) reads them."""
    def headers(self, scopes: list[Scope]) -> dict[str, str]: ...
    def usage(self, upstream: str, model: str, kind: str) -> tuple[int, int | None]: ...
    def report(self) -> list[dict[str, object]]: ...
    @property
    def tracked_users(self) -> int: ...
    async def claim(self, name: str) -> bool:
        """May this process act on `name` (an alert's crossing) for the whole deployment? Once:
        the first to ask gets True until `unclaim`."""
    def unclaim(self, name: str) -> None: ...
    def refused(self, reason: str) -> None:
        """Count a call refused before any upstream, for the deployment's /stats."""
    def refusals(self) -> dict[str, int] | None:
        """The deployment's refusals by reason, where processes share a store (else None)."""
    @property
    def state(self) -> dict[str, object]:
        """Which engine holds the windows, and how it is doing (for /stats and /healthz)."""
    def lifecycle(self, app: Any) -> AsyncIterator[None]:
        """The engine's resources (a connection, background tasks), as a cleanup context."""


def windows_for(config: Config, clock: Callable[[], float],
                admissions: Callable[[float], Awaitable[list[Admission]]] | None = None) -> WindowStore:
    """The limiter's window store for `config`: the one place that picks the engine.
    `admissions(since)` reads the ledger's admissions, which a shared engine loads when its
    store has forgotten them (a fresh or flushed Redis)."""
    if config.limits.backend == "redis":
        from .shared import SharedLimiter  # redis is an optional dependency

        return SharedLimiter(config, clock, admissions)
    return Limiter(config, clock)


def probe(config: Config) -> tuple[bool, str] | None:
    """For `tollgate check`: whether the shared store the config names answers, in a few words;
    None where the windows are this process's own."""
    if config.limits.backend != "redis":
        return None
    from .shared import probe as ask

    return ask(config)
