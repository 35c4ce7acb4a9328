"""Limits enforced through the proxy: exact under concurrency, clean 429s, waiting, fallback."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from proxy.keys import ADMISSION

from .conftest import Proxy, settled, stats_now
from .fake_upstream import Behavior, FakeUpstream

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hola"}]}


class RealClock:
    """Real time plus an offset the test can move: the SDK's own retry sleeps stay real."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def set_limits(raw: dict[str, Any], **limits: Any) -> None:
    raw["upstreams"]["gpt4o_cloud"]["limits"] = limits


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest, raw_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs against both engines: this process's windows, and Redis's."""
    if request.param == "redis":
        monkeypatch.setenv("TOLLGATE_TEST_REDIS", request.getfixturevalue("redis_server"))
        raw_config["limits"] = {**raw_config.get("limits", {}), "backend": "redis"}
        raw_config["redis"] = {"url_env": "TOLLGATE_TEST_REDIS", "prefix": f"t{uuid.uuid4().hex}"}
    return str(request.param)


@pytest.fixture
async def make_proxy(raw_config: dict[str, Any], backend: str) -> AsyncIterator[Any]:
    started: list[Proxy] = []

    async def make(clock: Any = None) -> Proxy:
        if clock is not None and backend == "redis":
            pytest.skip("moves the proxy's clock, and Redis keeps its own")
        p = Proxy(raw_config, clock)
        await p.start()
        started.append(p)
        return p

    yield make
    for p in started:
        await p.stop()


async def burst(url: str, n: int, body: dict[str, Any], release: asyncio.Event | None = None,
                expect_refused: int | None = None) -> list[int]:
    """Send n calls at once; with `release`, open it once `expect_refused` 429s came back."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def one() -> int:
            async with s.post(url, json=body) as r:
                await r.read()
                return r.status

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        statuses: list[int] = []
        for done in asyncio.as_completed(tasks):
            statuses.append(await done)
            if release is not None and statuses.count(429) == expect_refused:
                release.set()
        return statuses


@pytest.mark.parametrize("limits, admitted", [
    ({"rpm": 15}, 15),
    ({"rpd": 150}, 150),
    ({"concurrency": 5}, 5),
    # each call: 6 tokens of prompt framing (empty message) + max_tokens 94 = 100
    ({"tpm": 1000}, 10),
])
async def test_exact_under_200_concurrent_callers(raw_config: dict[str, Any], fake: FakeUpstream,
                                                   make_proxy: Any, limits: dict[str, int], admitted: int) -> None:
    set_limits(raw_config, **limits)
    proxy = await make_proxy()
    # Admitted calls are held at the upstream until every refusal is back, so no call ends
    # (and gives back a place or reconciles its tokens) while the others are decided.
    fake.behavior = Behavior(stall_before_headers=True)
    body = {"model": "gpt-4o", "max_tokens": 94, "messages": [{"role": "user", "content": ""}]}
    statuses = await burst(proxy.url + "/v1/chat/completions", 200, body, fake.stall, 200 - admitted)
    assert statuses.count(200) == admitted and statuses.count(429) == 200 - admitted
    assert len(fake.seen) == admitted
    stats = await settled(proxy)
    # Refusals are counted by reason, but are neither calls, errors, nor ledger rows.
    assert stats["detail"]["refused"]["rate_limited"] == 200 - admitted
    assert stats["total_requests"] == admitted and stats["errores"] == 0 and stats["tasa_exito"] == "100.0%"
    await proxy.ledger.flush()
    assert proxy.ledger.count() == admitted


async def test_429_shapes_and_headers(raw_config: dict[str, Any], fake: FakeUpstream, make_proxy: Any) -> None:
    set_limits(raw_config, rpm=1, tpm=150000)
    raw_config["upstreams"]["ollama_local"]["limits"] = {"rpm": 1}
    proxy = await make_proxy()
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            assert r.headers["x-ratelimit-limit-requests"] == "1"
            assert r.headers["x-ratelimit-remaining-requests"] == "0"
            assert r.headers["x-ratelimit-limit-tokens"] == "150000"
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 429
            body = await r.json()
            assert body["error"]["code"] == "rate_limit_exceeded"
            assert body["error"]["type"] == "requests_per_minute"
            assert body["error"]["param"] is None and "1 requests per minute" in body["error"]["message"]
            retry = int(r.headers["Retry-After"])
            assert 55 <= retry <= 60 and 55_000 <= int(r.headers["retry-after-ms"]) <= 60_000
            assert r.headers["x-ratelimit-remaining-requests"] == "0"
            assert r.headers["x-ratelimit-reset-requests"].endswith("s")
            assert "x-ratelimit-reset-tokens" in r.headers
            assert "x-should-retry" not in r.headers
        for _ in range(2):
            async with s.post(proxy.url + "/api/chat", json={"model": "llama3", "stream": False, "messages": []}) as r:
                last = r.status, await r.json()
        assert last[0] == 429 and isinstance(last[1]["error"], str) and "per minute" in last[1]["error"]
    assert len(fake.seen) == 2


async def test_openai_sdk_retries_a_short_wait_and_not_a_daily_one(raw_config: dict[str, Any], fake: FakeUpstream,
                                                                   make_proxy: Any) -> None:
    set_limits(raw_config, rpm=2, rpd=3)
    clock = RealClock()
    proxy = await make_proxy(clock)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=2)

    def ask() -> str:
        reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hola"}])
        return reply.choices[0].message.content or ""

    for _ in range(2):
        await asyncio.to_thread(ask)
    # Move the proxy's clock so the first admission leaves the minute window in about 0.8 s:
    # the SDK's automatic retry honours Retry-After and succeeds on its own.
    clock.offset = 59.2
    assert await asyncio.to_thread(ask) == "w0 w1 w2 w3 "
    stats = await settled(proxy)
    assert stats["detail"]["refused"]["rate_limited"] >= 1
    refused_before = stats["detail"]["refused"]["rate_limited"]
    # The daily quota (3) is spent: the next wait is hours, so the SDK must not retry at all.
    with pytest.raises(openai.RateLimitError) as info:
        await asyncio.to_thread(ask)
    assert info.value.response.headers["x-should-retry"] == "false"
    assert info.value.body["type"] == "requests_per_day"  # type: ignore[index]
    stats = await settled(proxy)
    assert stats["detail"]["refused"]["rate_limited"] == refused_before + 1
    client.close()


async def test_per_request_caps(raw_config: dict[str, Any], fake: FakeUpstream, make_proxy: Any) -> None:
    set_limits(raw_config, max_input_tokens=50, max_output_tokens=100)
    proxy = await make_proxy()
    async with aiohttp.ClientSession() as s:
        big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "palabra " * 200}]}
        async with s.post(proxy.url + "/v1/chat/completions", json=big) as r:
            assert r.status == 413
            message = (await r.json())["error"]["message"]
            assert "50 input tokens per request" in message and "max_input_tokens" in message
        assert fake.seen == []
        async with s.post(proxy.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 500}) as r:
            assert r.status == 200
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
    assert fake.seen[0].body["max_tokens"] == 100  # clamped
    assert fake.seen[1].body["max_tokens"] == 100  # a call asking nothing is held to the cap too


async def test_output_cap_can_reject(raw_config: dict[str, Any], fake: FakeUpstream, make_proxy: Any) -> None:
    set_limits(raw_config, max_output_tokens=100)
    raw_config["limits"] = {"output_cap": "reject"}
    proxy = await make_proxy()
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json={**CHAT, "max_completion_tokens": 500}) as r:
            assert r.status == 400 and "100 output tokens per request" in (await r.json())["error"]["message"]
    assert fake.seen == []


async def test_wait_mode_is_first_come_first_served_and_a_leaver_gives_up_its_place(
        raw_config: dict[str, Any], fake: FakeUpstream, make_proxy: Any) -> None:
    set_limits(raw_config, concurrency=1)
    raw_config["limits"] = {"on_limit": "wait", "max_wait_s": 30}
    proxy = await make_proxy()
    gate = asyncio.Event()
    fake.behavior = Behavior(chunks=2, gate_before_last=gate)
    url = proxy.url + "/v1/chat/completions"
    order: list[str] = []

    async def call(name: str) -> int:
        body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": name}]}
        async with aiohttp.ClientSession() as s:
            async with s.post(url, json=body) as r:
                await r.read()
                order.append(name)
                return r.status

    first = asyncio.create_task(call("A"))
    await fake.first_chunk_sent.wait()          # A holds the only place, mid-stream
    b = asyncio.create_task(call("B"))
    leaver = asyncio.create_task(call("L"))
    c = asyncio.create_task(call("C"))
    lines = proxy.server.app[ADMISSION].lines
    async with lines.waiting_changed:           # until B, L and C are in line: B holds its lock,
        await asyncio.wait_for(lines.waiting_changed.wait_for(lambda: lines.waiting == 2), 10)
    assert lines.busy("upstream:gpt4o_cloud")   # L and C queue behind it
    leaver.cancel()                             # L's client goes away while waiting
    gate.set()
    assert await first == 200 and await b == 200 and await c == 200
    assert order == ["A", "B", "C"]
    contents = [seen.body["messages"][0]["content"] for seen in fake.seen]
    assert contents == ["A", "B", "C"]          # L never reached the upstream


async def test_a_caller_in_line_goes_the_moment_a_place_is_given_back(
        raw_config: dict[str, Any], fake: FakeUpstream, make_proxy: Any) -> None:
    """A concurrency place frees at no time anyone could promise: the caller waiting for it is
    told when the call holding it ends, not when concurrency_retry_s (longer than this test
    waits) would have it look again."""
    set_limits(raw_config, concurrency=1)
    raw_config["limits"] = {"on_limit": "wait", "max_wait_s": 120, "concurrency_retry_s": 60}
    proxy = await make_proxy()
    gate = asyncio.Event()
    fake.behavior = Behavior(chunks=2, gate_before_last=gate)
    url = proxy.url + "/v1/chat/completions"

    async def call(name: str) -> int:
        body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": name}]}
        async with aiohttp.ClientSession() as s:
            async with s.post(url, json=body) as r:
                await r.read()
                return r.status

    first = asyncio.create_task(call("A"))
    await fake.first_chunk_sent.wait()          # A holds the only place, mid-stream
    second = asyncio.create_task(call("B"))
    lines = proxy.server.app[ADMISSION].lines
    async with lines.waiting_changed:           # B has taken the line and waits for a place
        await asyncio.wait_for(lines.waiting_changed.wait_for(
            lambda: lines.busy("upstream:gpt4o_cloud") is not None), 10)
    gate.set()
    assert await first == 200
    assert await asyncio.wait_for(second, 10) == 200
    assert [seen.body["messages"][0]["content"] for seen in fake.seen] == ["A", "B"]


async def test_fallback_to_local_when_cloud_quota_is_out(raw_config: dict[str, Any], fake: FakeUpstream,
                                                         make_proxy: Any) -> None:
    set_limits(raw_config, rpm=1)
    raw_config["upstreams"]["gpt4o_cloud"].update(fallback="ollama_local", fallback_model="llama3.2")
    proxy = await make_proxy()
    fake.behavior = Behavior(prompt_tokens=10, chunks=2, completion_per_chunk=5)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    first = await client.chat.completions.with_raw_response.create(**CHAT)  # type: ignore[call-overload]
    assert first.headers["X-Tollgate-Upstream"] == "gpt4o_cloud"
    second = await client.chat.completions.with_raw_response.create(**CHAT)  # type: ignore[call-overload]
    assert second.headers["X-Tollgate-Upstream"] == "ollama_local"
    assert second.headers["X-Tollgate-Fallback-From"] == "gpt4o_cloud"
    assert second.parse().choices[0].message.content == "w0 w1 "
    stream = await client.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "w0 w1 "
    await client.close()
    assert [s.path for s in fake.seen] == ["/chat/completions", "/v1/chat/completions", "/v1/chat/completions"]
    assert fake.seen[1].body["model"] == "llama3.2" and "Authorization" not in fake.seen[1].headers
    stats = await settled(proxy)
    assert stats["tokens"] == {"gpt4o_cloud": 20, "ollama_local": 40, "total": 60}
    assert stats["detail"]["fallbacks"] == {"gpt4o_cloud": 2}
    assert stats["detail"]["by_upstream"]["ollama_local"]["cost_usd"] == 0


async def test_fallback_when_cloud_answers_429_or_5xx(raw_config: dict[str, Any], fake: FakeUpstream,
                                                      make_proxy: Any) -> None:
    raw_config["upstreams"]["gpt4o_cloud"].update(fallback="ollama_local", fallback_model="llama3.2")
    proxy = await make_proxy()
    fake.by_model["openai/gpt-4o"] = Behavior(status=503)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200 and r.headers["X-Tollgate-Fallback-From"] == "gpt4o_cloud"
        fake.by_model["openai/gpt-4o"] = Behavior(status=429, retry_after="30")
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200 and r.headers["X-Tollgate-Upstream"] == "ollama_local"
        # The cloud said to wait 30 s: the next call goes straight to the fallback.
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200 and r.headers["X-Tollgate-Upstream"] == "ollama_local"
    assert [s.path for s in fake.seen] == ["/chat/completions", "/v1/chat/completions",
                                          "/chat/completions", "/v1/chat/completions", "/v1/chat/completions"]


async def test_a_fallback_that_fails_too_names_both_upstreams(raw_config: dict[str, Any], fake: FakeUpstream,
                                                              make_proxy: Any, refused_port: int) -> None:
    raw_config["upstreams"]["gpt4o_cloud"].update(fallback="ollama_local", fallback_model="llama3.2")
    raw_config["upstreams"]["ollama_local"]["base_url"] = f"http://127.0.0.1:{refused_port}"
    set_limits(raw_config, rpm=1)
    raw_config["upstreams"]["ollama_local"]["limits"] = {"rpm": 1}
    proxy = await make_proxy()
    fake.by_model["openai/gpt-4o"] = Behavior(status=503)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            message = (await r.json())["error"]["message"]
            assert r.status == 502
            assert message.startswith("Upstream 'gpt4o_cloud' answered HTTP 503. Its fallback: "
                                      "Upstream 'ollama_local' is unreachable"), message
        # Both are out of quota now: the 429 says why each refused.
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            message = (await r.json())["error"]["message"]
            assert r.status == 429
            assert message.startswith("Upstream 'gpt4o_cloud' refused the call: ") and "Its fallback: " in message
            assert message.count("requests per minute") == 2, message


async def test_upstream_429_passes_through_and_holds_back(raw_config: dict[str, Any], fake: FakeUpstream,
                                                          make_proxy: Any) -> None:
    proxy = await make_proxy()
    fake.behavior = Behavior(status=429, retry_after="20")
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 429 and r.headers["Retry-After"] == "20"
            assert (await r.json())["error"]["message"] == "fake upstream error 429"
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 429
            assert (await r.json())["error"]["type"] == "upstream_rate_limit"
            assert 19 <= int(r.headers["Retry-After"]) <= 20
    assert len(fake.seen) == 1
    stats = await settled(proxy)
    assert stats["detail"]["errors_by_kind"]["upstream_rate_limited"] == 1
    assert stats["detail"]["refused"]["rate_limited"] == 1


async def test_limits_survive_restart_and_reset(raw_config: dict[str, Any], fake: FakeUpstream,
                                                make_proxy: Any) -> None:
    set_limits(raw_config, rpd=3)
    proxy = await make_proxy()
    statuses = await burst(proxy.url + "/v1/chat/completions", 3, CHAT)
    assert statuses == [200] * 3
    await proxy.restart()
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 429 and (await r.json())["error"]["type"] == "requests_per_day"
        async with s.post(proxy.url + "/metrics/reset") as r:
            assert r.status == 200
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 429
    assert len(fake.seen) == 3


async def test_stats_show_every_limited_scope(raw_config: dict[str, Any], fake: FakeUpstream,
                                              make_proxy: Any) -> None:
    set_limits(raw_config, rpm=15, rpd=150, tpm=150000, concurrency=5)
    raw_config["limits"] = {"models": {"gpt-4o*": {"rpm": 10}}, "per_user": {"rpd": 20},
                            "users": {"vip": {"rpd": 100}}}
    proxy = await make_proxy()
    fake.behavior = Behavior(prompt_tokens=100, chunks=4, completion_per_chunk=10)
    async with aiohttp.ClientSession() as s:
        for user in ("ana", "vip"):
            async with s.post(proxy.url + "/v1/chat/completions", json={**CHAT, "user": user}) as r:
                assert r.status == 200
    stats = await settled(proxy)
    rows = {(row["scope"], row["limit"]): row for row in stats["detail"]["limits"]}
    assert rows[("upstream:gpt4o_cloud", "requests_per_minute")]["used"] == 2
    assert rows[("upstream:gpt4o_cloud", "tokens_per_minute")]["used"] == 280
    assert rows[("upstream:gpt4o_cloud", "requests_per_day")]["pct"] == 1.3
    assert rows[("model:gpt-4o*", "requests_per_minute")]["max"] == 10
    assert rows[("user:vip", "requests_per_day")]["used"] == 1
    assert 0 < rows[("upstream:gpt4o_cloud", "requests_per_minute")]["reset_s"] <= 60
    assert stats["rate_limits"] == {"tokens_pm": "280 / 150,000 TPM", "requests_dia": "2 / 150 RPD",
                                    "uso_tpm": "0.2%", "uso_rpd": "1.3%"}


async def test_wait_mode_waits_for_a_minute_window_to_free(raw_config: dict[str, Any], fake: FakeUpstream,
                                                           make_proxy: Any) -> None:
    set_limits(raw_config, rpm=1)
    raw_config["limits"] = {"on_limit": "wait", "max_wait_s": 5}
    clock = RealClock()
    proxy = await make_proxy(clock)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
        clock.offset = 59.0  # the minute's only place frees about 1 s from now
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
        # It was held until the place freed: admitted a full window after the first, by the
        # proxy's own clock (no stopwatch in the test).
        await proxy.ledger.flush()
        conn = sqlite3.connect(proxy.config.db_path)
        first, second = [ts for (ts,) in conn.execute("SELECT ts FROM admissions ORDER BY ts")]
        conn.close()
        assert second - first >= 60.0
        clock.offset = 0.0   # now the place is ~60 s away: beyond max_wait_s, refused at once
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 429
    assert len(fake.seen) == 2


@pytest.fixture
def keyed(raw_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("TG_KEY_BOT", "tg-bot-secret-1")
    monkeypatch.setenv("TG_KEY_OTHER", "tg-other-secret-2")
    raw_config["keys"] = {"bot": {"key_env": "TG_KEY_BOT", "user": "raymundo", "limits": {"rpd": 2}},
                          "other": {"key_env": "TG_KEY_OTHER"}}
    return {"bot": "tg-bot-secret-1", "other": "tg-other-secret-2"}


async def test_proxy_keys_are_required_and_carry_user_and_limits(keyed: dict[str, str], fake: FakeUpstream,
                                                                 make_proxy: Any) -> None:
    proxy = await make_proxy()
    url = proxy.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=CHAT) as r:
            assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error"
        async with s.post(url, json=CHAT, headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with s.post(proxy.url + "/api/chat", json={"model": "llama3", "messages": []}) as r:
            assert r.status == 401 and isinstance((await r.json())["error"], str)
        async with s.get(proxy.url + "/api/tags") as r:
            assert r.status == 401
    assert fake.seen == []
    bot = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=keyed["bot"], max_retries=0)
    other = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=keyed["other"], max_retries=0)
    for _ in range(2):
        await bot.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    with pytest.raises(openai.RateLimitError):
        await bot.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    await other.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    # The upstream sees its own key, never the bot's.
    assert {s.headers["Authorization"] for s in fake.seen} == {"Bearer ghp_fakeCloudKey_0123456789abcdef"}
    stats = await settled(proxy)
    # Two served; the refusal is counted apart, with the four unauthenticated tries.
    assert stats["detail"]["by_user"]["raymundo"]["requests"] == 2
    assert stats["detail"]["refused"] == {"unauthorized": 4, "rate_limited": 1}
    await bot.close()
    await other.close()
    await proxy.restart()  # the key's daily window comes back from the ledger
    bot = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=keyed["bot"], max_retries=0)
    with pytest.raises(openai.RateLimitError):
        await bot.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    await bot.close()


async def test_a_model_scope_429_carries_its_ratelimit_headers(raw_config: dict[str, Any], make_proxy: Any) -> None:
    """The limit that refused is set on a model, not the upstream: the headers still say so."""
    set_limits(raw_config)
    raw_config["limits"] = {"models": {"gpt-4o": {"rpm": 1, "tpm": 5000}}}
    proxy = await make_proxy()
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            assert (r.headers["x-ratelimit-limit-requests"], r.headers["x-ratelimit-remaining-requests"]) == ("1", "0")
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 429
            assert (r.headers["x-ratelimit-limit-requests"], r.headers["x-ratelimit-remaining-requests"]) == ("1", "0")
            assert r.headers["x-ratelimit-limit-tokens"] == "5000"
            assert r.headers["x-ratelimit-reset-requests"].endswith("s")


@pytest.mark.parametrize("value,held", [("inf", None), ("nan", None), ("-5", None), ("soon", None),
                                        ("1e308", 3600), ("86400", 3600), ("12", 12)])
async def test_an_upstreams_retry_after_is_bounded(raw_config: dict[str, Any], fake: FakeUpstream,
                                                   make_proxy: Any, value: str, held: int | None) -> None:
    """`Retry-After: inf` once made every later call a 500; absurd waits are capped at an hour."""
    proxy = await make_proxy()
    fake.behavior = Behavior(status=429, retry_after=value)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 429 and r.headers["Retry-After"] == value  # the upstream's own answer
        fake.behavior = Behavior()
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            if held is None:
                assert r.status == 200  # nothing held the next call back
            else:
                assert r.status == 429 and (await r.json())["error"]["type"] == "upstream_rate_limit"
                assert held - 1 <= int(r.headers["Retry-After"]) <= held


def ledger_rows(proxy: Proxy) -> list[tuple[Any, ...]]:
    import sqlite3

    conn = sqlite3.connect(proxy.config.db_path)
    try:
        return conn.execute("SELECT upstream, outcome, status, final, admission IS NOT NULL, fallback_from, "
                            "prompt_tokens + completion_tokens FROM calls ORDER BY id").fetchall()
    finally:
        conn.close()


def limit_used(stats: dict[str, Any], scope: str, limit: str) -> int:
    [row] = [r for r in stats["detail"]["limits"] if r["scope"] == scope and r["limit"] == limit]
    return int(row["used"])


async def test_one_record_per_attempt_and_the_clouds_windows_hold_only_what_it_served(
        raw_config: dict[str, Any], fake: FakeUpstream, make_proxy: Any) -> None:
    """The cloud fails with 503, the unlimited local model answers: after a restart the cloud's
    token window is 0 (it served nothing), its request windows hold the one call it took."""
    set_limits(raw_config, tpm=100_000, rpd=100)
    raw_config["upstreams"]["gpt4o_cloud"].update(fallback="ollama_local", fallback_model="llama3.2")
    proxy = await make_proxy()
    fake.by_model["openai/gpt-4o"] = Behavior(status=503)
    fake.behavior = Behavior(prompt_tokens=30, chunks=2, completion_per_chunk=5)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200 and r.headers["X-Tollgate-Upstream"] == "ollama_local"
    await proxy.ledger.flush()
    assert ledger_rows(proxy) == [("gpt4o_cloud", "upstream_status", 503, 0, 1, None, 0),
                                  ("ollama_local", "ok", 200, 1, 0, "gpt4o_cloud", 40)]
    await proxy.restart()
    stats = await settled(proxy)
    assert limit_used(stats, "upstream:gpt4o_cloud", "tokens_per_minute") == 0
    assert limit_used(stats, "upstream:gpt4o_cloud", "requests_per_day") == 1
    assert stats["total_requests"] == 1 and stats["errores"] == 0 and stats["tasa_exito"] == "100.0%"
    assert stats["detail"]["attempts_before_fallback"] == {"gpt4o_cloud:upstream_status": 1}


async def test_a_limit_refusal_that_falls_back_is_on_record(raw_config: dict[str, Any], fake: FakeUpstream,
                                                            make_proxy: Any) -> None:
    set_limits(raw_config, rpm=1)
    raw_config["upstreams"]["gpt4o_cloud"].update(fallback="ollama_local", fallback_model="llama3.2")
    proxy = await make_proxy()
    async with aiohttp.ClientSession() as s:
        for upstream in ("gpt4o_cloud", "ollama_local"):
            async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200 and r.headers["X-Tollgate-Upstream"] == upstream
    await proxy.ledger.flush()
    rows = ledger_rows(proxy)
    assert [row[:6] for row in rows] == [("gpt4o_cloud", "ok", 200, 1, 1, None),
                                         ("gpt4o_cloud", "rate_limited", 429, 0, 0, None),
                                         ("ollama_local", "ok", 200, 1, 0, "gpt4o_cloud")]
    stats = await settled(proxy)
    assert stats["total_requests"] == 2 and stats["detail"]["attempts_before_fallback"] == {
        "gpt4o_cloud:rate_limited": 1}


async def test_every_view_of_usage_is_the_limiters(raw_config: dict[str, Any], fake: FakeUpstream,
                                                    make_proxy: Any) -> None:
    """/stats' seed strings, its limit rows, the WhatsApp text, /metrics, the alert figures and
    the x-ratelimit headers read one set of windows: after a fallback, and mid-stream."""
    from prometheus_client.parser import text_string_to_metric_families

    from proxy.keys import ALERTS, LIMITER

    set_limits(raw_config, rpd=100, tpm=10_000)
    raw_config["limits"] = {"models": {"gpt-4o": {"rpd": 50}}}
    raw_config["stats"]["limits_model"] = "gpt-4o"
    raw_config["upstreams"]["gpt4o_cloud"].update(fallback="ollama_local", fallback_model="llama3.2")
    raw_config["alerts"] = {"rules": [{"name": "rpd", "metric": "daily_requests_pct", "above": 99},
                                      {"name": "tpm", "metric": "tpm_pct", "above": 99}]}
    proxy = await make_proxy()
    fake.behavior = Behavior(prompt_tokens=20, chunks=2, completion_per_chunk=5)

    async def views(s: aiohttp.ClientSession) -> None:
        app = proxy.server.app
        requests, rpd = app[LIMITER].usage("gpt4o_cloud", "gpt-4o", "requests_per_day")
        tokens, tpm = app[LIMITER].usage("gpt4o_cloud", "gpt-4o", "tokens_per_minute")
        assert (rpd, tpm) == (50, 10_000)
        stats = await stats_now(proxy)
        assert stats["rate_limits"] == {"tokens_pm": f"{tokens:,} / 10,000 TPM", "requests_dia": f"{requests} / 50 RPD",
                                        "uso_tpm": f"{100 * tokens / tpm:.1f}%", "uso_rpd": f"{100 * requests / 50:.1f}%"}
        assert limit_used(stats, "model:gpt-4o", "requests_per_day") == requests
        assert limit_used(stats, "upstream:gpt4o_cloud", "tokens_per_minute") == tokens
        async with s.get(proxy.url + "/stats?format=text") as r:
            assert f"{tokens:,} / 10,000 TPM" in await r.text()
        async with s.get(proxy.url + "/metrics") as r:
            samples = {(x.labels.get("scope"), x.labels.get("limit")): x.value
                       for f in text_string_to_metric_families(await r.text()) if f.name == "tollgate_limit_used"
                       for x in f.samples}
        assert samples[("model:gpt-4o", "requests_per_day")] == requests
        assert samples[("upstream:gpt4o_cloud", "tokens_per_minute")] == tokens
        assert app[ALERTS].figures() == {"rpd": 100 * requests / 50, "tpm": 100 * tokens / tpm}

    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
        fake.by_model["openai/gpt-4o"] = Behavior(status=503)
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200 and r.headers["X-Tollgate-Upstream"] == "ollama_local"
        await proxy.settled()
        await views(s)
        gate = asyncio.Event()
        fake.by_model["openai/gpt-4o"] = Behavior(prompt_tokens=20, chunks=3, completion_per_chunk=5,
                                                  gate_before_last=gate)
        recorded = proxy.records()
        async with s.post(proxy.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            assert (await r.content.readline()).startswith(b"data: ")
            # 2 served, 1 failed at the cloud (it took the call), 1 streaming now: 4 of the model's 50.
            assert r.headers["x-ratelimit-limit-requests"] == "50"
            assert r.headers["x-ratelimit-remaining-requests"] == "46"
            assert proxy.server.app[LIMITER].usage("gpt4o_cloud", "gpt-4o", "requests_per_day")[0] == 4
            await views(s)
            gate.set()
            await r.read()
        await recorded.wait_for(1)
        await views(s)


async def test_waiting_callers_who_leave_are_never_forwarded(raw_config: dict[str, Any], fake: FakeUpstream,
                                                             make_proxy: Any) -> None:
    """200 callers queue behind a held place, then hang up; when the place frees, none of them
    reaches the upstream (on 3.11, wait_for could swallow the cancellation of one of them)."""
    set_limits(raw_config, concurrency=1)
    raw_config["limits"] = {"on_limit": "wait", "max_wait_s": 60}
    proxy = await make_proxy()
    gate = asyncio.Event()
    fake.behavior = Behavior(chunks=2, gate_before_last=gate)
    url = proxy.url + "/v1/chat/completions"

    async def call(s: aiohttp.ClientSession, name: str) -> int:
        body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": name}]}
        async with s.post(url, json=body) as r:
            await r.read()
            return r.status

    recorded = proxy.records()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        holder = asyncio.create_task(call(s, "A"))
        await fake.first_chunk_sent.wait()
        leavers = [asyncio.create_task(call(s, f"L{i}")) for i in range(200)]
        lines = proxy.server.app[ADMISSION].lines
        async with lines.waiting_changed:  # one leads the line, 199 queue behind it
            await asyncio.wait_for(lines.waiting_changed.wait_for(lambda: lines.waiting == 199), 30)
        # They all hang up as the place frees: the race in which one slipped through.
        for task in leavers:
            task.cancel()
        gate.set()
        await asyncio.gather(*leavers, return_exceptions=True)
        assert await holder == 200
        rows = await recorded.wait_for(201)       # A, and every leaver on record as cancelled
        assert sorted(r.outcome for r in rows) == ["cancelled"] * 200 + ["ok"]
        assert await call(s, "D") == 200          # D gets the place no leaver took
    contents = [seen.body["messages"][0]["content"] for seen in fake.seen]
    assert contents == ["A", "D"]


async def test_a_tracked_upstream_without_limits_counts_each_call_from_its_own_row(
        raw_config: dict[str, Any], fake: FakeUpstream, make_proxy: Any, backend: str) -> None:
    """The upstream /stats shows, with no limit of its own, counts every call let through to it
    (the local model's are not): no admission row each, the call's row stands for it, and the
    counts come back after a restart, from the ledger, for Redis too once it has forgotten them."""
    raw_config["upstreams"]["gpt4o_cloud"].pop("limits")
    proxy = await make_proxy()
    fake.behavior = Behavior(prompt_tokens=100, chunks=4, completion_per_chunk=10)
    async with aiohttp.ClientSession() as s:
        for body in (CHAT, {**CHAT, "stream": True}, CHAT, {**CHAT, "model": "llama3.2"}):
            async with s.post(proxy.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                await r.read()
    before = (await settled(proxy))["rate_limits"]
    assert before["requests_dia"].startswith("3 ") and before["tokens_pm"].startswith("420 ")
    await proxy.ledger.flush()
    conn = sqlite3.connect(proxy.config.db_path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM admissions").fetchone() == (0,)
        assert conn.execute("SELECT COUNT(*) FROM calls WHERE admission = ''").fetchone() == (3,)
    finally:
        conn.close()
    if backend == "redis":
        raw_config["redis"]["prefix"] = f"t{uuid.uuid4().hex}"   # a Redis that has forgotten them
    await proxy.restart()
    assert (await settled(proxy))["rate_limits"] == before
