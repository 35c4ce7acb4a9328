"""Alerts to webhooks, the WhatsApp stats command, and the access log."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from proxy.access import AccessLog
from proxy.keys import ACCESS_LOG


from .conftest import CLOUD_KEY, Proxy, Serve, logged, settled, write_config
from .fake_upstream import Behavior, FakeUpstream


class Receiver:
    """A local webhook receiver: records what is posted; /slow never answers; /fail answers 500."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, Any]] = []
        self.arrived = asyncio.Condition()
        self.release = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/{name}", self.handle)
        self.server = TestServer(self.app, host="127.0.0.1")

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        async with self.arrived:
            self.posts.append((name, await request.json()))
            self.arrived.notify_all()
        if name == "slow":
            await self.release.wait()
        return web.Response(status=500 if name == "fail" else 204)

    async def wait_for(self, count: int) -> None:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.posts) >= count), 10)

    def url(self, name: str) -> str:
        return str(self.server.make_url(f"/{name}"))


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.server.start_server()
    yield r
    r.release.set()
    await r.server.close()


@pytest.fixture
async def alerting(raw_config: dict[str, Any], receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Proxy]:
    for name in ("slack", "discord", "json", "slow", "fail"):
        monkeypatch.setenv(f"TG_HOOK_{name.upper()}", receiver.url(name))
    raw_config["alerts"] = {
        "check_interval_s": 3600,
        "webhooks": {name: {"url_env": f"TG_HOOK_{name.upper()}", "timeout_s": 2,
                            "format": name if name in ("slack", "discord") else "json"}
                     for name in ("slack", "discord", "json", "slow", "fail")},
        "rules": [
            {"name": "Costo", "metric": "cost_usd", "above": 0.01, "webhooks": ["slack"]},
            {"name": "Tokens", "metric": "total_tokens", "above": 400, "webhooks": ["discord"]},
            {"name": "RPD", "metric": "daily_requests_pct", "above": 2, "webhooks": ["json"]},
        ],
    }
    p = Proxy(raw_config)
    await p.start()
    yield p
    await p.stop()


async def cloud_call(proxy: Proxy, status: int = 200) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": []}) as r:
            assert r.status == status
            await r.read()


async def test_alerts_fire_once_per_crossing_and_rearm(alerting: Proxy, fake: FakeUpstream, receiver: Receiver,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    fake.behavior = Behavior(prompt_tokens=100, chunks=5, completion_per_chunk=10)  # 150 tokens, $0.006 a call
    caplog.set_level(logging.WARNING, "tollgate.alerts")
    await cloud_call(alerting)                       # $0.006, 150 tokens, 1/150 = 0.7% of the day
    await cloud_call(alerting)                       # $0.012 > 0.01: Costo fires
    await receiver.wait_for(1)
    await cloud_call(alerting)                       # 450 tokens > 400, 3/150 = 2% (not above 2)
    await receiver.wait_for(2)
    await cloud_call(alerting)                       # 4/150 = 2.7% > 2: RPD fires
    await receiver.wait_for(3)
    for _ in range(3):                               # still above every threshold: nothing new
        await cloud_call(alerting)
    stats = await settled(alerting)                  # a request/response round trip after the last call
    assert [name for name, _ in receiver.posts] == ["slack", "discord", "json"]
    slack, discord, generic = (body for _, body in receiver.posts)
    assert set(slack) == {"text"} and "Costo" in slack["text"] and "0.012" in slack["text"]
    assert set(discord) == {"content"} and "Tokens" in discord["content"]
    assert generic["alert"] == "RPD" and generic["metric"] == "daily_requests_pct"
    assert generic["value"] == pytest.approx(400 / 150) and generic["threshold"] == 2
    assert sum("ALERTA" in r.getMessage() for r in caplog.records) == 3
    assert stats["total_requests"] == 7
    # A reset brings cost and tokens back under: the rules re-arm and fire again on the next crossing.
    async with aiohttp.ClientSession() as s:
        async with s.post(alerting.url + "/metrics/reset") as r:
            assert r.status == 200
    await cloud_call(alerting)                       # re-arms (cost $0.006 <= 0.01)
    await cloud_call(alerting)                       # crosses again
    await receiver.wait_for(4)
    assert [name for name, _ in receiver.posts] == ["slack", "discord", "json", "slack"]


async def test_slow_and_failing_webhooks_never_hold_calls(raw_config: dict[str, Any], fake: FakeUpstream,
                                                          receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TG_HOOK_SLOW", receiver.url("slow"))
    monkeypatch.setenv("TG_HOOK_FAIL", receiver.url("fail"))
    raw_config["alerts"] = {
        "webhooks": {"slow": {"url_env": "TG_HOOK_SLOW", "timeout_s": 30},
                     "fail": {"url_env": "TG_HOOK_FAIL", "format": "slack"}},
        "rules": [{"name": "any", "metric": "total_tokens", "above": 0, "webhooks": ["slow", "fail"]}],
    }
    proxy = Proxy(raw_config)
    await proxy.start()
    try:
        await cloud_call(proxy)
        await receiver.wait_for(1)                   # the slow hook has the alert and is holding it
        assert receiver.posts[0][0] == "slow"
        for _ in range(5):                           # calls go on while it hangs
            await cloud_call(proxy)
        assert len(fake.seen) == 6
        failed = logged("tollgate.alerts", "failed to take alert")
        receiver.release.set()
        await receiver.wait_for(2)                   # then the failing one gets its turn, answers 500
        failure = await asyncio.wait_for(failed, 10)  # what the operator reads in the log
        assert "'fail'" in failure and "500" in failure
        assert receiver.url("fail") not in failure   # the URL is a secret
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.url + "/metrics") as r:
                families = {f.name: f for f in text_string_to_metric_families(await r.text())}
        deliveries = {x.labels["result"]: x.value for x in families["tollgate_alert_deliveries"].samples
                      if x.name.endswith("_total")}
        assert deliveries == {"sent": 1.0, "failed": 1.0}
    finally:
        await proxy.stop()


@pytest.mark.parametrize("stream", [False, True])
async def test_stats_command_in_openai_dialect(proxy: Proxy, fake: FakeUpstream, raw_config: dict[str, Any],
                                               stream: bool) -> None:
    raw_config["upstreams"]["gpt4o_cloud"]["limits"] = {"rpm": 1}
    await proxy.restart()
    await cloud_call(proxy)                          # the minute's only place is taken
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/stats?format=text") as r:
            expected = await r.text()
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    messages: Any = [{"role": "system", "content": "Eres Raymundo"}, {"role": "user", "content": " /Raymundo Stats "}]
    if stream:
        chunks = [c async for c in await client.chat.completions.create(model="gpt-4o", messages=messages, stream=True)]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        with_usage = [c async for c in await client.chat.completions.create(
            model="gpt-4o", messages=messages, stream=True, stream_options={"include_usage": True})]
        assert with_usage[-1].usage is not None and with_usage[-1].choices == []
    else:
        reply = await client.chat.completions.create(model="gpt-4o", messages=messages)
        text = reply.choices[0].message.content or ""
        assert reply.choices[0].finish_reason == "stop"
    await client.close()
    assert text == expected and text.startswith("📊 **ESTADÍSTICAS DE RAYMUNDO**")
    assert len(fake.seen) == 1                       # never forwarded
    assert (await settled(proxy))["total_requests"] == 1


async def test_stats_command_in_ollama_dialect(proxy: Proxy, fake: FakeUpstream) -> None:
    client = ollama.AsyncClient(host=proxy.url)
    messages = [{"role": "user", "content": "/raymundo estado"}]
    whole = await client.chat(model="llama3.2", messages=messages)
    parts = [p async for p in await client.chat(model="llama3.2", messages=messages, stream=True)]
    generated = await client.generate(model="llama3.2", prompt="/raymundo estadisticas")
    await client.close()  # type: ignore[no-untyped-call]  # ollama's close() has no annotations
    assert whole.message.content and whole.message.content.startswith("📊 **ESTADÍSTICAS DE RAYMUNDO**")
    assert "".join(p.message.content or "" for p in parts) == whole.message.content and parts[-1].done
    assert generated.response == whole.message.content
    assert fake.seen == []
    assert (await settled(proxy))["total_requests"] == 0


async def test_access_log_one_line_per_call_without_text_or_keys(proxy: Proxy, fake: FakeUpstream,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "tollgate.access")
    secret_text = "mi-contraseña-es-hunter2"
    async with aiohttp.ClientSession() as s:
        for path, body in (("/v1/chat/completions", {"model": "gpt-4o", "user": "ana",
                                                      "messages": [{"role": "user", "content": secret_text}]}),
                           ("/api/generate", {"model": "llama3.2", "prompt": secret_text, "stream": False})):
            async with s.post(proxy.url + path, json=body, headers={"Authorization": "Bearer bot-key-xyz"}) as r:
                await r.read()
    await settled(proxy)
    assert proxy.server is not None
    proxy.server.app[ACCESS_LOG].flush()  # what the app does twice a second
    lines = [line for r in caplog.records if r.name == "tollgate.access" for line in r.getMessage().splitlines()]
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert {k: first[k] for k in ("upstream", "model", "type", "user", "status", "outcome", "estimated")} == {
        "upstream": "gpt4o_cloud", "model": "gpt-4o", "type": "chat", "user": "ana", "status": 200,
        "outcome": "ok", "estimated": False}
    assert first["prompt_tokens"] > 0 and first["latency_ms"] >= 0 and first["time"].endswith("+00:00")
    everything = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (secret_text, "bot-key-xyz", CLOUD_KEY):
        assert secret not in everything


async def test_tollgate_serve_writes_one_access_line_per_call_to_stderr(raw_config: dict[str, Any], tmp_path: Path,
                                                                        fake: FakeUpstream) -> None:
    """The lines are gathered and written in batches; the operator still reads one JSON object
    per line, one line per call, within half a second."""
    async with Serve(write_config(raw_config, tmp_path)) as serve:
        async with aiohttp.ClientSession() as s:
            for n in range(3):
                body = {"model": "gpt-4o", "user": f"u{n}", "messages": [{"role": "user", "content": "hola"}]}
                async with s.post(serve.url + "/v1/chat/completions", json=body) as r:
                    assert r.status == 200
        await serve.logged('"outcome":"ok"', times=3)
        assert await serve.signal(signal.SIGTERM) == 0
    calls = [json.loads(line) for line in serve.log if line.startswith("{")]
    assert [(c["user"], c["outcome"], c["status"]) for c in calls] == [("u0", "ok", 200), ("u1", "ok", 200),
                                                                       ("u2", "ok", 200)]


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_the_access_logs_time_is_isoformat_to_the_millisecond(ts: float) -> None:
    assert AccessLog()._time(ts) == datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


async def test_error_rate_and_tpm_rules(raw_config: dict[str, Any], fake: FakeUpstream, receiver: Receiver,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TG_HOOK_JSON", receiver.url("json"))
    raw_config["upstreams"]["gpt4o_cloud"]["limits"] = {"tpm": 1000}
    raw_config["alerts"] = {
        "webhooks": {"json": {"url_env": "TG_HOOK_JSON"}},
        "rules": [{"name": "errores", "metric": "error_rate_pct", "above": 40, "window_min": 5, "webhooks": ["json"]},
                  {"name": "tpm", "metric": "tpm_pct", "above": 50, "webhooks": ["json"]}],
    }
    proxy = Proxy(raw_config)
    await proxy.start()
    try:
        fake.behavior = Behavior(prompt_tokens=100, chunks=5, completion_per_chunk=10)
        await cloud_call(proxy)                      # 150 tokens: 15% of the minute's 1,000
        await cloud_call(proxy)                      # 30%
        fake.behavior = Behavior(status=503)
        await cloud_call(proxy, 503)                 # 1 error in 3: 33%
        await cloud_call(proxy, 503)                 # 2 in 4: 50% > 40: fires
        await receiver.wait_for(1)
        fake.behavior = Behavior(prompt_tokens=300, chunks=1, completion_per_chunk=1)
        await cloud_call(proxy)                      # 601 tokens: 60% > 50: fires
        await receiver.wait_for(2)
    finally:
        await proxy.stop()
    assert [(body["alert"], body["metric"]) for _, body in receiver.posts] == [
        ("errores", "error_rate_pct"), ("tpm", "tpm_pct")]
    assert receiver.posts[0][1]["value"] == 50.0 and receiver.posts[1][1]["value"] == pytest.approx(60.1)
