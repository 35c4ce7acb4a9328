"""Admission of one call: per-request caps, the limiter, waiting in line, falling back.

The limiter (`limits`) decides; this module applies the decision to a call in flight, which may mean
awaiting (wait mode) or choosing another upstream (fallback). Refusals raise errors that the
middleware renders as the dialect's 429 / 413 / 400 with OpenAI's rate-limit headers.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from . import routing
from .config import Config, Upstream
from .dialects import CallInfo
from .budgets import Budgets
from .errors import BadRequest, BudgetExceeded, PayloadTooLarge, RateLimited
from .limits import Denial, Scope, Ticket, WindowStore
from .tokens import Estimator


class WaitLines:
    """First come, first served: callers waiting on a scope queue behind one lock per scope.

    asyncio.Lock wakes its waiters in the order they came, and while anyone waits on a scope,
    newcomers to that scope join the line instead of overtaking it. A caller that disconnects
    is cancelled out of the line, giving its place up.
    """

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._released = asyncio.Event()
        self._watching = 0  # callers in `changed` now: with none, a given-back place tells no one
        self.waiting = 0  # callers in some line now
        # `waiting` (the tollgate_waiting_calls gauge) changes under this, and its watchers are
        # told: whoever observes the lines sees every change, in order.
        self.waiting_changed = asyncio.Condition()

    async def count_waiting(self, delta: int) -> None:
        async with self.waiting_changed:
            self.waiting += delta
            self.waiting_changed.notify_all()

    def lock(self, scope: str) -> asyncio.Lock:
        lock = self._locks.get(scope)
        if lock is None:
            if len(self._locks) > 1024:  # drop idle lines: per-user scopes come and go
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            lock = self._locks[scope] = asyncio.Lock()
        return lock

    def busy(self, scope: str) -> asyncio.Lock | None:
        lock = self._locks.get(scope)
        return lock if lock is not None and lock.locked() else None

    def notify(self) -> None:
        """A place was given back: whoever waits for one looks again."""
        if self._watching:
            event, self._released = self._released, asyncio.Event()
            event.set()

    async def changed(self, timeout: float) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that comes
        # as the event is set, and a caller who hung up would go on to be forwarded.
        self._watching += 1
        try:
            async with asyncio.timeout(timeout):
                await self._released.wait()
        except TimeoutError:
            pass
        finally:
            self._watching -= 1


@dataclass
class Plan:
    """Where an admitted call goes, and what it holds."""

    upstream: Upstream
    model: str
    ticket: Ticket | None
    clamp_output: int | None      # rewrite the body's max output tokens to this
    fallback_from: str | None
    # The upstreams whose limits refused the call on its way here, with why.
    refused: tuple[tuple[Upstream, str, Denial], ...] = ()
    waited: bool = False          # it queued in a wait line (its caller may have left meanwhile)


@dataclass
class Admission:
    config: Config
    limiter: WindowStore
    lines: WaitLines
    estimator: Estimator
    budgets: Budgets | None = None

    def refusal(self, denial: Denial, scopes: list[Scope],
                refused: list[tuple[Upstream, str, Denial]] | None = None) -> RateLimited:
        headers = self.limiter.headers(scopes)
        if denial.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(denial.retry_after)))
            headers["retry-after-ms"] = str(max(1, math.ceil(denial.retry_after * 1000)))
        if denial.retry_after is None or denial.retry_after > self.config.limits.no_retry_over_s:
            # Longer than a client's SDK would wait: retrying now only burns its retries.
            headers["x-should-retry"] = "false"
        message = denial.message
        if refused:
            # The caller learns every upstream that was tried, not only the last.
            first, _, first_denial = refused[0]
            message = f"Upstream '{first.name}' refused the call: {first_denial.message} Its fallback: {message}"
        if denial.limit == "budget":
            return BudgetExceeded(message, headers)
        return RateLimited(message, denial.limit, headers)

    def _within_budgets(self, info: CallInfo, upstream: Upstream, model: str, user: str | None, key: str | None,
                        tried: set[str], fallback_from: str | None,
                        refused: list[tuple[Upstream, str, Denial]]) -> tuple[Upstream, str, str | None]:
        """Where the call may go within its budgets: here, or its fallback (`on_budget =
        "fallback"`); else the budget's 429. The estimate is the prompt as tiktoken counts it and
        the output the call asks for, at the upstream's prices (a free upstream spends nothing)."""
        if self.budgets is None or not self.budgets.budgets:
            return upstream, model, fallback_from
        while True:
            covering = self.budgets.covering(upstream.name, model, key, user)
            if not covering:
                return upstream, model, fallback_from
            price = self.config.price(upstream, model)
            estimate = 0.0
            if price.input or price.output:
                estimate = price.cost(info.estimate_prompt(self.estimator), info.max_output_tokens or 0, 0)
            over = self.budgets.check(covering, user, estimate)
            if over is None:
                return upstream, model, fallback_from
            budget, denial = over
            fallback = (routing.fallback_for(self.config, upstream, tried, info.dialect)
                        if budget.on_budget == "fallback" else None)
            if fallback is None:
                raise self.refusal(denial, [], refused)
            refused.append((upstream, model, denial))
            tried.add(upstream.name)
            fallback_from = fallback_from or upstream.name
            upstream, model = fallback, routing.fallback_model(upstream, model)

    async def admit(self, info: CallInfo, upstream: Upstream, model: str, user: str | None,
                    key: str | None, tried: set[str], fallback_from: str | None) -> Plan:
        refused: list[tuple[Upstream, str, Denial]] = []
        if self.budgets is not None and self.budgets.budgets:
            await self.estimator.ready(info.model or "")  # a budget's estimate may need it
            upstream, model, fallback_from = self._within_budgets(info, upstream, model, user, key, tried,
                                                                  fallback_from, refused)
        scopes = self.limiter.scopes(upstream.name, model, user, key)
        if not scopes:
            # Nothing limits this call.
            return Plan(upstream, model, None, None, fallback_from, tuple(refused))
        policy = self.config.limits
        loop = asyncio.get_running_loop()
        deadline = loop.time() + policy.max_wait_s
        held: asyncio.Lock | None = None
        prompt: int | None = None
        again = False
        try:
            while True:
                if again:  # after a wait, a line or a fallback: the scopes are looked up anew
                    scopes = self.limiter.scopes(upstream.name, model, user, key)
                again = True
                if not scopes:
                    return Plan(upstream, model, None, None, fallback_from, tuple(refused), held is not None)
                if prompt is None and self.limiter.needs_estimate(scopes):
                    if not self.estimator.is_ready(info.model or ""):
                        await self.estimator.ready(info.model or "")
                    prompt = info.estimate_prompt(self.estimator)
                tokens, clamp = self._caps(info, scopes, prompt)
                if policy.on_limit == "wait" and held is None:
                    line = next((lock for s in scopes if (lock := self.lines.busy(s.name))), None)
                    if line is not None:
                        held = await self._join(line, deadline)
                        continue
                decision = await self.limiter.admit(scopes, tokens)
                if isinstance(decision, Ticket):
                    return Plan(upstream, model, decision, clamp, fallback_from, tuple(refused), held is not None)
                fallback = routing.fallback_for(self.config, upstream, tried, info.dialect)
                if fallback is not None:
                    refused.append((upstream, model, decision))
                    tried.add(upstream.name)
                    fallback_from = fallback_from or upstream.name
                    upstream, model, prompt = fallback, routing.fallback_model(upstream, model), None
                    upstream, model, fallback_from = self._within_budgets(info, upstream, model, user, key, tried,
                                                                          fallback_from, refused)
                    continue
                remaining = deadline - loop.time()
                if policy.on_limit != "wait" or decision.retry_after is None or decision.retry_after > remaining:
                    raise self.refusal(decision, scopes, refused)
                if held is None:
                    held = await self._join(self.lines.lock(decision.scope), deadline)
                    continue
                await self.lines.changed(min(decision.retry_after, remaining))
        finally:
            if held is not None:
                held.release()

    async def _join(self, line: asyncio.Lock, deadline: float) -> asyncio.Lock:
        remaining = deadline - asyncio.get_running_loop().time()
        await self.lines.count_waiting(+1)
        acquired = False
        try:
            async with asyncio.timeout(max(remaining, 0.0)):  # not wait_for: see `changed`
                await line.acquire()
            acquired = True
        except TimeoutError:
            raise RateLimited(f"Waited {self.config.limits.max_wait_s:g} s in line for a place; none freed.",
                              "wait_timeout", {"Retry-After": "1"}) from None
        finally:
            try:
                await asyncio.shield(self.lines.count_waiting(-1))
            except asyncio.CancelledError:
                # Cancelled (its caller left) just as it got the line: hand the line on, or
                # everyone behind it would wait for a holder that is gone.
                if acquired:
                    line.release()
                raise
        return line

    def _caps(self, info: CallInfo, scopes: list[Scope], prompt: int | None) -> tuple[int, int | None]:
        """Apply per-request caps; return the tokens to admit and the output clamp, if any."""
        policy = self.config.limits
        in_cap, out_cap = self.limiter.caps(scopes)
        if in_cap is not None and prompt is not None and prompt > in_cap:
            raise PayloadTooLarge(f"This request has about {prompt:,} input tokens; the limit is "
                                  f"{in_cap:,} input tokens per request (max_input_tokens).")
        requested, clamp = info.max_output_tokens, None
        if out_cap is not None and (requested is None or requested > out_cap):
            if requested is not None and policy.output_cap == "reject":
                raise BadRequest(f"This request asks for up to {requested:,} output tokens; the limit "
                                 f"is {out_cap:,} output tokens per request (max_output_tokens).")
            requested = clamp = out_cap
        tokens = (prompt or 0) + ((requested or 0) if policy.count_output_tokens else 0)
        return tokens, clamp


def parse_retry_after(headers: Mapping[str, str], cap: float, now: float) -> float | None:
    """Seconds an upstream asked us to wait: retry-after-ms, or Retry-After (seconds or an HTTP
    date), at most `cap`. Anything not a finite, non-negative time is ignored."""
    for name, scale in (("retry-after-ms", 1000.0), ("Retry-After", 1.0)):
        value = headers.get(name)
        if not value:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            try:
                seconds = parsedate_to_datetime(value).timestamp() - now
            except (TypeError, ValueError, OverflowError):
                continue
        if math.isfinite(seconds) and seconds >= 0:
            return min(seconds, cap)
    return None
