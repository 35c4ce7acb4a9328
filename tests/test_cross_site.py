"""No cross-site use: the Host allow-list, cross-origin admin writes, browser pages and CORS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from .conftest import Proxy
from .fake_upstream import FakeUpstream

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hola"}]}
APP = "https://app.example.org"


@pytest.fixture
async def guarded(raw_config: dict[str, Any]) -> AsyncIterator[Proxy]:
    raw_config["server"]["cors_origins"] = [APP]
    proxy = Proxy(raw_config)
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.mark.parametrize("host,status", [("evil.example", 421), ("evil.example:5000", 421), ("127.0.0.2", 421),
                                         ("localhost", 200), ("127.0.0.1:1234", 200), ("[::1]:5000", 200)])
async def test_a_host_outside_the_allow_list_is_misdirected(guarded: Proxy, fake: FakeUpstream, host: str,
                                                            status: int) -> None:
    async with aiohttp.ClientSession() as s:
        for method, path, body in (("GET", "/stats", None), ("POST", "/v1/chat/completions", CHAT)):
            async with s.request(method, guarded.url + path, json=body, headers={"Host": host}) as r:
                assert r.status == status, (path, host)
                if status == 421:
                    assert "allowed_hosts" in (await r.json())["error"]["message"]
    assert fake.requests == (1 if status == 200 else 0)


@pytest.mark.parametrize("path", ["/metrics/reset", "/dashboard/login", "/dashboard/logout"])
@pytest.mark.parametrize("headers", [{"Origin": "http://127.0.0.1:1"}, {"Origin": "https://evil.example"},
                                     {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}])
async def test_admin_writes_from_another_origin_are_refused(guarded: Proxy, path: str,
                                                            headers: dict[str, str]) -> None:
    epoch = guarded.accounting.current.epoch_started
    async with aiohttp.ClientSession() as s:
        async with s.post(guarded.url + path, data={"token": "x"}, headers=headers, allow_redirects=False) as r:
            assert r.status == 403 and "another origin" in (await r.json())["error"]["message"]
    assert guarded.accounting.current.epoch_started == epoch  # no reset happened


async def test_admin_writes_from_the_same_origin_or_a_non_browser_pass(guarded: Proxy) -> None:
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Origin": guarded.url, "Sec-Fetch-Site": "same-origin"}):
            async with s.post(guarded.url + "/metrics/reset", headers=headers) as r:
                assert r.status == 200


@pytest.mark.parametrize("content_type,origin", [("text/plain", "https://evil.example"), ("text/plain", None),
                                                 ("application/x-www-form-urlencoded", None),
                                                 ("application/json", "https://evil.example"),
                                                 ("application/json", "http://127.0.0.1:1")])
async def test_a_pages_request_never_reaches_the_upstream(guarded: Proxy, fake: FakeUpstream, content_type: str,
                                                          origin: str | None) -> None:
    """What a web page can send without asking (no-cors, text/plain) and what it can send from
    an origin not listed: neither spends the operator's key."""
    import orjson

    headers = {"Content-Type": content_type, **({"Origin": origin} if origin else {})}
    async with aiohttp.ClientSession() as s:
        async with s.post(guarded.url + "/v1/chat/completions", data=orjson.dumps(CHAT), headers=headers) as r:
            assert r.status == (415 if origin is None else 403)
            assert "Access-Control-Allow-Origin" not in r.headers
    assert fake.requests == 0


async def test_a_listed_origin_gets_cors_and_its_preflight_answered(guarded: Proxy, fake: FakeUpstream) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.options(guarded.url + "/v1/chat/completions", headers={
                "Origin": APP, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"}) as r:
            assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == APP
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert "content-type" in r.headers["Access-Control-Allow-Headers"]
            assert "x-tollgate-cache" in r.headers["Access-Control-Allow-Headers"]
        async with s.options(guarded.url + "/v1/chat/completions", headers={
                "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
        async with s.post(guarded.url + "/v1/chat/completions", json=CHAT, headers={"Origin": APP}) as r:
            assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == APP
            assert r.headers["Vary"] == "Origin"
            assert "x-tollgate-cache" in r.headers["Access-Control-Expose-Headers"]
    assert fake.requests == 1
