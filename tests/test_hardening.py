"""Attacks and faults: admin auth, secrets that never leak, no open relay, upstream misbehaviour."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from .conftest import CLOUD_KEY, Proxy
from .fake_upstream import Behavior, FakeUpstream

ADMIN = "tg-admin-7f3a9c"
BOT_KEY = "tg-bot-key-51c2e8"

ADMIN_ENDPOINTS = [("GET", "/stats"), ("GET", "/stats?format=text"), ("GET", "/stats/history"),
                   ("GET", "/stats/export.csv"), ("GET", "/stats/snapshot.csv"), ("GET", "/metrics"),
                   ("POST", "/metrics/reset"), ("GET", "/dashboard")]


@pytest.fixture
async def locked(raw_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Proxy]:
    monkeypatch.setenv("TG_TEST_ADMIN", ADMIN)
    monkeypatch.setenv("TG_TEST_BOT_KEY", BOT_KEY)
    raw_config["server"]["admin_token_env"] = "TG_TEST_ADMIN"
    raw_config["keys"] = {"bot": {"key_env": "TG_TEST_BOT_KEY", "user": "raymundo"}}
    p = Proxy(raw_config)
    await p.start()
    yield p
    await p.stop()


async def test_admin_endpoints_need_the_token(locked: Proxy) -> None:
    async with aiohttp.ClientSession() as s:
        for method, path in ADMIN_ENDPOINTS:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN}"},
                            {"Authorization": f"Bearer {BOT_KEY}"}):
                async with s.request(method, locked.url + path, headers=headers) as r:
                    assert r.status == 401, (method, path, headers)
            async with s.request(method, locked.url + path, headers={"Authorization": f"Bearer {ADMIN}"},
                                 allow_redirects=False) as r:
                assert r.status == 200, (method, path)
        async with s.get(locked.url + "/healthz") as r:
            assert r.status == 200


async def test_no_secret_appears_anywhere(locked: Proxy, fake: FakeUpstream, raw_config: dict[str, Any],
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bodies: list[str] = []
    bot = {"Authorization": f"Bearer {BOT_KEY}"}
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession() as s:
        async def call(method: str, path: str, headers: dict[str, str], **kw: Any) -> None:
            async with s.request(method, locked.url + path, headers=headers, **kw) as r:
                bodies.append(await r.text())

        fake.behavior = Behavior(prompt_tokens=5, chunks=2)
        await call("POST", "/v1/chat/completions", bot, json={"model": "gpt-4o", "messages": []})
        await call("POST", "/v1/chat/completions", bot, json={"model": "gpt-4o", "messages": [], "stream": True})
        await call("POST", "/v1/chat/completions", {"Authorization": f"Bearer {BOT_KEY}x"}, json={"model": "gpt-4o"})
        await call("POST", "/v1/chat/completions", {**bot, "Content-Type": "application/json"}, data=b"{broken")
        fake.behavior = Behavior(status=401)  # the upstream rejects: its error body comes back
        await call("POST", "/v1/chat/completions", bot, json={"model": "gpt-4o", "messages": []})
        fake.behavior = Behavior(raw_body=b"<html>oops</html>", content_type="text/html")
        await call("POST", "/v1/chat/completions", bot, json={"model": "gpt-4o", "messages": []})
        await call("POST", "/api/chat", bot, json={"model": "llama3", "stream": False, "messages": []})
        await call("GET", "/v1/models", bot)
        for method, path in ADMIN_ENDPOINTS:
            await call(method, path, admin)
    assert all(seen.headers.get("Authorization") in (None, f"Bearer {CLOUD_KEY}") for seen in fake.seen)
    await locked.stop()  # flushes the ledger and writes metrics.json
    data_dir = Path(raw_config["server"]["data_dir"])
    files = b"".join(p.read_bytes() for p in data_dir.iterdir())
    logs = "\n".join(r.getMessage() + str(r.exc_info or "") for r in caplog.records)
    for secret in (CLOUD_KEY, BOT_KEY, ADMIN):
        assert secret not in logs
        assert secret.encode() not in files
        assert all(secret not in body for body in bodies), secret
    assert "bot" in files.decode("utf-8", "replace")  # the key's name is kept, for limits


async def test_paths_never_leave_the_configured_base_url(proxy: Proxy, fake: FakeUpstream) -> None:
    tricks = ["/v1/http://evil.example/x", "/v1//evil.example/x", "/v1/x/..%2f..%2fsecret",
              "/api/%2e%2e/%2e%2e/etc/passwd", "/api/x/%2E%2E", "/v1/%2F%2Fevil.example", "/v1/a\\..\\b",
              "/t/chat/v1/x/%2e%2e/y"]
    async with aiohttp.ClientSession() as s:
        for path in tricks:
            async with s.get(URL(proxy.url + path, encoded=True)) as r:
                assert r.status == 400, path
    assert fake.seen == []


async def test_hop_by_hop_and_client_credentials_are_not_forwarded(proxy: Proxy, fake: FakeUpstream) -> None:
    headers = {"Authorization": "Bearer bot-own-key", "Proxy-Authorization": "Basic eA==", "Cookie": "a=b",
               "X-Forwarded-For": "10.0.0.1", "TE": "trailers", "X-Api-Key": "k", "api-key": "k2",
               "X-Tollgate-Type": "chat", "X-Custom-Trace": "abc123"}
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": []},
                          headers=headers) as r:
            assert r.status == 200
    sent = {k.lower(): v for k, v in fake.seen[0].headers.items()}
    for name in ("proxy-authorization", "cookie", "x-forwarded-for", "te", "x-api-key", "api-key", "x-tollgate-type",
                 "x-custom-trace"):  # the last: not on the allow-list, nor in this upstream's forward_headers
        assert name not in sent, name
    assert sent["authorization"] == f"Bearer {CLOUD_KEY}"


@pytest.mark.parametrize("behavior, outcome, message", [
    (Behavior(raw_body=b'{"choices": [', content_type="application/json"), "bad_upstream_response", "malformed JSON"),
    (Behavior(raw_body=b"<html>Gateway</html>", content_type="text/html"), "bad_upstream_response", "text/html"),
    (Behavior(raw_body=b'{"x": "' + b"y" * 5000 + b'"}'), "response_too_large", "max_response_bytes"),
])
async def test_upstream_faults_become_502_with_a_ledger_row(proxy: Proxy, fake: FakeUpstream,
                                                            raw_config: dict[str, Any], behavior: Behavior,
                                                            outcome: str, message: str) -> None:
    raw_config["upstreams"]["gpt4o_cloud"]["max_response_bytes"] = 4096
    await proxy.restart()
    fake.behavior = behavior
    seen = proxy.records()
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": []}) as r:
            assert r.status == 502
            body = await r.json()
    assert message in body["error"]["message"] and body["error"]["code"] in (outcome, "upstream_" + outcome,
                                                                             "bad_upstream_response")
    rec = (await seen.wait_for(1))[0]
    assert rec.outcome == outcome and rec.status == 502


async def test_oversized_stream_is_cut_with_an_error_event(proxy: Proxy, fake: FakeUpstream,
                                                           raw_config: dict[str, Any]) -> None:
    raw_config["upstreams"]["gpt4o_cloud"]["max_response_bytes"] = 2000
    await proxy.restart()
    fake.behavior = Behavior(chunks=200)
    seen = proxy.records()
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions",
                          json={"model": "gpt-4o", "messages": [], "stream": True}) as r:
            text = await r.text()
    assert "max_response_bytes" in text.strip().splitlines()[-1]
    rec = (await seen.wait_for(1))[0]
    assert rec.outcome == "response_too_large" and rec.estimated


async def test_client_hanging_up_cancels_the_upstream_call_at_once(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.behavior = Behavior(chunks=6, stall_after_chunks=2)
    seen = proxy.records()
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions",
                          json={"model": "gpt-4o", "stream": True, "messages": []}) as r:
            await r.content.readline()
    # The upstream is still stalled (nothing more to write that could fail): only cancellation
    # on disconnect can end its request.
    rec = (await seen.wait_for(1))[0]
    await asyncio.wait_for(fake.cancelled.wait(), 10)
    assert rec.outcome == "cancelled" and rec.status == 499
