"""One metered call in flight: what is known of it so far, and the ledger row it becomes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .cache import Lookup
from .config import Config, Upstream
from .dialects import CallInfo, Dialect, Usage
from .errors import ProxyError
from .limits import Ticket
from .ledger import CallRecord
from .tokens import Estimator

if TYPE_CHECKING:
    from .cache.semantic import Vector


@dataclass
class Call:
    """One metered call in flight: what is known so far, turned into a ledger row at the end."""

    dialect: Dialect
    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    info: CallInfo | None = None
    upstream: Upstream | None = None
    model: str = ""
    type: str = "chat"
    user: str | None = None
    status: int = 200
    outcome: str = "ok"
    answered: bool = False      # the upstream accepted the call (2xx): tokens were spent
    usage: Usage | None = None
    prompt_missing: bool = False
    text: str = ""
    ttft: float | None = None
    headers_sent: bool = False  # past this, errors can only be told inside the body
    # The final frame ([DONE], response.completed, Ollama's done) was handed to the client:
    # the call is answered, whatever happens to either connection afterwards.
    completed: bool = False
    ticket: Ticket | None = None
    fallback_from: str | None = None
    key_id: str | None = None
    admission: str | None = None
    command: bool = False  # answered by the proxy itself: no ledger row
    # The answer cache's part: how it took part (hit, miss, bypass: the X-Tollgate-Cache header),
    # the live answer's bytes kept to store it (None once too large), and, for a hit, the tokens
    # and cost the live call would have taken.
    cache_status: str | None = None
    cache: Lookup | None = None
    cache_leads: bool = False             # the first of identical misses: the others wait for it
    cache_vector: Vector | None = None    # the question's embedding, for a semantic rule
    capture: bytearray | None = None
    saved: tuple[int, float] = (0, 0.0)
    clamped: bool = False                 # its output was capped: not the answer to the question asked

    def fail(self, exc: ProxyError, status_sent: bool) -> None:
        if self.completed:
            return
        self.outcome = exc.outcome
        if not status_sent:
            self.status = exc.status

    def record(self, config: Config, estimator: Estimator, now: float) -> CallRecord:
        usage, estimated = self.usage, False
        if self.info is not None and self.answered:
            if usage is None:
                # The upstream said nothing (no usage chunk, cut short, client gone): estimate.
                usage = Usage(self.info.estimate_prompt(estimator),
                              estimator.text(self.text, self.model))
                estimated = True
            elif self.prompt_missing:
                usage = Usage(self.info.estimate_prompt(estimator), usage.completion, usage.cached)
                estimated = True
        usage = usage or Usage()
        price = config.price(self.upstream, self.model) if self.upstream else None
        return CallRecord(
            ts=now, upstream=self.upstream.name if self.upstream else "", model=self.model,
            dialect=self.dialect, endpoint=self.endpoint, type=self.type, user=self.user,
            stream=bool(self.info and self.info.stream), status=self.status, outcome=self.outcome,
            prompt_tokens=usage.prompt, completion_tokens=usage.completion,
            cached_tokens=usage.cached, estimated=estimated,
            latency_s=time.perf_counter() - self.started, ttft_s=self.ttft,
            cost_usd=price.cost(usage.prompt, usage.completion, usage.cached) if price else 0.0,
            fallback_from=self.fallback_from, key_id=self.key_id, admission=self.admission,
            saved_tokens=self.saved[0], saved_usd=self.saved[1],
        )
