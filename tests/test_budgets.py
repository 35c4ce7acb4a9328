"""Spending budgets through the proxy, and alerts by e-mail to a real SMTP server on loopback.

The fake upstream answers every gpt-4o call with 100 prompt and 50 completion tokens: $0.006 at
the test config's prices ($0.03 and $0.06 per 1,000)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.keys import ALERTS

from .conftest import Clock, Proxy, settled
from .fake_upstream import Behavior, FakeUpstream
from .servers import MailServer

ONE_CALL = (100 * 0.03 + 50 * 0.06) / 1000      # $0.006
CHAT = [{"role": "user", "content": "hola"}]


def budgeted(raw: dict[str, Any], **budget: Any) -> dict[str, Any]:
    raw["budgets"] = {"nube": {"usd": 0.01, "period": "day", "upstream": "gpt4o_cloud", **budget}}
    return raw


@asynccontextmanager
async def serving(raw: dict[str, Any], fake: FakeUpstream, mail: MailServer | None = None
                  ) -> AsyncIterator[tuple[Proxy, openai.AsyncOpenAI]]:
    """The proxy on `raw`, an upstream answering $0.006 a gpt-4o call, and the bot's client; all
    stopped after (the mail server too, when there is one)."""
    fake.behavior = Behavior(prompt_tokens=100, chunks=5, completion_per_chunk=10)
    proxy = Proxy(raw)
    await proxy.start()
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="bot-key", max_retries=0)
    try:
        yield proxy, client
    finally:
        await client.close()
        await proxy.stop()
        if mail is not None:
            await mail.stop()


async def ask(client: openai.AsyncOpenAI, **extra: Any) -> Any:
    create: Any = client.chat.completions.with_raw_response.create
    return await create(model="gpt-4o", messages=CHAT, **extra)


async def scrape(proxy: Proxy) -> dict[str, float]:
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/metrics") as r:
            text = await r.text()
    return {f"{sample.name}{sample.labels.get('budget', '')}{sample.labels.get('result', '')}": sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.fixture
async def timed(raw_config: dict[str, Any], clock: Clock, fake: FakeUpstream) -> AsyncIterator[Proxy]:
    fake.behavior = Behavior(prompt_tokens=100, chunks=5, completion_per_chunk=10)
    clock.now = 1_705_329_138.0          # 2024-01-15 14:32:18 UTC
    p = Proxy(budgeted(raw_config), clock)
    await p.start()
    yield p
    await p.stop()


async def test_a_spent_budget_refuses_in_the_dialects_shape_until_its_period_ends(
        timed: Proxy, fake: FakeUpstream, clock: Clock) -> None:
    client = openai.AsyncOpenAI(base_url=timed.url + "/v1", api_key="bot-key", max_retries=0)
    try:
        await ask(client)                                   # $0.006 of $0.01
        with pytest.raises(openai.RateLimitError) as refused:
            await ask(client, max_tokens=1000)              # about $0.06 more: over, before it leaves
        assert "this call about $0.06" in refused.value.message
        await ask(client)                                   # a short one still fits: $0.012 now
        with pytest.raises(openai.RateLimitError) as spent:
            await ask(client)
        body = spent.value.body
        assert isinstance(body, dict) and body["type"] == "budget_exceeded" and body["code"] == "budget_exceeded"
        assert "Budget 'nube' of $0.01 a day is spent ($0.0120 so far" in body["message"]
        assert "renews at 2024-01-16 00:00" in body["message"]
        headers = spent.value.response.headers
        assert int(headers["Retry-After"]) == 86400 - (14 * 3600 + 32 * 60 + 18)
        assert headers["x-should-retry"] == "false"
        assert fake.requests == 2
        stats = await settled(timed)
        budget = stats["detail"]["budgets"][0]
        assert (budget["name"], budget["spent_usd"], budget["pct"]) == ("nube", pytest.approx(2 * ONE_CALL), 120.0)
        assert budget["remaining_usd"] == 0 and budget["resets_at"] == "2024-01-16T00:00:00+00:00"
        assert stats["detail"]["refused"]["over_budget"] == 2 and stats["errores"] == 0
        figures = await scrape(timed)
        assert figures["tollgate_budget_spent_usdnube"] == pytest.approx(2 * ONE_CALL)
        assert figures["tollgate_budget_usdnube"] == 0.01
        # The Ollama dialect on the free local model is covered by no budget.
        async with aiohttp.ClientSession() as s:
            async with s.post(timed.url + "/api/chat", json={"model": "llama3.2", "messages": CHAT,
                                                               "stream": False}) as r:
                assert r.status == 200
        # A stats reset does not refill it, nor does a restart (spend is read from the ledger).
        async with aiohttp.ClientSession() as s:
            async with s.post(timed.url + "/metrics/reset") as r:
                assert r.status == 200
        with pytest.raises(openai.RateLimitError):
            await ask(client)
        await timed.restart()
        await client.close()
        client = openai.AsyncOpenAI(base_url=timed.url + "/v1", api_key="bot-key", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            await ask(client)
        clock.advance(86400)                                # the next day: a fresh budget
        await ask(client)
        assert fake.requests == 4
    finally:
        await client.close()


async def test_at_the_ceiling_the_bot_falls_back_to_the_free_local_model(
        raw_config: dict[str, Any], fake: FakeUpstream) -> None:
    raw_config["upstreams"]["gpt4o_cloud"]["fallback"] = "ollama_local"
    raw_config["upstreams"]["gpt4o_cloud"]["fallback_model"] = "llama3.2"
    async with serving(budgeted(raw_config, usd=0.005, on_budget="fallback"), fake) as (proxy, client):
        first = await ask(client)
        assert first.headers["x-tollgate-upstream"] == "gpt4o_cloud"
        second = await ask(client)
        assert second.headers["x-tollgate-upstream"] == "ollama_local"
        assert second.headers["x-tollgate-fallback-from"] == "gpt4o_cloud"
        assert second.parse().choices[0].message.content == "w0 w1 w2 w3 w4 "
        assert [seen.body["model"] for seen in fake.seen] == ["openai/gpt-4o", "llama3.2"]
        stats = await settled(proxy)
        assert stats["detail"]["attempts_before_fallback"] == {"gpt4o_cloud:rate_limited": 1}
        assert stats["costo_estimado_usd"] == f"${ONE_CALL:.4f}"


async def test_every_user_has_a_budget_of_their_own(raw_config: dict[str, Any], fake: FakeUpstream) -> None:
    async with serving(budgeted(raw_config, usd=0.005, per_user=True), fake) as (proxy, client):
        await ask(client, user="5215511111111")
        with pytest.raises(openai.RateLimitError) as refused:
            await ask(client, user="5215511111111")
        assert "for user '5215511111111'" in refused.value.message
        await ask(client, user="5215522222222")               # another user's own budget
        await ask(client)                                     # naming no user: no per-user ceiling
        budget = (await settled(proxy))["detail"]["budgets"][0]
        assert budget["users_over"] == 2 and set(budget["top_users"]) == {"5215511111111", "5215522222222"}


async def test_budget_alerts_are_e_mailed_once_per_crossing(raw_config: dict[str, Any], fake: FakeUpstream,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TG_SMTP_USER", "tollgate")
    monkeypatch.setenv("TG_SMTP_PASSWORD", "s3cret-password")
    mail = MailServer(tmp_path, security="starttls", login=("tollgate", "s3cret-password"))
    await mail.start()
    raw_config["alerts"] = {"email": {"ops": {
        "host": "127.0.0.1", "port": mail.port, "security": "starttls", "sender": "tollgate@example.com",
        "to": ["ops@example.com", "raymundo@example.com"], "ca_file": str(mail.cert), "lang": "en",
        "username_env": "TG_SMTP_USER", "password_env": "TG_SMTP_PASSWORD"}}}
    async with serving(budgeted(raw_config, usd=0.012, alert_at=[0.5, 1.0], emails=["ops"]), fake, mail) as (proxy, client):
        assert proxy.server is not None
        alerts = proxy.server.app[ALERTS]
        await ask(client)                                     # 50%: one e-mail
        await asyncio.wait_for(mail.arrived.wait(), 10)
        mail.arrived.clear()
        await ask(client)                                     # 100%: one more
        await asyncio.wait_for(mail.arrived.wait(), 10)
        with pytest.raises(openai.RateLimitError):
            await ask(client)                                 # refused: no third
        await proxy.settled()
        assert alerts.queue.empty() and alerts.sent == 2 and alerts.failed == 0
        assert mail.logins == ["tollgate", "tollgate"]       # after STARTTLS, with the login from the environment
        first, second = mail.messages
        assert first["To"] == "ops@example.com, raymundo@example.com" and first["From"] == "tollgate@example.com"
        assert "budget nube 50%" in first["Subject"]
        assert "ALERT Tollgate: budget nube 50%: budget spend (USD) = 0.006, above 0.006" in first.get_payload(decode=True).decode()
        assert "budget nube 100%" in second["Subject"]


@pytest.mark.parametrize("security", ["tls", "none"])
async def test_rule_alerts_are_e_mailed_in_spanish_over_tls_or_plain(raw_config: dict[str, Any], fake: FakeUpstream,
                                                                      tmp_path: Path, security: str) -> None:
    mail = MailServer(tmp_path, security=security)
    await mail.start()
    destination: dict[str, Any] = {"host": "127.0.0.1", "port": mail.port, "security": security,
                                   "sender": "tollgate@example.com", "to": ["ops@example.com"]}
    if security == "tls":
        destination["ca_file"] = str(mail.cert)
    raw_config["alerts"] = {"email": {"ops": destination},
                            "rules": [{"metric": "cost_usd", "above": 0.001, "emails": ["ops"]}]}
    async with serving(raw_config, fake, mail) as (proxy, client):
        for _ in range(3):                                    # one crossing, one e-mail
            await ask(client)
        await asyncio.wait_for(mail.arrived.wait(), 10)
        await proxy.settled()
        assert proxy.server is not None and proxy.server.app[ALERTS].queue.empty()
        assert len(mail.messages) == 1
        assert "ALERTA Tollgate: cost_usd: costo estimado (USD) = 0.006, por encima de 0.001" in \
            mail.messages[0].get_payload(decode=True).decode()


@pytest.mark.parametrize("trouble", ["refuses", "down"])
async def test_a_mail_server_that_refuses_or_is_down_fails_the_alert_never_the_call(
        raw_config: dict[str, Any], fake: FakeUpstream, tmp_path: Path, trouble: str,
        refused_port: int, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TG_SMTP_PASSWORD", "s3cret-password")
    mail = MailServer(tmp_path, refuse=True)
    await mail.start()
    port = mail.port if trouble == "refuses" else refused_port
    raw_config["alerts"] = {"email": {"ops": {"host": "127.0.0.1", "port": port, "security": "none",
                                              "sender": "tollgate@example.com", "to": ["ops@example.com"],
                                              "password_env": "TG_SMTP_PASSWORD", "timeout_s": 5}},
                            "rules": [{"metric": "cost_usd", "above": 0.001, "emails": ["ops"]}]}
    async with serving(raw_config, fake, mail) as (proxy, client):
        assert proxy.server is not None
        alerts = proxy.server.app[ALERTS]
        alerts.delivered.clear()
        reply = await ask(client)
        assert reply.status_code == 200
        await asyncio.wait_for(alerts.delivered.wait(), 15)
        assert (alerts.sent, alerts.failed) == (0, 1)
        assert (await scrape(proxy))["tollgate_alert_deliveries_totalfailed"] == 1
        said = "\n".join(r.getMessage() for r in caplog.records if r.name == "tollgate.alerts")
        assert "e-mail 'ops'" in said and ("550" in said if trouble == "refuses" else "Error" in said)
        assert "s3cret-password" not in said


def test_what_a_budget_covers() -> None:
    from proxy.config import Budget

    cloud = Budget(usd=1, upstream="gpt4o_cloud", model="gpt-4o*")
    assert cloud.covers("gpt4o_cloud", "gpt-4o-mini", None, None)
    assert not cloud.covers("gpt4o_cloud", "o3", None, None) and not cloud.covers("ollama_local", "gpt-4o", None, None)
    bot = Budget(usd=1, key="bot")
    assert bot.covers("any", "m", "bot", "ana") and not bot.covers("any", "m", "other", "ana")
    assert not bot.covers("any", "m", None, None)
    assert Budget(usd=1, user="ana").covers("x", "m", None, "ana") and not Budget(usd=1, user="ana").covers(
        "x", "m", None, "beto")
    each = Budget(usd=1, per_user=True)
    assert each.covers("x", "m", None, "ana") and not each.covers("x", "m", None, None)
    assert Budget(usd=1).covers("x", "m", None, None)           # everything


@pytest.mark.parametrize("budget, said", [
    ({"usd": 1, "upstream": "nope"}, "budgets.b.upstream = 'nope': expected one of"),
    ({"usd": 1, "key": "nope"}, "budgets.b.key = 'nope': expected one of the proxy keys"),
    ({"usd": 0}, "budgets.b.usd = 0: expected a positive amount of US dollars"),
    ({"usd": 1, "emails": ["ops"]}, "budgets.b.emails = 'ops': expected names from [alerts.email]"),
    ({"usd": 1, "alert_at": [1.5]}, "budgets.b.alert_at = [1.5]: expected a list of fractions of the ceiling"),
])
def test_a_budget_that_cannot_work_is_one_line_of_error(raw_config: dict[str, Any], budget: dict[str, Any],
                                                        said: str) -> None:
    from proxy import config as config_mod

    raw_config["budgets"] = {"b": budget}
    with pytest.raises(config_mod.ConfigError, match=said.replace("[", r"\[").replace("]", r"\]")):
        config_mod.parse(raw_config)


def test_a_monthly_budget_needs_the_months_rows(raw_config: dict[str, Any]) -> None:
    from proxy import config as config_mod

    raw_config["budgets"] = {"b": {"usd": 1}}
    raw_config["ledger"] = {"keep_raw_days": 7}
    with pytest.raises(config_mod.ConfigError, match="ledger.keep_raw_days = 7.0: expected 32 or more"):
        config_mod.parse(raw_config)
