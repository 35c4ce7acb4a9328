"""Alerts: config rules over live figures, and budgets' crossings, posted to Slack, Discord or
JSON webhooks and e-mailed (aiosmtplib: STARTTLS or TLS, a login from the environment).

A rule fires once when its figure crosses above the threshold and re-arms when the figure
falls back to or below it. Rules are checked after every call and on a timer (figures like
tokens-per-minute fall with time alone). Checking only puts a message on a bounded queue; one
background task posts them with its own timeout, so a slow or failing webhook never delays or
breaks a call. Every alert is also logged as a warning. Webhook URLs, which embed secrets for
Slack and Discord, and SMTP passwords come from environment variables and are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import EmailMessage

import aiohttp
import aiosmtplib
from aiohttp import web

from .accounting import Accounting
from .config import AlertRule, Config, Email, Webhook
from .books import Books
from .limits import WindowStore
from .ledger import CallRecord
from .tasks import running

log = logging.getLogger("tollgate.alerts")

_LABELS = {
    "es": {
        "cost_usd": "costo estimado (USD)",
        "error_rate_pct": "tasa de error (%)",
        "daily_requests_pct": "requests del día (% del límite)",
        "tpm_pct": "tokens por minuto (% del límite)",
        "total_tokens": "tokens totales",
        "ledger_unwritten_rows": "filas del registro sin escribir",
        "budget_usd": "gasto del presupuesto (USD)",
    },
    "en": {
        "cost_usd": "estimated cost (USD)",
        "error_rate_pct": "error rate (%)",
        "daily_requests_pct": "requests today (% of the limit)",
        "tpm_pct": "tokens per minute (% of the limit)",
        "total_tokens": "total tokens",
        "ledger_unwritten_rows": "ledger rows not yet written",
        "budget_usd": "budget spend (USD)",
    },
}
_WORDS = {"es": ("ALERTA", "por encima de"), "en": ("ALERT", "above")}


@dataclass
class _State:
    rule: AlertRule
    armed: bool = True


@dataclass
class Alert:
    rule: str
    metric: str
    value: float
    threshold: float
    time: str
    claim: str = ""   # what names this crossing among processes (the rule, unless more is needed)

    @property
    def message(self) -> str:
        return self.message_in("es")

    def message_in(self, lang: str) -> str:
        value = f"{self.value:,.4f}".rstrip("0").rstrip(".")
        alert, above = _WORDS.get(lang, _WORDS["es"])
        label = _LABELS.get(lang, _LABELS["es"])[self.metric]
        return f"⚠️ {alert} Tollgate: {self.rule}: {label} = {value}, {above} {self.threshold:,g}"


Destination = Webhook | Email


def _claim(crossing: str, destination: Destination) -> str:
    """What processes claim before sending one crossing (a rule's name, or a budget's period and
    fraction) to one destination."""
    kind = "email" if isinstance(destination, Email) else "webhook"
    return f"alert:{crossing}:{kind}:{destination.name}"


@dataclass
class Alerts:
    config: Config
    acc: Accounting
    limiter: WindowStore
    books: Books | None = None   # where several processes share the ledger: read back before each check
    queue: asyncio.Queue[tuple[Destination, Alert]] = field(default_factory=lambda: asyncio.Queue(maxsize=256))
    # Deliveries so far, for /metrics (tollgate_alert_deliveries_total).
    sent: int = 0
    failed: int = 0
    # Set after each delivery tried, sent or failed (for whoever awaits one: tests, a drain).
    delivered: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.states = [_State(rule) for rule in self.config.alerts.rules]
        # Budgets announce their own crossings (announce), so delivery runs when any budget may.
        self.destinations = bool(self.states) or any(b.webhooks or b.emails for b in self.config.budgets.values())
        span = max((r.window_min for r in self.config.alerts.rules), default=0) * 60.0
        self._outcomes: deque[tuple[float, bool]] = deque()  # for error rates over a window
        self._span = span

    # --- figures -------------------------------------------------------------------------

    def on_call(self, rec: CallRecord) -> None:
        if not rec.final:
            return  # the call is counted once, when it is answered
        if self._span:
            self._outcomes.append((rec.ts, rec.ok))
        self.check()

    def _value(self, rule: AlertRule, now: float) -> float | None:
        totals = self.acc.current.totals
        if rule.metric == "cost_usd":
            return totals.cost_usd
        if rule.metric == "total_tokens":
            return float(totals.total_tokens)
        if rule.metric == "ledger_unwritten_rows":
            return float(self.acc.ledger.unwritten) if self.acc.ledger is not None else None
        if rule.metric == "error_rate_pct":
            horizon = now - rule.window_min * 60.0
            recent = [ok for ts, ok in self._outcomes if ts >= horizon]
            return 100.0 * recent.count(False) / len(recent) if recent else 0.0
        # The limiter's own windows: the figure an alert names is the one that will refuse.
        kind = {"daily_requests_pct": "requests_per_day", "tpm_pct": "tokens_per_minute"}[rule.metric]
        model = self.config.stats.limits_model or "" if rule.upstream == self.config.stats.limits_upstream else ""
        used, limit = self.limiter.usage(rule.upstream, model, kind)
        return 100.0 * used / limit if limit else None

    def figures(self) -> dict[str, float | None]:
        """Each rule's figure now, by rule name: what the alerts compare with their thresholds."""
        now = self.acc.clock()
        return {state.rule.name: self._value(state.rule, now) for state in self.states}

    def check(self) -> None:
        now = self.acc.clock()
        while self._outcomes and self._outcomes[0][0] < now - self._span:
            self._outcomes.popleft()
        for state in self.states:
            value = self._value(state.rule, now)
            if value is None:
                continue
            if value > state.rule.above and state.armed:
                state.armed = False
                self._fire(state.rule, value, now)
            elif value <= state.rule.above and not state.armed:
                state.armed = True
                for destination in self._destinations(state.rule.webhooks, state.rule.emails):
                    # The next crossing may be sent again, by anyone.
                    self.limiter.unclaim(_claim(state.rule.name, destination))

    def _destinations(self, webhooks: tuple[str, ...], emails: tuple[str, ...]) -> list[Destination]:
        return ([self.config.alerts.webhooks[n] for n in webhooks]
                + [self.config.alerts.email[n] for n in emails])

    def _fire(self, rule: AlertRule, value: float, now: float) -> None:
        self._send(Alert(rule.name, rule.metric, value, rule.above,
                         datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds")),
                   self._destinations(rule.webhooks, rule.emails))

    def announce(self, rule: str, metric: str, value: float, threshold: float, webhooks: tuple[str, ...],
                 emails: tuple[str, ...], claim: str) -> None:
        """A crossing someone else watched for (a budget's), sent like a rule's."""
        now = self.acc.clock()
        self._send(Alert(rule, metric, value, threshold,
                         datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"), claim),
                   self._destinations(webhooks, emails))

    def _send(self, alert: Alert, destinations: list[Destination]) -> None:
        log.warning("%s", alert.message)
        for destination in destinations:
            try:
                self.queue.put_nowait((destination, alert))
            except asyncio.QueueFull:
                self.failed += 1
                log.error("alert queue full: dropped alert %r for %r", alert.rule, destination.name)

    # --- delivery ------------------------------------------------------------------------

    @staticmethod
    def payload(webhook: Webhook, alert: Alert) -> dict[str, object]:
        if webhook.format == "slack":
            return {"text": alert.message}
        if webhook.format == "discord":
            return {"content": alert.message}
        return {"alert": alert.rule, "metric": alert.metric, "value": alert.value,
                "threshold": alert.threshold, "time": alert.time, "message": alert.message}

    async def deliver(self) -> None:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            while True:
                destination, alert = await self.queue.get()
                try:
                    await self._deliver_one(session, destination, alert)
                finally:
                    self.delivered.set()

    async def _deliver_one(self, session: aiohttp.ClientSession, destination: Destination, alert: Alert) -> None:
        if not await self.limiter.claim(_claim(alert.claim or alert.rule, destination)):
            # Processes sharing a deployment see the same crossing: one of them sends it.
            log.info("alert %r to %r: sent by another process", alert.rule, destination.name)
            return
        if isinstance(destination, Email):
            await self._mail(destination, alert)
            return
        webhook = destination
        url = webhook.url()
        if url is None:
            self.failed += 1
            log.error("webhook %r: its URL variable %s is unset", webhook.name, webhook.url_env)
            return
        try:
            timeout = aiohttp.ClientTimeout(total=webhook.timeout_s)
            async with session.post(url, json=self.payload(webhook, alert), timeout=timeout) as r:
                if r.status >= 400:
                    raise aiohttp.ClientResponseError(r.request_info, (), status=r.status)
            self.sent += 1
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.failed += 1
            # The URL is a secret: name the webhook, never its address.
            log.error("webhook %r failed to take alert %r (%s)", webhook.name, alert.rule,
                      getattr(exc, "status", None) or type(exc).__name__)

    async def _mail(self, email: Email, alert: Alert) -> None:
        lang = email.lang or self.config.commands.lang
        message = EmailMessage()
        message["From"] = email.sender
        message["To"] = ", ".join(email.to)
        message["Subject"] = f"Tollgate: {alert.rule}"
        message.set_content(f"{alert.message_in(lang)}\n\n{alert.time}\n")
        context = ssl.create_default_context(cafile=str(email.ca_file) if email.ca_file else None)
        try:
            await aiosmtplib.send(
                message, hostname=email.host, port=email.port, username=email.username(),
                password=email.password(), use_tls=email.security == "tls",
                start_tls=True if email.security == "starttls" else False,
                tls_context=context if email.security != "none" else None, timeout=email.timeout_s)
            self.sent += 1
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            self.failed += 1
            # What the server said (a code and its words), never the login.
            said = getattr(exc, "code", None)
            log.error("e-mail %r (%s:%d) failed to take alert %r (%s%s)", email.name, email.host, email.port,
                      alert.rule, type(exc).__name__, f" {said}" if said else "")

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(self.config.alerts.check_interval_s)
            if self.books is not None:
                await self.books.refresh()
            self.check()

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: the delivery and timer tasks run while the app does, then are cancelled."""
        if not self.destinations:  # no rules, no budget alerts: nothing to check or deliver
            yield
            return
        tasks = (self.deliver(), self.tick()) if self.states else (self.deliver(),)
        async with running(*tasks):
            yield
